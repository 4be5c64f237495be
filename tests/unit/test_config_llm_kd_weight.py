"""Spec 003: the ``rlhf.llm_kd_weight`` knob and the KD teacher dependency, at the config loader.

Scenarios "Configurable LM-head KD weight" and "KD teacher dependency enforcement". A spy around the
ms-swift argument class records the keyword arguments its constructor receives, to prove that the
knob never reaches ms-swift and is attached afterwards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import anchorkd.config.loader as loader_module
from anchorkd.config import ConfigLoader


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "gkd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def gkd(tmp_path, tiny_model_dir, synthetic_data_dir) -> dict:
    """Forward-only GKD on the tiny model, teacher = the base checkpoint, LoRA student."""
    return {
        "model": {"model": str(tiny_model_dir), "model_type": "qwen3_vl", "torch_dtype": "float32"},
        "data": {"dataset": [str(synthetic_data_dir / "train.jsonl")]},
        "tuner": {"tuner_type": "lora", "target_modules": ["all-linear"]},
        "rlhf": {
            "rlhf_type": "gkd",
            "teacher_model": str(tiny_model_dir),
            "beta": 0.3,
            "sft_alpha": 0.7,
            "lmbda": 0.0,
            "seq_kd": False,
        },
        "custom": {"trainer_variant": "gkd_monitor"},
        "training": {"output_dir": str(tmp_path / "out"), "add_version": False},
    }


@dataclasses.dataclass
class Spy:
    calls: list  # (class name, kwargs) per constructor call


@pytest.fixture
def spy(monkeypatch) -> Spy:
    """Make ``loader._args_cls`` return recording subclasses of the real ms-swift argument classes."""
    from swift.arguments import RLHFArguments, SftArguments

    record = Spy(calls=[])

    class RecordingSft(SftArguments):
        def __init__(self, **kwargs):
            record.calls.append(("SftArguments", dict(kwargs)))
            super().__init__(**kwargs)

    class RecordingRLHF(RLHFArguments):
        def __init__(self, **kwargs):
            record.calls.append(("RLHFArguments", dict(kwargs)))
            super().__init__(**kwargs)

    monkeypatch.setattr(loader_module, "_args_cls", lambda rlhf: RecordingRLHF if rlhf else RecordingSft)
    return record


def test_llm_kd_weight_is_not_an_ms_swift_argument():
    # The premise of the scenarios: passing the knob to ms-swift would be a TypeError.
    from swift.arguments import RLHFArguments, SftArguments

    for cls in (SftArguments, RLHFArguments):
        assert "llm_kd_weight" not in {f.name for f in dataclasses.fields(cls)}


# --- Requirement: Configurable LM-head KD weight ----------------------------------------------------------


def test_default_weight_attachment(tmp_path, gkd, spy):
    assert "llm_kd_weight" not in gkd["rlhf"]
    config, train_args = ConfigLoader.load_training_config(
        write_config(tmp_path, gkd), create_output_dir=False
    )

    from swift.arguments import RLHFArguments

    assert isinstance(train_args, RLHFArguments)
    assert config.llm_kd_weight == 1.0
    assert train_args.llm_kd_weight == 1.0
    assert train_args.training_args.llm_kd_weight == 1.0
    assert [name for name, _ in spy.calls] == ["RLHFArguments"]
    _, kwargs = spy.calls[0]
    assert "llm_kd_weight" not in kwargs
    assert kwargs["rlhf_type"] == "gkd"


def test_default_weight_attachment_on_plain_sft(tmp_path, gkd, spy):
    del gkd["rlhf"]
    gkd["custom"] = {}
    _, train_args = ConfigLoader.load_training_config(write_config(tmp_path, gkd), create_output_dir=False)
    assert (train_args.llm_kd_weight, train_args.training_args.llm_kd_weight) == (1.0, 1.0)
    assert [name for name, _ in spy.calls] == ["SftArguments"]
    assert "llm_kd_weight" not in spy.calls[0][1]


def test_positive_weight_supplied(tmp_path, gkd, spy):
    gkd["rlhf"]["llm_kd_weight"] = 0.25
    config, train_args = ConfigLoader.load_training_config(
        write_config(tmp_path, gkd), create_output_dir=False
    )

    assert config.mode == "gkd"
    assert train_args.llm_kd_weight == 0.25
    assert train_args.training_args.llm_kd_weight == 0.25
    _, kwargs = spy.calls[0]
    assert "llm_kd_weight" not in kwargs
    # Other rlhf values flow unchanged into the constructor and out on the ms-swift objects.
    assert (kwargs["beta"], kwargs["sft_alpha"], kwargs["lmbda"]) == (0.3, 0.7, 0.0)
    assert kwargs["teacher_model"] == gkd["rlhf"]["teacher_model"]
    assert (train_args.beta, train_args.sft_alpha, train_args.lmbda) == (0.3, 0.7, 0.0)
    assert (train_args.training_args.beta, train_args.training_args.sft_alpha) == (0.3, 0.7)


def test_positive_weight_supplied_by_override(tmp_path, gkd, spy):
    _, train_args = ConfigLoader.load_training_config(
        write_config(tmp_path, gkd), ["rlhf.llm_kd_weight=2"], create_output_dir=False
    )
    assert train_args.llm_kd_weight == 2.0
    assert isinstance(train_args.llm_kd_weight, float)
    assert "llm_kd_weight" not in spy.calls[0][1]


def test_invalid_negative_weight(tmp_path, gkd, spy):
    gkd["rlhf"]["llm_kd_weight"] = -0.1
    result = None
    with pytest.raises(ValueError, match="non-negative") as info:
        result = ConfigLoader.load_training_config(write_config(tmp_path, gkd))
    assert result is None
    assert info.value.key_path == "rlhf.llm_kd_weight"
    assert "llm_kd_weight must be non-negative, got -0.1" in str(info.value)
    assert spy.calls == []  # no TrainArguments constructed
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (".nan", "must be finite"),
        (".inf", "must be finite"),
        ("-.inf", "must be finite"),
        ("high", "must be a number"),
        ("true", "must be a number"),
        ("'0.5'", "must be a number"),
    ],
)
def test_invalid_weight_values_are_rejected(tmp_path, gkd, text, expected):
    path = write_config(tmp_path, gkd)
    path.write_text(path.read_text().replace("rlhf:\n", f"rlhf:\n  llm_kd_weight: {text}\n"))
    with pytest.raises(ValueError) as info:
        ConfigLoader.resolve(path, check_files=False)
    assert info.value.key_path == "rlhf.llm_kd_weight"
    assert f"llm_kd_weight {expected}" in str(info.value)


@pytest.mark.parametrize(("text", "value"), [("0", 0.0), ("1", 1.0), ("0.5", 0.5), ("5e-1", 0.5)])
def test_valid_weight_values_are_floats(tmp_path, gkd, text, value):
    path = write_config(tmp_path, gkd)
    path.write_text(path.read_text().replace("rlhf:\n", f"rlhf:\n  llm_kd_weight: {text}\n"))
    config = ConfigLoader.resolve(path, check_files=False)
    assert config.llm_kd_weight == value
    assert type(config.llm_kd_weight) is float


# --- Requirement: KD teacher dependency enforcement ------------------------------------------------------


def test_teacher_required_when_lm_kd_requested(tmp_path, gkd, spy):
    gkd["rlhf"]["llm_kd_weight"] = 0.5
    del gkd["rlhf"]["teacher_model"]
    path = write_config(tmp_path, gkd)
    # Raised by the config rules themselves, before any file on disk is looked at ...
    with pytest.raises(ValueError) as info:
        ConfigLoader.resolve(path, check_files=False)
    assert info.value.key_path == "rlhf.teacher_model"
    assert "required when rlhf.llm_kd_weight > 0" in str(info.value)
    # ... and so before any ms-swift object or output dir exists.
    with pytest.raises(ValueError, match="rlhf.teacher_model"):
        ConfigLoader.load_training_config(path)
    assert spy.calls == []
    assert not (tmp_path / "out").exists()


def test_teacher_required_when_visual_kd_requested(tmp_path, gkd, spy):
    gkd["rlhf"]["llm_kd_weight"] = 0
    gkd["rlhf"]["teacher_model"] = ""
    gkd["tuner"]["freeze_aligner"] = False
    gkd["custom"]["visual_kd"] = {"enabled": True, "weight": 0.5}
    with pytest.raises(ValueError) as info:
        ConfigLoader.load_training_config(write_config(tmp_path, gkd))
    assert info.value.key_path == "rlhf.teacher_model"
    assert "required when custom.visual_kd.weight > 0" in str(info.value)
    assert spy.calls == []
    assert not (tmp_path / "out").exists()


def test_visual_kd_keeps_the_teacher_when_lm_kd_is_disabled(tmp_path, gkd, spy):
    gkd["rlhf"]["llm_kd_weight"] = 0
    gkd["tuner"]["freeze_aligner"] = False
    gkd["custom"]["visual_kd"] = {"enabled": True, "weight": 0.5}
    config, train_args = ConfigLoader.load_training_config(
        write_config(tmp_path, gkd), create_output_dir=False
    )

    from swift.arguments import RLHFArguments

    assert config.mode == "gkd"
    assert config.visual_kd_active and not config.lm_kd_active
    assert isinstance(train_args, RLHFArguments)
    assert train_args.llm_kd_weight == 0.0
    assert spy.calls[0][1]["teacher_model"] == gkd["rlhf"]["teacher_model"]


def test_teacher_skipped_when_kd_inactive(tmp_path, gkd, spy):
    gkd["rlhf"]["llm_kd_weight"] = 0
    gkd["custom"]["visual_kd"] = {"enabled": False, "weight": 0}
    config, train_args = ConfigLoader.load_training_config(
        write_config(tmp_path, gkd), create_output_dir=False
    )

    from swift.arguments import RLHFArguments, SftArguments

    assert config.mode == "sft"
    assert isinstance(train_args, SftArguments)
    assert not isinstance(train_args, RLHFArguments)
    assert not hasattr(train_args, "teacher_model")
    assert train_args.llm_kd_weight == 0
    assert train_args.training_args.llm_kd_weight == 0
    # The standard SFT path: no rlhf arguments at all reach ms-swift, and the SFT trainer is used.
    assert [name for name, _ in spy.calls] == ["SftArguments"]
    kwargs = spy.calls[0][1]
    assert not {"rlhf_type", "teacher_model", "beta", "sft_alpha", "llm_kd_weight"} & set(kwargs)
    assert config.sections["rlhf"] == {}
    assert config.custom.trainer_variant == "default"
