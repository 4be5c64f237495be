"""``--adapter-scale`` on the real tiny Qwen3-VL: the scaled adapter is the merged scaled adapter.

WiSE-FT-style interpolation: scale S makes every LoRA layer add ``S * (alpha / r) * B @ A``, which is
the adapter with its B matrices multiplied by S. The reference here is built the other way round, with
PEFT alone: B scaled in place, then merged into the base weights (``merge_and_unload``).
"""

from __future__ import annotations

import json

import pytest

from anchorkd import cli
from anchorkd.eval.model import load_model

pytestmark = pytest.mark.integration

# Merged and unmerged float32 weights differ by rounding (about 1e-6 here); the adapter moves the
# logits by far more than TOLERANCE (asserted below), so a wrong scale cannot pass.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def lora_adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model's attention, with non-zero B so that it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    out = tmp_path_factory.mktemp("adapters") / "lora"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def input_ids():
    import torch

    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


def logits_of(model, input_ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=input_ids.to(model.device)).logits.float().cpu()


def merged_scaled_adapter_logits(tiny_model_dir, adapter_dir, scale, input_ids):
    """The base loaded as evaluation loads it, the adapter applied by PEFT with B * scale, merged."""
    import torch
    from peft import PeftModel

    base = load_model(tiny_model_dir, torch_dtype="float32").engine.model
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return logits_of(merged, input_ids)


@pytest.fixture(scope="module")
def base_logits(tiny_model_dir, input_ids):
    return logits_of(load_model(tiny_model_dir, torch_dtype="float32").engine.model, input_ids)


@pytest.fixture(scope="module")
def adapter_logits(tiny_model_dir, lora_adapter_dir, input_ids):
    """The adapter as trained (no --adapter-scale)."""
    loaded = load_model(tiny_model_dir, lora_adapter_dir, torch_dtype="float32")
    assert loaded.adapter_scale == 1.0
    return logits_of(loaded.engine.model, input_ids)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 1.5])
def test_scaled_adapter_equals_the_merged_scaled_adapter(
    tiny_model_dir, lora_adapter_dir, input_ids, base_logits, adapter_logits, scale
):
    import torch

    loaded = load_model(tiny_model_dir, lora_adapter_dir, torch_dtype="float32", adapter_scale=scale)
    scaled = logits_of(loaded.engine.model, input_ids)
    expected = merged_scaled_adapter_logits(tiny_model_dir, lora_adapter_dir, scale, input_ids)

    torch.testing.assert_close(scaled, expected, rtol=0, atol=TOLERANCE)
    assert loaded.describe()["adapter_scale"] == scale
    # The adapter matters: the base and the full adapter are far apart, so each scale is told apart.
    assert (adapter_logits - base_logits).abs().max() > 100 * TOLERANCE
    if scale == 0.0:
        torch.testing.assert_close(scaled, base_logits, rtol=0, atol=TOLERANCE)
    if scale == 1.0:
        torch.testing.assert_close(scaled, adapter_logits, rtol=0, atol=TOLERANCE)
    if scale == 0.5:
        # Halfway in weight space; the logits are not halfway (attention is not linear), but strictly
        # between: farther from each end than rounding.
        assert (scaled - base_logits).abs().max() > 10 * TOLERANCE
        assert (scaled - adapter_logits).abs().max() > 10 * TOLERANCE


def test_eval_generate_and_text_record_the_scale(
    tmp_path, tiny_model_dir, synthetic_data_dir, lora_adapter_dir
):
    out = tmp_path / "half"
    model_args = [
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(lora_adapter_dir),
        "--adapter-scale",
        "0.5",
    ]
    data = str(synthetic_data_dir / "eval_outdoor.jsonl")
    generate = ["eval", "generate", *model_args, "--data", data, "--out", str(out)]
    assert cli.main([*generate, "--limit", "2", "--max-new-tokens", "8"]) == 0

    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and all(g["caption"].strip() for g in generations)
    settings = json.loads((out / "generation_settings.json").read_text())
    assert (settings["adapter"], settings["adapter_scale"]) == (str(lora_adapter_dir.resolve()), 0.5)

    # At scale 0 the text perplexity is the base's: the base is measured, not taken for the same model.
    text = ["eval", "text", "--model", str(tiny_model_dir), "--adapter", str(lora_adapter_dir)]
    text_data = ["--data", str(synthetic_data_dir / "text_eval.jsonl"), "--base", str(tiny_model_dir)]
    zero = tmp_path / "zero"
    assert cli.main([*text, "--adapter-scale", "0", *text_data, "--out", str(zero)]) == 0
    document = json.loads((zero / "text_eval.json").read_text())
    assert document["adapter_scale"] == 0.0
    assert document["base"]["source"] == "measured"
    assert document["ppl"] == pytest.approx(document["base"]["ppl"], rel=1e-5)

    assert cli.main(["eval", "score", "--generations", str(out / "generations.jsonl")]) == 0
    report = tmp_path / "report"
    assert (
        cli.main(["eval", "compare", "--run", f"half={out}", "--base-name", "half", "--out", str(report)])
        == 0
    )
    runs = json.loads((report / "report.json").read_text())["runs"]
    assert runs["half"]["adapter_scale"] == 0.5
