"""A few real ms-swift SFT steps on the tiny model, through anchorkd's config loader and pipeline."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from anchorkd.config import RESOLVED_CONFIG_NAME, ConfigLoader
from anchorkd.trainers.pipeline import build_pipeline, resolve_trainer_cls

pytestmark = pytest.mark.integration
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def trained_stage_2(demo_workdir, quick_overrides, tmp_path_factory):
    """Stage 2 demo config (LoRA on the LLM, vision tower and aligner frozen), 3 steps of batch 2."""

    out = tmp_path_factory.mktemp("sft") / "run"
    cwd = os.getcwd()
    os.chdir(demo_workdir)
    try:
        loaded = ConfigLoader.load_training_config(
            CONFIGS_DIR / "demo" / "stage_2_llm_lora.yaml", quick_overrides(out, steps=3, batch=2)
        )
        ConfigLoader.write_resolved(loaded.config, loaded.train_args.output_dir)
        pipeline = build_pipeline(loaded)
        initial = {n: p.detach().clone() for n, p in pipeline.model.named_parameters()}
        result = pipeline.main()
    finally:
        os.chdir(cwd)
    return loaded, pipeline, initial, result, out


def test_vanilla_config_resolves_to_ms_swift_trainer(trained_stage_2):
    from swift.trainers import Seq2SeqTrainer

    loaded, pipeline, *_ = trained_stage_2
    assert resolve_trainer_cls(loaded) is Seq2SeqTrainer
    assert type(pipeline.trainer) is Seq2SeqTrainer


def test_sft_loss_is_finite_every_step(trained_stage_2):
    *_, out = trained_stage_2
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "global_step/max_steps" in r]
    assert [r["global_step/max_steps"] for r in steps] == ["1/3", "2/3", "3/3"]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert (out / RESOLVED_CONFIG_NAME).is_file()


def test_lora_parameters_changed_and_frozen_ones_did_not(trained_stage_2):
    _, pipeline, initial, *_ = trained_stage_2
    trained = dict(pipeline.trainer.model.named_parameters())
    lora = [n for n in trained if "lora_" in n]
    assert lora, "the stage-2 config must put LoRA adapters on the language model"
    assert all("visual" not in n for n in lora), "stage 2 keeps the vision tower free of LoRA"
    # peft starts every lora_B at zero, so a trained adapter is one whose B matrices moved off zero.
    assert any("lora_B" in n and trained[n].abs().sum() > 0 for n in lora)
    frozen = [n for n in trained if "lora_" not in n]
    assert not [n for n in frozen if trained[n].requires_grad]
    # `initial` was taken before LoRA wrapped the model: map the wrapped names back.
    unwrapped = {n: n.removeprefix("base_model.model.").replace(".base_layer", "") for n in frozen}
    assert set(unwrapped.values()) == set(initial)
    assert all(torch.equal(trained[n], initial[unwrapped[n]]) for n in frozen)
    assert any(".visual.merger." in n for n in frozen), "the aligner is frozen in stage 2"


def test_checkpoint_reloads_with_the_trained_adapter(trained_stage_2, tiny_model_dir):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    _, pipeline, _, result, out = trained_stage_2
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, checkpoint)
    reloaded_lora = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    trained_lora = {n: p for n, p in pipeline.trainer.model.named_parameters() if "lora_" in n}
    assert reloaded_lora.keys() == trained_lora.keys()
    assert all(torch.allclose(reloaded_lora[n], trained_lora[n]) for n in trained_lora)
