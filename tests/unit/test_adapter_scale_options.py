"""``--adapter-scale``: what is refused before any model is loaded, and how compare shows the scale.

That the scaled adapter equals the merged scaled adapter is checked on the real tiny model in
tests/integration/test_adapter_scale.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from anchorkd import cli
from anchorkd.errors import ConfigError, DataError
from anchorkd.eval.compare import compare_runs, recorded_adapter_scale
from anchorkd.eval.model import LoadedModel, as_loaded_model, load_model, require_scalable_adapter

LORA_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "modules_to_save": [], "use_dora": False}


def make_adapter(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A folder that passes the checkpoint check (config.json); loading it would fail, so a test that
    reaches the loader fails loudly instead of passing by accident."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def chat_file(tmp_path) -> Path:
    path = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]}
    path.write_text(json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "is not a LoRA adapter (PREFIX_TUNING)"),
        ({"swift_type": "LLAMAPRO"}, "is not a LoRA adapter (LLAMAPRO)"),
        (LORA_CONFIG | {"use_dora": True}, "is a DoRA adapter"),
        (LORA_CONFIG | {"modules_to_save": ["lm_head"]}, "also trains whole modules (modules_to_save)"),
    ],
)
def test_only_a_plain_lora_adapter_can_be_scaled(tmp_path, checkpoint, config, message):
    adapter = make_adapter(tmp_path / "adapter", config)
    with pytest.raises(ConfigError) as error:
        load_model(checkpoint, adapter, adapter_scale=0.5)
    assert error.value.key_path == "--adapter-scale" and message in str(error.value)


@pytest.mark.parametrize("scale", [-0.5, math.nan, math.inf, "0.5"])
def test_the_scale_must_be_a_finite_number_at_least_zero(tmp_path, scale):
    adapter = make_adapter(tmp_path / "adapter", LORA_CONFIG)
    with pytest.raises(ConfigError, match="must be a finite number >= 0"):
        require_scalable_adapter(adapter, scale)


def test_a_plain_lora_adapter_passes_at_any_scale_at_least_zero(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", LORA_CONFIG)
    for scale in (0, 0.25, 1.0, 2.0):
        require_scalable_adapter(adapter, scale)


def test_a_scale_without_an_adapter_is_refused(checkpoint):
    with pytest.raises(ConfigError, match="scales a LoRA adapter: give one with --adapter"):
        load_model(checkpoint, None, adapter_scale=1.0)
    loaded = LoadedModel(engine=None, model=checkpoint, adapter=None, model_type="qwen3_vl")
    with pytest.raises(ConfigError, match="already loaded; pass the scale to load_model"):
        as_loaded_model(loaded, None, adapter_scale=0.5)
    assert as_loaded_model(loaded, None, adapter_scale=None) is loaded


@pytest.mark.parametrize("step", ["generate", "text"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "half"])
def test_cli_refuses_a_bad_scale_with_exit_2(tmp_path, checkpoint, chat_file, step, value, capsys):
    adapter = make_adapter(tmp_path / "adapter", LORA_CONFIG)
    out = tmp_path / "out"
    args = ["eval", step, "--model", str(checkpoint), "--adapter", str(adapter)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--adapter-scale", value, "--data", str(chat_file), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--adapter-scale" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("step", ["generate", "text"])
def test_cli_refuses_a_scale_without_adapter_or_on_a_non_lora_one(
    tmp_path, checkpoint, chat_file, step, capsys
):
    out = tmp_path / "out"
    args = ["eval", step, "--model", str(checkpoint), "--data", str(chat_file), "--out", str(out)]
    assert cli.main([*args, "--adapter-scale", "0.5"]) == 2
    assert "--adapter-scale: scales a LoRA adapter" in capsys.readouterr().err

    prefix = make_adapter(tmp_path / "prefix", {"peft_type": "PREFIX_TUNING"})
    assert cli.main([*args, "--adapter", str(prefix), "--adapter-scale", "0.5"]) == 2
    assert "is not a LoRA adapter" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------- the recorded scale


def eval_folder(folder: Path, generation_scale=None, text_scale=None) -> Path:
    folder.mkdir(parents=True)
    summary = {"indomain_f1": 0.5, "ood_domain_object_rate": 0.1}
    (folder / "scores.json").write_text(json.dumps({"summary": summary, "groups": {}}))
    if generation_scale is not None:
        settings = {"adapter": "/a", "adapter_scale": generation_scale}
        (folder / "generation_settings.json").write_text(json.dumps(settings))
    if text_scale is not None:
        text_eval = {"ppl": 10.0, "nll": math.log(10.0), "tokens": 5, "adapter_scale": text_scale}
        (folder / "text_eval.json").write_text(json.dumps(text_eval))
    return folder


def test_compare_lists_the_adapter_scale_of_each_run(tmp_path):
    runs = {
        "base": eval_folder(tmp_path / "base"),
        "sft": eval_folder(tmp_path / "sft", 1.0, 1.0),
        "sft_x0.5": eval_folder(tmp_path / "half", 0.5, 0.5),
        "text_only": eval_folder(tmp_path / "text_only", None, 0.25),
    }
    metrics = compare_runs(runs, tmp_path / "report")

    assert "adapter_scale" not in metrics["base"]
    assert [metrics[name]["adapter_scale"] for name in ("sft", "sft_x0.5", "text_only")] == [1.0, 0.5, 0.25]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| `adapter_scale` | n/a | 1 | 0.5 | 0.25 |" in markdown


def test_a_folder_made_at_two_scales_is_refused(tmp_path):
    folder = eval_folder(tmp_path / "mixed", 0.5, 1.0)
    text_eval = json.loads((folder / "text_eval.json").read_text())
    with pytest.raises(DataError, match=r"different adapter scales \(generation_settings.json: 0.5"):
        recorded_adapter_scale(folder, text_eval)
    with pytest.raises(DataError, match="different adapter scales"):
        compare_runs({"base": eval_folder(tmp_path / "base"), "mixed": folder}, tmp_path / "report")
    assert not (tmp_path / "report").exists()
