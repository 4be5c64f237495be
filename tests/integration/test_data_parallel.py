"""Two processes on the CPU (torchrun, gloo) train exactly as one: 2 ranks x batch 2 give the logged terms
of every step and the trained adapter of 1 rank x batch 4 and of 1 rank x batch 2 x accumulation 2.

The 2-rank runs go through the user's command, ``NPROC_PER_NODE=2 anchorkd train`` (anchorkd relaunches
itself under torchrun); the one-process references run in this process. Ranks hold different numbers of
supervised tokens in each step (the samples differ in length), so the token normalisation over all ranks
is what makes the numbers agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anchorkd.trainers.pipeline import run_training

pytestmark = pytest.mark.integration
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"
STEPS = 3
TERMS = ("loss", "sft_loss", "llm_kd_loss", "vision_kd_loss", "token_accuracy", "token_count")
# A KD term is only worth comparing between layouts when the student already differs from its teacher. A LoRA
# whose B factors start at zero makes the student equal the base-anchor teacher, and after a few steps at the
# demo's learning rate the LM-head JSD is ~5e-6: a difference of nearly equal distributions whose value is
# mostly fp32 rounding (different on another machine, thread count or reduction order). Random LoRA factors
# from step 0 (``init_weights: false``) make the student differ, and temperature 0.1 sharpens the tiny random
# model's near-uniform distributions (loss ~ log V): the JSD is then ~0.16 and the merger-feature term ~0.07,
# where fp32 rounding (~1e-8 absolute) is ~1e-7 relative.
DISTINCT_STUDENT = ("tuner.init_weights='false'", "rlhf.temperature=0.1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def overrides(out: Path, batch: int, accumulation: int = 1, extra=()) -> list[str]:
    return [
        f"training.output_dir={out}",
        f"training.max_steps={STEPS}",
        f"training.per_device_train_batch_size={batch}",
        f"training.gradient_accumulation_steps={accumulation}",
        f"training.save_steps={STEPS}",
        "training.eval_strategy=no",
        "training.add_version=false",
        "training.seed=3",
        *extra,
    ]


def two_ranks(workdir: Path, config: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "anchorkd.cli", "train", "--config", str(config), *args]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "still alive after the run" not in result.stderr  # see sharding.release_process_group
    return result


def step_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    steps = [r for r in records if "global_step/max_steps" in r and "loss" in r]
    assert [r["global_step/max_steps"] for r in steps] == [f"{s}/{STEPS}" for s in range(1, STEPS + 1)]
    return steps


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / f"checkpoint-{STEPS}" / "adapter_model.safetensors")


def assert_same_run(candidate: Path, reference: Path, terms=TERMS, rel: float = 1e-5) -> None:
    """Every term of every step within ``rel``, then every adapter tensor within relative 1e-5.

    No absolute tolerance: with ``DISTINCT_STUDENT`` every compared term is far above its rounding noise.
    Measured between layouts (2 ranks vs 1 x 4, vs 1 x 2 x accumulation 2, ZeRO-2/3 vs DDP; OMP_NUM_THREADS
    1 and 2): at most 2.5e-7 relative, the fp32 reduction order of the LoRA updates. 1e-5 leaves 40x for
    other machines' kernels; a real error (a missed rank in the token normalisation, an anchor row trained
    twice) moves a term by 1e-2 or more."""
    got, want = step_records(candidate), step_records(reference)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        for term in terms:
            if term in w:
                assert g[term] == pytest.approx(w[term], rel=rel, abs=0.0), (step, term, g, w)
    a, b = adapter(candidate), adapter(reference)
    assert a.keys() == b.keys() and a
    for name in a:
        # relative difference of each adapter tensor (Frobenius norms)
        relative = float((a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-12))
        assert relative < 1e-5, (name, relative)


@pytest.fixture(scope="module")
def runs(demo_workdir, tmp_path_factory):
    """``runs(config, layout, extra)``: the run's output dir; each run happens once per module, in a folder of
    its own. A run that failed fails every test that asks for it again (it is not rerun into its folder)."""
    root = tmp_path_factory.mktemp("data-parallel")
    done: dict[tuple, Path | Exception] = {}

    def run(config: str, layout: str, extra=()) -> Path:
        key = (config, layout, tuple(extra))
        if key not in done:
            out = root / f"{config.removesuffix('.yaml')}-{layout}-{len(done)}"
            try:
                done[key] = _train(demo_workdir, config, layout, extra, out)
            except Exception as error:  # kept and re-raised for every test that asks
                done[key] = error
        if isinstance(done[key], Exception):
            raise done[key]
        return done[key]

    return run


def _train(workdir: Path, config: str, layout: str, extra, out: Path) -> Path:
    if layout == "2x2":
        two_ranks(workdir, DEMO / config, overrides(out, batch=2, extra=extra))
        return out
    batch, accumulation = {"1x4": (4, 1), "1x2x2": (2, 2)}[layout]
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        run_training(DEMO / config, overrides(out, batch, accumulation, extra))
    finally:
        os.chdir(cwd)
    return out


def test_gkd_with_visual_kd_two_ranks_equal_one_rank_batch_4(runs):
    reference = runs("stage_3_visual_kd.yaml", "1x4", DISTINCT_STUDENT)
    candidate = runs("stage_3_visual_kd.yaml", "2x2", DISTINCT_STUDENT)
    records = step_records(candidate)
    assert records[0]["llm_kd_loss"] > 0.01 and records[0]["vision_kd_loss"] > 0.01  # far above rounding
    assert_same_run(candidate, reference)


def test_gkd_with_visual_kd_two_ranks_equal_gradient_accumulation(runs):
    """Same micro-batch shapes on both sides, so only the reduction order differs."""
    two_ranks_run = runs("stage_3_visual_kd.yaml", "2x2", DISTINCT_STUDENT)
    accumulated = runs("stage_3_visual_kd.yaml", "1x2x2", DISTINCT_STUDENT)
    assert_same_run(two_ranks_run, accumulated)


def test_reference_loss_two_ranks_equal_one_rank_batch_4(runs):
    extra = ("custom.kd_loss_impl=reference", *DISTINCT_STUDENT)
    reference = runs("stage_2_llm_lora_gkd.yaml", "1x4", extra)
    candidate = runs("stage_2_llm_lora_gkd.yaml", "2x2", extra)
    assert step_records(candidate)[0]["llm_kd_loss"] > 0.01
    assert_same_run(candidate, reference)


def test_anchor_prompts_two_ranks_equal_gradient_accumulation(runs):
    """Rank r draws its own slice of each step's anchor-row stream, so 2 ranks x 2 train on the same anchor
    rows per step as 1 x 2 x accumulation 2, and anchor_kd_loss is normalised over both ranks' anchor tokens."""
    extra = ("custom.anchor.ratio=0.5", *DISTINCT_STUDENT)
    two_ranks_run = runs("anchor_prompts.yaml", "2x2", extra)
    accumulated = runs("anchor_prompts.yaml", "1x2x2", extra)
    assert step_records(two_ranks_run)[0]["anchor_kd_loss"] > 0.01
    assert_same_run(two_ranks_run, accumulated, terms=(*TERMS, "anchor_kd_loss"))


def test_sft_two_ranks_equal_one_rank_batch_4(runs):
    reference = runs("stage_2_llm_lora.yaml", "1x4")
    candidate = runs("stage_2_llm_lora.yaml", "2x2")
    assert_same_run(candidate, reference, terms=("loss", "token_acc"))
