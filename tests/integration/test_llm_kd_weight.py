"""Spec 003 acceptance tests: weighted LM-head KD loss, its telemetry, and when the teacher runs.

Loss values are checked against oracles computed here, independently of anchorkd's loss code: our own
student and teacher forwards, labels shifted by slicing (logit t predicts token t + 1, -100 masked),
ms-swift's ``gkd_loss.jsd_loss`` on temperature-scaled logits and ``torch.nn.functional.cross_entropy``.
Trainers are built once per configuration (see ``gkd_harness``) and ``compute_loss`` is called directly.
"""

from __future__ import annotations

import logging
import math
import socket

import gkd_harness as h
import pytest
import torch
from transformers.integrations.integration_utils import rewrite_logs

from anchorkd import swift_seam as seam

pytestmark = pytest.mark.integration

REL = 1e-5
METRICS = ("sft_loss", "llm_kd_loss", "vision_kd_loss", "token_accuracy", "token_count")


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def anchor(env):
    return h.anchor_build(env).trainer


@pytest.fixture(scope="module")
def visual(env):
    return h.visual_build(env).trainer


def approx(expected, rel=REL, abs_=0.0):
    return pytest.approx(expected, rel=rel, abs=abs_)


# --- Requirement: Weighted LM-head KD loss & telemetry --------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_positive_weight_with_teacher_attached(anchor, impl):
    """w = 0.5, visual KD off: loss = 0.5 * jsd + sft_alpha * ce; metrics and logs carry 0.5 * jsd."""
    trainer = anchor
    assert trainer.anchor.llm_kd_weight == 0.5 and trainer.args.sft_alpha == 0.3
    assert not trainer.visual_kd.active and trainer.teacher_mode == "base_anchor"
    with h.configured(trainer, kd_loss_impl=impl, temperature=2.0, beta=0.5):
        batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
        oracle = h.batch_terms(trainer, batch)
        assert oracle.jsd > 1e-3, "the student must differ from the teacher for this test to mean anything"
        expected_kd = 0.5 * oracle.jsd
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        assert float(loss) == approx(expected_kd + 0.3 * oracle.ce)

        metrics = seam.metric_store(trainer)["train"]
        assert metrics["llm_kd_loss"] == [approx(expected_kd)]
        assert metrics["sft_loss"] == [approx(0.3 * oracle.ce)]
        assert metrics["token_count"] == [oracle.tokens]

        logs = h.log_now(trainer)
        assert logs["llm_kd_loss"] == approx(expected_kd)
        assert trainer.state.log_history[-1]["llm_kd_loss"] == approx(expected_kd)
        rewritten = rewrite_logs(logs)
        assert rewritten["train/llm_kd_loss"] == logs["llm_kd_loss"]
        for name in ("sft_loss", "llm_kd_loss", "token_accuracy", "token_count"):
            assert [k for k in rewritten if k.endswith("/" + name)] == [f"train/{name}"]
        assert not any(k.startswith("train/train") or "eval" in k for k in rewritten)

        # eval mode: logged once as eval_llm_kd_loss, which the integrations turn into eval/llm_kd_loss
        trainer.model.eval()
        eval_batch = trainer._prepare_inputs(h.dataset_rows(trainer, [0]))
        with torch.no_grad():
            eval_loss = trainer.compute_loss(trainer.model, eval_batch)
        assert float(eval_loss) == approx(float(loss))
        assert seam.metric_store(trainer)["eval"]["llm_kd_loss"] == [approx(expected_kd)]
        eval_logs = h.log_now(trainer)
        assert eval_logs["eval_llm_kd_loss"] == approx(expected_kd)
        assert "llm_kd_loss" not in eval_logs
        eval_rewritten = rewrite_logs(eval_logs)
        assert eval_rewritten["eval/llm_kd_loss"] == eval_logs["eval_llm_kd_loss"]
        for name in ("sft_loss", "llm_kd_loss", "token_accuracy", "token_count"):
            assert [k for k in eval_rewritten if k.endswith("/" + name)] == [f"eval/{name}"]
        assert not any(k.startswith("eval/eval_") for k in eval_rewritten)


def test_weighted_value_surfaces_in_logging_jsonl(env, anchor, tmp_path):
    """logging.jsonl of a real run: llm_kd_loss is the weighted term (0.5 x the value at weight 1.0 on the
    same first step) and no field exposes the unscaled JSD.

    The student starts from a perturbed LoRA adapter (``tuner.adapters``) and the teacher is the base
    (adapter disabled), so the JSD is non-zero from the first step.
    """
    adapter = h.save_adapter(anchor, env.work / "perturbed-adapter")

    def run(name, weight, steps):
        extra = (f"rlhf.llm_kd_weight={weight}", f"tuner.adapters=[{adapter}]", "training.save_strategy=no")
        overrides = env.overrides(name, steps=steps, batch=1, extra=extra)
        summary = h.run_training(h.STAGE2_GKD_DEMO, overrides)
        assert summary["mode"] == "gkd" and summary["global_step"] == steps
        return h.step_records(summary["logging_jsonl"])

    half = run("jsonl-w0.5", 0.5, steps=2)
    assert len(half) == 2
    for record in half:
        for key in ("loss", "sft_loss", "llm_kd_loss", "token_accuracy", "token_count"):
            assert key in record and math.isfinite(record[key]), (key, record)
        assert record["llm_kd_loss"] > 0
        assert record["token_count"] > 0 and 0.0 <= record["token_accuracy"] <= 1.0
        assert record["loss"] == approx(record["sft_loss"] + record["llm_kd_loss"], rel=1e-4)
        kd_like = [k for k in record if any(part in k.lower() for part in ("jsd", "unweighted", "kl", "kd"))]
        assert kd_like == ["llm_kd_loss"], record
        assert not any(k in record for k in ("vision_kd_loss", "kl_loss", "kd_loss"))

    full = run("jsonl-w1.0", 1.0, steps=1)
    assert len(full) == 1
    assert half[0]["llm_kd_loss"] == approx(0.5 * full[0]["llm_kd_loss"], rel=1e-4)
    assert half[0]["sft_loss"] == approx(full[0]["sft_loss"], rel=1e-4)
    assert half[0]["token_count"] == full[0]["token_count"]


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_zero_weight_disables_lm_head_kd(anchor, impl):
    """w = 0 with the teacher attached: loss = 1.0 * ce (sft_alpha 0.3 ignored); no llm_kd_loss anywhere.

    The trainer is built from the GKD config and then set to w = 0: a config with every KD weight at 0
    never reaches this trainer, the loader routes it to plain SFT (see
    test_teacher_skipped_when_kd_inactive_runs_plain_sft and the loader's own tests).
    """
    trainer = anchor
    with h.configured(trainer, llm_kd_weight=0.0, kd_loss_impl=impl):
        assert trainer.teacher_mode == "base_anchor" and trainer.args.sft_alpha == 0.3
        batch = h.prepare(trainer, h.dataset_rows(trainer, [2]))
        oracle = h.batch_terms(trainer, batch)
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        assert float(loss) == approx(oracle.ce)
        assert oracle.jsd > 1e-3  # so KD would have changed the value had it been added
        assert "llm_kd_loss" not in seam.metric_store(trainer)["train"]
        assert seam.metric_store(trainer)["train"]["sft_loss"] == [approx(oracle.ce)]
        logs = h.log_now(trainer)
        assert "llm_kd_loss" not in logs and "eval_llm_kd_loss" not in logs
        assert not any(k.endswith("llm_kd_loss") for k in rewrite_logs(logs))
        assert logs["sft_loss"] == approx(
            oracle.ce,
        )


def test_visual_kd_remains_active_when_lm_kd_disabled(visual, monkeypatch):
    """w = 0, visual KD on (0.7): the teacher still runs, loss = ce + 0.7 * visual, vision_kd_loss logged,
    no llm_kd_loss. The visual term is recomputed from hooks of our own on the student's and the teacher's
    merger and deepstack mergers."""
    trainer = visual
    assert trainer.teacher_mode == "separate" and trainer.visual_kd.weight == h.VISUAL_WEIGHT
    with h.configured(trainer, llm_kd_weight=0.0, kd_loss_impl="reference"):
        batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
        ce = h.ce_only(trainer, batch)

        calls = []
        original = trainer.run_teacher_forward

        def spy(*args, **kwargs):
            calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(trainer, "run_teacher_forward", spy)
        student_hooks = h.Recorder(h.merger_modules(h.unwrap(trainer)))
        teacher_hooks = h.Recorder(h.merger_modules(trainer.teacher_model))
        try:
            with torch.no_grad():
                loss = trainer.compute_loss(trainer.model, batch)
        finally:
            student_hooks.remove()
            teacher_hooks.remove()
        assert len(calls) == 1 and calls[0]["need_lm"] is False
        names = sorted(student_hooks.outputs)
        assert names == ["deepstack.0", "deepstack.1", "merger"]
        distances = [
            torch.mean((student_hooks.outputs[n][0].double() - teacher_hooks.outputs[n][0].double()) ** 2)
            for n in names
        ]
        visual_term = float(torch.stack(distances).mean())
        assert visual_term > 1e-4
        assert float(loss) == approx(ce + h.VISUAL_WEIGHT * visual_term)

        metrics = seam.metric_store(trainer)["train"]
        assert "llm_kd_loss" not in metrics
        assert metrics["vision_kd_loss"] == [approx(h.VISUAL_WEIGHT * visual_term)]
        logs = h.log_now(trainer)
        assert logs["vision_kd_loss"] == approx(
            h.VISUAL_WEIGHT * visual_term,
        )
        assert "llm_kd_loss" not in logs
        assert "train/vision_kd_loss" in rewrite_logs(logs)


def test_teacher_forward_skipped_when_kd_inactive(anchor, monkeypatch):
    """w = 0, visual KD off, teacher configured: ``run_teacher_forward`` never runs; loss = ce."""
    trainer = anchor

    def forbidden(*args, **kwargs):
        raise AssertionError("run_teacher_forward must not run when no KD term is active")

    with h.configured(trainer, llm_kd_weight=0.0):
        monkeypatch.setattr(trainer, "run_teacher_forward", forbidden)
        assert not trainer.anchor.kd_active
        batch = h.prepare(trainer, h.dataset_rows(trainer, [5]))
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        assert float(loss) == approx(h.ce_only(trainer, batch))


# --- Requirement: KD teacher dependency enforcement (trainer level) -------------------------------------


def test_teacher_skipped_when_kd_inactive_runs_plain_sft(env, monkeypatch):
    """A GKD config with llm_kd_weight 0 (visual KD off) trains with ms-swift's plain SFT trainer and
    never loads a teacher."""
    from swift.arguments import SftArguments
    from swift.trainers import Seq2SeqTrainer
    from transformers import Qwen3VLForConditionalGeneration

    import anchorkd.trainers.pipeline as pipeline_module

    built = {}
    original_build_pipeline = pipeline_module.build_pipeline

    def spy(settings):
        built["pipeline"] = pipeline = original_build_pipeline(settings)
        return pipeline

    monkeypatch.setattr(pipeline_module, "build_pipeline", spy)
    overrides = env.overrides("sft-when-w0", extra=("rlhf.llm_kd_weight=0", "training.save_strategy=no"))
    summary = h.run_training(h.STAGE2_GKD_DEMO, overrides)

    assert summary["mode"] == "sft" and summary["global_step"] == 1
    pipeline = built["pipeline"]
    trainer = pipeline.trainer
    assert type(trainer) is Seq2SeqTrainer
    assert isinstance(pipeline.args, SftArguments) and not hasattr(pipeline.args, "teacher_model")
    assert getattr(pipeline, "teacher_model", None) is None
    assert getattr(trainer, "teacher_model", None) is None
    reachable = [m for m in trainer.model.modules() if isinstance(m, Qwen3VLForConditionalGeneration)]
    assert len(reachable) == 1
    records = h.step_records(summary["logging_jsonl"])
    assert records and all(math.isfinite(r["loss"]) for r in records)
    assert not any("kd" in key for record in records for key in record)


# --- Backward compatibility with stock ms-swift GKD -----------------------------------------------------


@pytest.mark.parametrize("sft_alpha", [1.0, 0.5])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_weight_one_matches_stock_ms_swift_gkd(anchor, beta, sft_alpha):
    """w = 1, visual KD off: our loss (reference and fused) equals stock ms-swift
    ``GKDTrainer.compute_loss`` on the same model, base-anchor teacher and batch."""
    from swift.rlhf_trainers import GKDTrainer

    trainer = anchor
    with h.configured(trainer, llm_kd_weight=1.0, beta=beta, sft_alpha=sft_alpha):
        batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
        with torch.no_grad():
            # stock compute_loss rewrites model_inputs keys (logits_to_keep): give it its own dicts
            stock = float(GKDTrainer.compute_loss(trainer, trainer.model, h.copy_batch(batch)))
            ours = {}
            for impl in ("reference", "fused"):
                trainer.anchor = h.use_settings(trainer, kd_loss_impl=impl)
                ours[impl] = float(trainer.compute_loss(trainer.model, h.copy_batch(batch)))
        oracle = h.batch_terms(trainer, batch)
    assert oracle.jsd > 1e-3
    assert stock == approx(oracle.jsd + sft_alpha * oracle.ce)  # the stock trainer does what we think
    assert ours["reference"] == approx(stock)
    assert ours["fused"] == approx(stock)


# --- Gradient accumulation and telemetry averaging -------------------------------------------------------


def _lora_grads(trainer) -> dict[str, torch.Tensor]:
    return {
        name: param.grad.detach().clone()
        for name, param in trainer.model.named_parameters()
        if "lora_" in name and param.grad is not None
    }


@pytest.fixture(scope="module")
def accumulation(anchor):
    """The same 4 samples (different token counts) as one batch of 4 with gradient accumulation 1, and as
    2 micro-batches of 2 with accumulation 2, both through the trainer's own ``_prepare_inputs``.

    Gradients use the default fused loss; the reference loss is compared on values (no backward: its
    [B, T, V] logits make that the slowest thing in this file)."""
    trainer = anchor
    rows = h.dataset_rows(trainer, [0, 1, 2, 3])
    out = {}
    with h.configured(trainer, kd_loss_impl="fused", gradient_accumulation_steps=1, steps_per_generation=1):
        whole = h.prepare(trainer, rows)
        assert whole["model_inputs"]["input_ids"].shape[0] == 4
        loss = trainer.compute_loss(trainer.model, whole)
        loss.backward()
        out["whole_loss"], out["whole_grads"] = float(loss.detach()), _lora_grads(trainer)
        trainer.anchor = h.use_settings(trainer, kd_loss_impl="reference")
        with torch.no_grad():
            out["whole_reference"] = float(trainer.compute_loss(trainer.model, whole))

    with h.configured(
        trainer, kd_loss_impl="reference", gradient_accumulation_steps=2, steps_per_generation=2
    ):
        micro = [trainer._prepare_inputs(rows), trainer._prepare_inputs(rows)]  # the 2nd from the buffer
        with torch.no_grad():
            out["micro_reference"] = [float(trainer.compute_loss(trainer.model, m)) for m in micro]
        h.reset(trainer)
        trainer.anchor = h.use_settings(trainer, kd_loss_impl="fused")
        out["micro_losses"] = []
        for batch in micro:
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
            out["micro_losses"].append(float(loss.detach()))
        out["micro_grads"] = _lora_grads(trainer)
        out["logs"] = h.log_now(trainer)
        out["terms"] = [h.batch_terms(trainer, batch) for batch in micro]
        out["micro"] = micro
    return out


def test_accumulation_does_not_change_loss(accumulation):
    """Batch 4 x GA 1 and batch 2 x GA 2 on the same samples: the summed micro-batch losses equal the
    full-batch loss and the LoRA gradients are equal."""
    micro, terms = accumulation["micro"], accumulation["terms"]
    tokens = [t.tokens for t in terms]
    assert [m["model_inputs"]["input_ids"].shape[0] for m in micro] == [2, 2]
    assert tokens[0] != tokens[1], "micro-batches must differ in token count"
    assert micro[0]["anchorkd_window_tokens"] == micro[1]["anchorkd_window_tokens"] == sum(tokens)

    whole = accumulation["whole_loss"]
    assert sum(accumulation["micro_losses"]) == approx(whole)
    assert sum(accumulation["micro_reference"]) == approx(accumulation["whole_reference"])
    assert accumulation["whole_reference"] == approx(whole)
    # averaging per-micro-batch means (what stock GKD does) would give a visibly different value
    means = [loss * sum(tokens) / n for loss, n in zip(accumulation["micro_losses"], tokens, strict=True)]
    assert abs(sum(means) / 2 - whole) > 1e-4 * abs(whole)

    grads_whole, grads_split = accumulation["whole_grads"], accumulation["micro_grads"]
    assert grads_whole.keys() == grads_split.keys() and len(grads_whole) > 0
    for name, grad in grads_whole.items():
        assert float(grad.norm()) > 0, name
        difference = float((grad - grads_split[name]).norm())
        assert difference <= REL * float(grad.norm()), name


def test_metrics_token_weighted_over_accumulation(accumulation):
    """Two accumulated micro-batches recorded, then one log: sft_loss and llm_kd_loss are token-weighted
    means over both (sum / total tokens), token_count is the sum."""
    logs, terms = accumulation["logs"], accumulation["terms"]
    total = sum(t.tokens for t in terms)
    assert logs["token_count"] == total
    assert logs["sft_loss"] == approx(
        0.3 * sum(t.ce_sum for t in terms) / total,
    )
    assert logs["llm_kd_loss"] == approx(
        0.5 * sum(t.jsd_sum for t in terms) / total,
    )
    plain_mean = 0.3 * (terms[0].ce + terms[1].ce) / 2
    assert abs(logs["sft_loss"] - plain_mean) > 1e-5 * plain_mean  # the weighting is observable
    assert 0.0 <= logs["token_accuracy"] <= 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reduce_metrics_all_reduces_sums_and_counts_under_torchrun(anchor):
    """The torchrun branch of ``reduce_metrics``: a 1-process gloo group gives the same token-weighted
    means as the single-process path (sums and counts are all-reduced, not means)."""
    trainer = anchor
    samples = [
        ("sft_loss", 2.0, 10),
        ("sft_loss", 5.0, 30),
        ("llm_kd_loss", 0.25, 10),
        ("llm_kd_loss", 1.0, 30),
    ]

    def record():
        for name, value, weight in samples:
            trainer._record_value("train", name, value, weight)
        seam.metric_store(trainer)["train"]["token_count"] += [10.0, 30.0]

    with h.configured(trainer):
        record()
        local = trainer.reduce_metrics("train")
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
        try:
            assert torch.distributed.is_initialized()
            record()
            distributed = trainer.reduce_metrics("train")
        finally:
            torch.distributed.destroy_process_group()
    expected = {
        "sft_loss": (2.0 * 10 + 5.0 * 30) / 40,
        "llm_kd_loss": (0.25 * 10 + 1.0 * 30) / 40,
        "token_count": 40,
    }
    assert local == approx(expected)
    assert distributed == approx(expected)
    assert not seam.metric_store(trainer)["train"] and not trainer._metric_weights["train"]


def test_nonfinite_term_logs_warning_naming_term_and_step(anchor, caplog):
    trainer = anchor
    with h.configured(trainer), caplog.at_level(logging.WARNING, logger="anchorkd"):
        saved_step = trainer.state.global_step
        try:
            trainer.state.global_step = 7
            trainer._record_value("train", "llm_kd_loss", float("nan"), 5)
            trainer._record_value("train", "llm_kd_loss", float("inf"), 5)  # same term, same step
            trainer._record_value("train", "sft_loss", 1.0, 5)  # finite: no warning
            trainer.state.global_step = 8
            trainer._record_value("train", "llm_kd_loss", float("nan"), 5)
            trainer._record_value("train", "vision_kd_loss", float("-inf"), 5)
        finally:
            trainer.state.global_step = saved_step
    messages = [
        r.getMessage() for r in caplog.records if r.name == "anchorkd" and r.levelno == logging.WARNING
    ]
    assert len(messages) == 3, messages
    assert "llm_kd_loss" in messages[0] and "step 7" in messages[0]
    assert "llm_kd_loss" in messages[1] and "step 8" in messages[1]
    assert "vision_kd_loss" in messages[2] and "step 8" in messages[2]
