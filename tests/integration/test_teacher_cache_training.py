"""Training from the teacher cache (``custom.teacher_cache``) on the tiny model.

- one micro-batch: the cached run loads no teacher, and its LM KD term is the top-k + tail JSD of the live
  teacher's logits (exactly, with the cache's fp16 rounding), within the DPI bound below the full JSD;
- a cache for other settings, or one that misses a row, is refused before training, naming the key / row;
- 2 ranks from the cache (anchor rows included), and 2 ZeRO-3 ranks, equal 1 rank x accumulation 2;
- a run resumed from checkpoint 2 equals the straight run.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path

import gkd_harness as h
import pytest
from test_data_parallel import DEMO, DISTINCT_STUDENT, assert_same_run, overrides, step_records, two_ranks

from anchorkd.config import ConfigLoader
from anchorkd.errors import ConfigError, DataError
from anchorkd.losses.topk import TeacherTopK, reference_topk_jsd, student_buckets, teacher_topk
from anchorkd.trainers import teacher_cache as tc
from anchorkd.trainers.gkd_monitor import CACHED_TEACHER
from anchorkd.trainers.pipeline import run_training

pytestmark = pytest.mark.integration

K = 64
GKD = DEMO / "stage_2_llm_lora_gkd.yaml"
ANCHORED = DEMO / "anchor_prompts.yaml"


def write_cache(workdir: Path, config: Path, args: list[str], folder: Path, k: int = K) -> Path:
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with h.preserved_environment():
            tc.write_teacher_cache(ConfigLoader.resolve(config, args), folder, k=k)
    finally:
        os.chdir(cwd)
    return folder


def train_here(workdir: Path, config: Path, args: list[str]) -> dict:
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return run_training(config, args)
    finally:
        os.chdir(cwd)


# --- one micro-batch against the live teacher ------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


def test_cached_kd_is_the_top_k_jsd_of_the_live_teacher(env, tmp_path):
    live = env.overrides("cache-live", extra=DISTINCT_STUDENT[1:])  # temperature 0.1: peaked distributions
    with h.preserved_environment():
        tc.write_teacher_cache(ConfigLoader.resolve(h.STAGE2_GKD_DEMO, live), tmp_path / "cache", k=K)
    cached = h.build(h.STAGE2_GKD_DEMO, [*live, f"custom.teacher_cache={tmp_path / 'cache'}"]).trainer
    assert cached.teacher_model is None and cached.teacher_mode == "cached" and cached.anchor.teacher_cache
    # The student moves away from the cached base-model teacher.
    assert h.perturb_lora(h.unwrap(cached), scale=0.3) > 0

    with h.configured(cached):
        batch = h.prepare(cached, h.dataset_rows(cached, [0, 1]))
        assert isinstance(batch[CACHED_TEACHER], TeacherTopK)
        cached.compute_loss(cached.model, h.copy_batch(batch))
        logged = h.log_now(cached)
    with h.configured(cached, kd_loss_impl="reference"):  # the same terms from full student logits
        cached.compute_loss(cached.model, h.copy_batch(batch))
        logged_reference = h.log_now(cached)
    with h.configured(cached):
        # The oracle: the live teacher (the adapter-disabled student) on the same micro-batch, its top-k
        # rounded to fp16 as the cache stores it.
        student = h.student_logits(cached, batch)[:, :-1].double()
        teacher = h.teacher_logits(cached, batch)[:, :-1].double()
        labels = batch["model_inputs"]["labels"][:, 1:]
        supervised = labels != -100
        beta, temperature = cached.beta, cached.temperature
        top = teacher_topk(teacher[supervised], K, temperature)
        top = TeacherTopK(top.logprobs.half().double(), top.ids, top.log_tail.float().double())
        topk_jsd = float(reference_topk_jsd(student[supervised], top, beta=beta, temperature=temperature))
        full = h.token_terms(
            h.student_logits(cached, batch),
            h.teacher_logits(cached, batch),
            batch["model_inputs"]["labels"],
            beta,
            temperature,
        )
    assert logged["llm_kd_loss"] > 1e-3  # far above rounding (~1e-8)
    assert logged["llm_kd_loss"] == pytest.approx(cached.anchor.llm_kd_weight * topk_jsd, rel=1e-4)
    for term in ("sft_loss", "llm_kd_loss"):
        assert logged_reference[term] == pytest.approx(logged[term], rel=1e-5), term
    # Within the top-k approximation of the full JSD: below it, by at most log 2 x the mixture's tail mass.
    student_tail = student_buckets(student[supervised], top.ids, temperature)[:, -1].exp()
    bound = float((math.log(2) * ((1 - beta) * student_tail + beta * top.log_tail.exp())).mean())
    gap = full.jsd - topk_jsd
    print(f"\nfull JSD {full.jsd:.6g}, top-{K} + tail {topk_jsd:.6g}, bound on the gap {bound:.6g}")
    assert -1e-5 * full.jsd <= gap <= bound, (full.jsd, topk_jsd, bound)


def test_an_evaluation_pass_reads_the_validation_rows_from_the_cache(env, tmp_path):
    live = env.overrides("cache-eval")
    with h.preserved_environment():
        tc.write_teacher_cache(ConfigLoader.resolve(h.STAGE2_GKD_DEMO, live), tmp_path / "cache", k=4)
    cached = h.build(h.STAGE2_GKD_DEMO, [*live, f"custom.teacher_cache={tmp_path / 'cache'}"]).trainer
    h.ensure_accelerator(cached)
    rows = list(cached.eval_dataset)
    assert rows
    cached.model.eval()
    try:
        batch = cached._prepare_inputs(rows)
        teacher = batch[CACHED_TEACHER]
        supervised = batch["model_inputs"]["labels"][:, 1:] != -100
        assert teacher.ids.shape[-1] == 4 and bool((teacher.log_tail[:, :-1][supervised] < 0).all())
        cached.compute_loss(cached.model, h.copy_batch(batch))
        # The student is still the teacher here (LoRA B = 0): the term is ~0, only its presence is checked.
        assert math.isfinite(h.log_now(cached)["eval_llm_kd_loss"])
    finally:
        h.reset(cached)
        cached.model.train()


def test_a_cache_for_other_settings_or_missing_a_row_is_refused_before_training(env, tmp_path):
    live = env.overrides("cache-refusals", steps=1)
    folder = tmp_path / "cache"
    with h.preserved_environment():
        tc.write_teacher_cache(ConfigLoader.resolve(h.STAGE2_GKD_DEMO, live), folder, k=4)

    out = env.work / "cache-refusals-hot"
    other = [*live, f"custom.teacher_cache={folder}", f"training.output_dir={out}", "rlhf.temperature=0.5"]
    with pytest.raises(ConfigError) as info:
        h.run_training(h.STAGE2_GKD_DEMO, other)
    assert info.value.key_path == "custom.teacher_cache"
    assert "temperature: the cache has 1.0, this run 0.5" in str(info.value)
    assert not out.exists()

    rows = (env.data_dir / "train.jsonl").read_text().splitlines()
    extra = tmp_path / "train.jsonl"
    extra.write_text("\n".join([*rows, rows[0].replace('"content": "', '"content": "A new row. ', 1)]) + "\n")
    missing = [
        *live,
        f"custom.teacher_cache={folder}",
        f"training.output_dir={out}",
        f"data.dataset=[{extra}]",
    ]
    with pytest.raises(DataError) as info:
        h.run_training(h.STAGE2_GKD_DEMO, missing)
    assert "the teacher cache has no entry for training row" in str(info.value) and "A new row." in str(
        info.value
    )
    assert not (out / "checkpoint-1").exists()


def test_the_commands_write_and_check_the_cache_the_config_names(demo_workdir, tmp_path, monkeypatch, capsys):
    """``anchorkd teacher-cache`` on the config that trains from the cache (it writes with the live teacher),
    then ``anchorkd validate`` of the same config sees a cached teacher."""
    from anchorkd.cli import main

    monkeypatch.chdir(demo_workdir)
    folder = tmp_path / "cache"
    args = ["--config", str(GKD), *overrides(tmp_path / "out", 2, 1, (f"custom.teacher_cache={folder}",))]
    with h.preserved_environment():
        assert main(["validate", *args]) == 2  # not written yet: refused, naming the key
        assert "custom.teacher_cache" in capsys.readouterr().err and not folder.exists()
        assert main(["teacher-cache", *args[:2], "--out", str(folder), "--k", "4", *args[2:]]) == 0
        assert "anchorkd: teacher cache" in capsys.readouterr().out
        assert main(["validate", *args]) == 0
    assert "teacher=cached" in capsys.readouterr().out
    assert (folder / tc.MANIFEST).is_file() and list(folder.glob(tc.SHARD_GLOB))


# --- whole runs -----------------------------------------------------------------------------------------


def test_two_ranks_from_the_cache_equal_gradient_accumulation(demo_workdir, tmp_path):
    """Anchor rows and domain rows both read from the cache; no teacher is loaded on either side."""
    extra = ("custom.anchor.ratio=0.5", *DISTINCT_STUDENT)
    folder = write_cache(
        demo_workdir, ANCHORED, overrides(tmp_path / "writer", 2, 2, extra), tmp_path / "cache"
    )
    cached = (*extra, f"custom.teacher_cache={folder}")
    two_ranks(demo_workdir, ANCHORED, overrides(tmp_path / "2x2", batch=2, extra=cached))
    train_here(demo_workdir, ANCHORED, overrides(tmp_path / "1x2x2", 2, 2, cached))
    first = step_records(tmp_path / "2x2")[0]
    assert first["llm_kd_loss"] > 1e-3 and first["anchor_kd_loss"] > 1e-3
    assert_same_run(
        tmp_path / "2x2", tmp_path / "1x2x2", terms=("loss", "sft_loss", "llm_kd_loss", "anchor_kd_loss")
    )


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero3_from_the_cache_equals_gradient_accumulation(demo_workdir, tmp_path):
    """ZeRO-3 over 2 CPU ranks: the fused top-k loss gathers the student's sharded LM head (no teacher)."""
    folder = write_cache(
        demo_workdir, GKD, overrides(tmp_path / "writer", 2, 2, DISTINCT_STUDENT), tmp_path / "cache"
    )
    cached = (*DISTINCT_STUDENT, f"custom.teacher_cache={folder}")
    two_ranks(
        demo_workdir, GKD, overrides(tmp_path / "zero3", batch=2, extra=(*cached, "training.deepspeed=zero3"))
    )
    train_here(demo_workdir, GKD, overrides(tmp_path / "1x2x2", 2, 2, cached))
    assert step_records(tmp_path / "zero3")[0]["llm_kd_loss"] > 1e-3
    assert_same_run(tmp_path / "zero3", tmp_path / "1x2x2", terms=("loss", "sft_loss", "llm_kd_loss"))


def test_resume_from_the_cache_equals_the_straight_run(demo_workdir, tmp_path):
    """The cache is keyed by row content, so a resumed run reads the same rows' teacher on the same steps."""
    args = overrides(tmp_path / "writer", 2, 1, DISTINCT_STUDENT)
    folder = write_cache(demo_workdir, GKD, args, tmp_path / "cache")
    cached = (
        *DISTINCT_STUDENT,
        f"custom.teacher_cache={folder}",
        "training.save_steps=2",
        "training.save_total_limit=10",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_here(demo_workdir, GKD, overrides(straight, 2, 1, cached))
    shutil.copytree(straight, resumed, symlinks=True)  # the run went on after checkpoint-2, then stopped
    resume = f"training.resume_from_checkpoint={resumed / 'checkpoint-2'}"
    assert train_here(demo_workdir, GKD, overrides(resumed, 2, 1, (*cached, resume)))["global_step"] == 3
    assert step_records(resumed)[-1]["llm_kd_loss"] > 1e-3
    assert_same_run(resumed, straight, terms=("loss", "sft_loss", "llm_kd_loss"))
