"""GKD modes (forward-only, on-policy sampling) and the teacher loading rules (seq_kd: test_seq_kd.py).

- forward-only (lmbda 0) warns once that the sampling knobs do nothing;
- on-policy (lmbda 1) samples completions with the student from image prompts and trains on them;
- teacher = the student's base with LoRA disabled when only LoRA trains (stage 2), a separate frozen copy
  when more than LoRA may train (stage 3), base + adapter with ``rlhf.teacher_adapters``.
"""

from __future__ import annotations

import logging
import math

import gkd_harness as h
import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from anchorkd.config import ConfigError, ConfigLoader

pytestmark = pytest.mark.integration

FORWARD_ONLY_KNOBS = ("max_completion_length", "temperature")


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def anchor_built(env):
    return h.anchor_build(env)


@pytest.fixture(scope="module")
def adapter(env, anchor_built):
    """A PEFT LoRA adapter for the tiny model: the anchor trainer's perturbed LoRA, saved once."""
    return h.save_adapter(anchor_built.trainer, env.work / "perturbed-adapter")


def _count_models(*roots) -> int:
    seen = set()
    for root in roots:
        if root is None:
            continue
        for module in root.modules():
            if isinstance(module, Qwen3VLForConditionalGeneration):
                seen.add(id(module))
    return len(seen)


# --- modes -----------------------------------------------------------------------------------------------


def test_forward_only_warns_once_about_generation_knobs(anchor_built):
    """lmbda 0: building the trainer logs exactly one warning, naming max_completion_length and
    temperature (the knobs that only matter when the student samples)."""
    assert anchor_built.trainer.lmbda == 0
    warnings = [r.getMessage() for r in anchor_built.init_records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert all(knob in warnings[0] for knob in FORWARD_ONLY_KNOBS)


def test_on_policy_sampling_with_images(env, adapter, caplog):
    """lmbda 1: ms-swift samples completions (at most 8 tokens) with the student from the image prompts and
    the KD loss trains on them; the run finishes with finite telemetry. Student-sampled batches carry no
    ground-truth CE (sft_loss 0), which shows the batch really came from the student."""
    extra = (
        "rlhf.lmbda=1.0",
        "rlhf.max_completion_length=8",
        f"tuner.adapters=[{adapter}]",  # student != base teacher, so the KD term is non-zero
        "training.save_strategy=no",
    )
    overrides = env.overrides("on-policy", steps=1, batch=1, extra=extra)
    with caplog.at_level(logging.WARNING, logger="anchorkd"):
        summary = h.run_training(h.STAGE2_GKD_DEMO, overrides)
    assert summary["mode"] == "gkd" and summary["global_step"] == 1
    forward_only = [r for r in caplog.records if r.name == "anchorkd" and "lmbda=0" in r.getMessage()]
    assert not forward_only
    (record,) = h.step_records(summary["logging_jsonl"])
    for key in ("loss", "sft_loss", "llm_kd_loss", "token_accuracy", "token_count"):
        assert math.isfinite(record[key]), (key, record)
    assert record["sft_loss"] == 0.0
    assert record["llm_kd_loss"] > 0
    assert 1 <= record["token_count"] <= 8 + 1  # sampled tokens (+ the end-of-turn token, if appended)
    assert record["loss"] == pytest.approx(record["llm_kd_loss"], rel=1e-4)


# --- teacher loading rules -------------------------------------------------------------------------------


def test_base_anchor_teacher_when_only_lora_trains(anchor_built):
    """Stage 2 (only LoRA trains, teacher == model): the teacher is the student with its adapter disabled;
    no second copy of the weights exists, and that teacher is exactly the base (LoRA B = 0)."""
    trainer, pipeline = anchor_built.trainer, anchor_built.pipeline
    assert anchor_built.settings.anchor.teacher_mode == "base_anchor"
    assert trainer.teacher_mode == "base_anchor"
    assert trainer.teacher_model is None and getattr(pipeline, "teacher_model", None) is None
    assert trainer._teacher_use_disable_adapter
    assert _count_models(trainer.model, trainer.teacher_model) == 1

    batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
    anchored = h.teacher_logits(trainer, batch)
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    saved = {n: p.detach().clone() for n, p in lora_b.items()}
    try:
        with torch.no_grad():
            for p in lora_b.values():
                p.zero_()
        base = h.student_logits(trainer, batch)
    finally:
        with torch.no_grad():
            for n, p in lora_b.items():
                p.copy_(saved[n])
    assert torch.allclose(anchored, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(h.student_logits(trainer, batch), base, rtol=1e-3, atol=1e-3)


def test_separate_frozen_teacher_copy(env):
    """A teacher given as another folder is loaded as a separate frozen copy, sharing no storage."""
    built = h.visual_build(env)
    trainer = built.trainer
    assert built.settings.anchor.teacher_mode == "separate"
    assert trainer.teacher_mode == "separate" and not trainer._teacher_use_disable_adapter
    teacher = trainer.teacher_model
    assert isinstance(teacher, Qwen3VLForConditionalGeneration) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    student_storage = {p.data_ptr() for p in trainer.model.parameters()}
    assert not student_storage & {p.data_ptr() for p in teacher.parameters()}
    assert _count_models(trainer.model, teacher) == 2
    # the copy is the base checkpoint: the student with every adapter disabled computes the same logits
    batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
    with torch.no_grad(), h.unwrap(trainer).disable_adapter():
        base = trainer.model(**h.forward_inputs(batch["model_inputs"])).logits
    assert torch.allclose(h.teacher_logits(trainer, batch), base, rtol=1e-5, atol=1e-5)


def test_teacher_adapters_load_base_plus_adapter(env, anchor_built, adapter):
    """rlhf.teacher_adapters: a separate teacher = base + that LoRA adapter (not the plain base)."""
    built = h.adapter_teacher_build(env, adapter)
    trainer = built.trainer
    assert built.settings.anchor.teacher_mode == "separate" and trainer.teacher_mode == "separate"
    assert trainer.teacher_model is not None
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())

    batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
    teacher = h.teacher_logits(trainer, batch)
    plain_base = h.student_logits(trainer, batch)  # fresh LoRA (B = 0): the student is the plain base
    assert not torch.allclose(teacher, plain_base, rtol=1e-3, atol=1e-3)
    # the anchor trainer's student is base + the same adapter, with its LM head scaled (logits scale too)
    anchor = anchor_built.trainer
    expected = h.student_logits(anchor, batch) / h.LM_HEAD_SCALE
    assert torch.allclose(teacher, expected, rtol=1e-4, atol=1e-5)


def test_stage3_lora_keeps_the_base_anchor(env):
    """With LoRA the aligner trains through LoRA adapters only, so the adapter-disabled student is the
    exact base: no second copy, even with freeze_aligner false."""
    config = h.write_stage3_gkd_config(env.work / "configs")
    with h.preserved_environment():
        loaded = ConfigLoader.load_training_config(
            config, env.overrides("stage3-anchor"), create_output_dir=False
        )
    assert loaded.config.sections["tuner"]["freeze_aligner"] is False
    assert loaded.anchor.teacher_mode == "base_anchor"
    assert loaded.train_args._teacher_use_disable_adapter and loaded.train_args.teacher_model is None


def test_weights_trained_outside_lora_get_a_frozen_teacher_copy(env):
    config = h.write_stage3_gkd_config(env.work / "configs")
    with h.preserved_environment():
        loaded = ConfigLoader.load_training_config(
            config,
            env.overrides("stage3-copy", extra=("tuner.modules_to_save=[lm_head]",)),
            create_output_dir=False,
        )
    assert loaded.anchor.teacher_mode == "separate"
    assert not loaded.train_args._teacher_use_disable_adapter
    assert loaded.train_args.teacher_model == loaded.config.sections["model"]["model"]
    assert loaded.train_args.teacher_model_type == loaded.train_args.model_type == "qwen3_vl"


# --- what gkd_monitor refuses instead of computing a wrong loss ------------------------------------------


def test_teacher_side_prompt_that_moves_tokens_is_rejected(anchor_built):
    """ms-swift OPSD rows (teacher_prompt) give the teacher its own encoding; when that shifts the response
    tokens, gkd_monitor refuses the batch with a clear error instead of comparing misaligned positions.
    Stock ms-swift aligns them by its masks; its loss stays finite on the same batch."""
    from swift.rlhf_trainers import GKDTrainer

    trainer = anchor_built.trainer
    row = dict(h.dataset_rows(trainer, [0])[0])
    row["teacher_prompt"] = "<image>List every object in this rack photo with its bounding box, please."
    with h.configured(trainer):
        batch = h.prepare(trainer, [row])
        student_ids, teacher_ids = (
            batch["model_inputs"]["input_ids"],
            batch["teacher_model_inputs"]["input_ids"],
        )
        assert teacher_ids.shape[1] != student_ids.shape[1]  # the teacher's prompt has another length
        with torch.no_grad():
            assert math.isfinite(float(GKDTrainer.compute_loss(trainer, trainer.model, h.copy_batch(batch))))
            with pytest.raises(ConfigError) as error:
                trainer.compute_loss(trainer.model, batch)
        assert error.value.key_path == "data.dataset" and "teacher_prompt" in str(error.value)
        with h.configured(trainer, llm_kd_weight=0.0), torch.no_grad():  # no KD: the teacher is not used
            assert float(trainer.compute_loss(trainer.model, batch)) == pytest.approx(
                h.ce_only(trainer, batch)
            )
