"""ConfigLoader rules: one test per rule, each with a config that passes and one that breaks the rule.

Rule tests use ``ConfigLoader.resolve`` (no ms-swift objects are built); the tests about what is written
on disk build the real ms-swift arguments with ``load_training_config``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from anchorkd.config import ConfigError, ConfigErrors, ConfigLoader, DataError

TB_ENV = "TENSORBOARD_LOGGING_DIR"


def write_config(tmp_path: Path, config: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def sft_config(tiny_model_dir: Path, synthetic_data_dir: Path, output_dir: Path) -> dict:
    return {
        "model": {"model": str(tiny_model_dir), "model_type": "qwen3_vl", "torch_dtype": "float32"},
        "data": {"dataset": [str(synthetic_data_dir / "train.jsonl")]},
        "tuner": {"tuner_type": "lora"},
        "training": {"output_dir": str(output_dir)},
    }


def gkd_config(tiny_model_dir: Path, synthetic_data_dir: Path, output_dir: Path) -> dict:
    config = sft_config(tiny_model_dir, synthetic_data_dir, output_dir)
    config["rlhf"] = {"rlhf_type": "gkd", "teacher_model": str(tiny_model_dir), "beta": 0.1, "lmbda": 0.0}
    return config


def visual_kd_config(tiny_model_dir: Path, synthetic_data_dir: Path, output_dir: Path) -> dict:
    config = gkd_config(tiny_model_dir, synthetic_data_dir, output_dir)
    config["tuner"]["freeze_aligner"] = False
    config["custom"] = {"trainer_variant": "gkd_monitor", "visual_kd": {"enabled": True, "weight": 0.5}}
    return config


@pytest.fixture
def sft(tmp_path, tiny_model_dir, synthetic_data_dir) -> dict:
    return sft_config(tiny_model_dir, synthetic_data_dir, tmp_path / "out")


@pytest.fixture
def gkd(tmp_path, tiny_model_dir, synthetic_data_dir) -> dict:
    return gkd_config(tiny_model_dir, synthetic_data_dir, tmp_path / "out")


@pytest.fixture
def visual(tmp_path, tiny_model_dir, synthetic_data_dir) -> dict:
    return visual_kd_config(tiny_model_dir, synthetic_data_dir, tmp_path / "out")


def resolve(tmp_path, config, overrides=(), check_files=False):
    return ConfigLoader.resolve(write_config(tmp_path, config), overrides, check_files=check_files)


def rule_error(tmp_path, config, overrides=(), check_files=False) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        resolve(tmp_path, config, overrides, check_files)
    return info.value


def key_paths(error: ConfigError) -> list[str]:
    return [e.key_path for e in error.errors] if isinstance(error, ConfigErrors) else [error.key_path]


# --- a plain config -----------------------------------------------------------------------------------


def test_minimal_sft_config_resolves_to_sft_with_defaults(tmp_path, sft, tiny_model_dir, synthetic_data_dir):
    config = resolve(tmp_path, sft, check_files=True)
    assert config.mode == "sft"
    assert config.llm_kd_weight == 1.0
    assert config.custom.trainer_variant == "default"
    assert config.custom.visual_kd.enabled is False
    assert not config.visual_kd_active and not config.lm_kd_active
    assert config.sections["model"]["model"] == str(tiny_model_dir)
    assert config.sources == ((tmp_path / "run.yaml").resolve(),)
    kwargs = config.swift_kwargs()
    assert kwargs["dataset"] == [str(synthetic_data_dir / "train.jsonl")]
    assert kwargs["tuner_type"] == "lora"
    assert "llm_kd_weight" not in kwargs


def test_errors_name_the_config_file(tmp_path, sft):
    sft["training"]["learning_rat"] = 1
    error = rule_error(tmp_path, sft)
    assert error.source == str((tmp_path / "run.yaml").resolve())
    assert f"training.learning_rat (in {(tmp_path / 'run.yaml').resolve()})" in str(error)


def test_several_errors_are_reported_together(tmp_path, sft):
    sft["training"].update({"learning_rat": 1, "num_train_epochs": "many"})
    error = rule_error(tmp_path, sft)
    assert isinstance(error, ConfigErrors)
    assert key_paths(error) == ["training.learning_rat", "training.num_train_epochs"]
    assert "learning_rat" in str(error) and "num_train_epochs" in str(error)


# --- sections -----------------------------------------------------------------------------------------


def test_unknown_top_level_section_suggests_the_closest(tmp_path, sft):
    resolve(tmp_path, sft)
    sft["modle"] = sft.pop("model")
    error = rule_error(tmp_path, sft)
    assert "modle" in key_paths(error)
    assert "unknown section; valid sections: model, data, template, tuner, training, rlhf, custom" in str(
        error
    )
    assert "(did you mean model?)" in str(error)


def test_ms_swift_key_at_top_level_says_which_section_to_move_it_to(tmp_path, sft):
    sft["learning_rate"] = 1e-4
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["learning_rate"]
    assert "ms-swift keys go inside a section: move it to training.learning_rate" in str(error)


@pytest.mark.parametrize(
    ("section", "value", "kind"),
    [("training", [1], "list"), ("tuner", 3, "int"), ("training", [], "list"), ("custom", False, "bool")],
)
def test_section_must_be_a_mapping(tmp_path, sft, section, value, kind):
    sft[section] = value
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == [section]
    assert f"must be a mapping, got {kind}" in str(error)


def test_empty_section_is_allowed(tmp_path, sft):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(sft) + "template:\ncustom:\n")
    config = ConfigLoader.resolve(path, check_files=False)
    assert config.sections["template"] == {}
    assert config.custom.trainer_variant == "default"


# --- ms-swift keys -----------------------------------------------------------------------------------


def test_unknown_ms_swift_key_lists_the_closest_names(tmp_path, sft):
    sft["training"]["learning_rate"] = 1e-3
    assert resolve(tmp_path, sft).sections["training"]["learning_rate"] == 1e-3
    del sft["training"]["learning_rate"]
    sft["training"]["learning_rat"] = 1e-3
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["training.learning_rat"]
    assert "unknown ms-swift argument 'learning_rat'; did you mean: learning_rate" in str(error)


def test_ms_swift_key_in_the_wrong_section_says_where_it_belongs(tmp_path, sft):
    sft["tuner"]["lora_rank"] = 4
    assert resolve(tmp_path, sft).sections["tuner"]["lora_rank"] == 4
    sft["training"]["lora_rank"] = sft["tuner"].pop("lora_rank")
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["training.lora_rank"]
    assert "'lora_rank' belongs under the 'tuner' section (tuner.lora_rank)" in str(error)


@pytest.mark.parametrize(
    ("key", "bad", "expected"),
    [
        ("learning_rate", "fast", "invalid value 'fast': expected Optional[float]"),
        ("num_train_epochs", [1], "invalid value [1]: expected float"),
    ],
)
def test_ms_swift_value_must_have_the_declared_type(tmp_path, sft, key, bad, expected):
    sft["training"][key] = bad
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == [f"training.{key}"]
    assert expected in str(error)


def test_ms_swift_values_are_coerced_to_the_declared_type(tmp_path, sft):
    sft["training"].update({"learning_rate": "2e-4", "num_train_epochs": 2})
    config = resolve(tmp_path, sft, ["training.max_steps=1e1"])
    assert config.sections["training"]["learning_rate"] == pytest.approx(2e-4)
    assert config.sections["training"]["num_train_epochs"] == 2.0
    assert config.sections["training"]["max_steps"] == 10
    assert type(config.sections["training"]["max_steps"]) is int


def test_list_argument_accepts_a_single_value(tmp_path, sft):
    sft["tuner"]["target_modules"] = "all-linear"
    assert resolve(tmp_path, sft).sections["tuner"]["target_modules"] == ["all-linear"]
    sft["tuner"]["target_modules"] = ["q_proj", "v_proj"]
    assert resolve(tmp_path, sft).sections["tuner"]["target_modules"] == ["q_proj", "v_proj"]
    sft["tuner"]["target_modules"] = {"q_proj": 1}
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["tuner.target_modules"]


def test_model_model_is_required(tmp_path, sft):
    del sft["model"]["model"]
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["model.model"]
    assert "required: the base checkpoint path" in str(error)


def test_data_dataset_is_required(tmp_path, sft):
    sft["data"]["dataset"] = []
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["data.dataset"]
    assert "required: at least one training data file" in str(error)


# --- custom section -----------------------------------------------------------------------------------


def test_custom_section_rejects_unknown_keys_and_lists_the_valid_ones(tmp_path, sft):
    sft["custom"] = {"kd_loss_impl": "reference", "kd_chunk_size": 64}
    config = resolve(tmp_path, sft)
    assert (config.custom.kd_loss_impl, config.custom.kd_chunk_size) == ("reference", 64)

    sft["custom"] = {"kd_loss": "reference"}
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["custom.kd_loss"]
    assert (
        "unknown key; valid keys here: anchor, kd_chunk_size, kd_loss_impl, monitor, teacher_cache, "
        "teacher_targets, trainer_variant, visual_kd" in str(error)
    )

    sft["custom"] = {"visual_kd": {"wieght": 0.5}}
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["custom.visual_kd.wieght"]
    assert "unknown key; valid keys here: distance, enabled, targets, weight" in str(error)


def test_custom_values_are_type_checked(tmp_path, sft):
    sft["custom"] = {"kd_chunk_size": 0, "kd_loss_impl": "fast"}
    error = rule_error(tmp_path, sft)
    assert sorted(key_paths(error)) == ["custom.kd_chunk_size", "custom.kd_loss_impl"]
    assert "Input should be 'fused' or 'reference'" in str(error)


def test_custom_monitor_thresholds_are_checked(tmp_path, sft):
    sft["custom"] = {"monitor": {"enabled": False, "kd_spike_factor": 4.0}}
    monitor = resolve(tmp_path, sft).custom.monitor
    assert (monitor.enabled, monitor.kd_spike_factor, monitor.kd_spike_window) == (False, 4.0, 20)

    sft["custom"] = {"monitor": {"kd_spike_factor": 0.5, "kd_spike_windw": 5}}
    error = rule_error(tmp_path, sft)
    assert sorted(key_paths(error)) == ["custom.monitor.kd_spike_factor", "custom.monitor.kd_spike_windw"]
    assert "Input should be greater than 1" in str(error)
    assert "unknown key; valid keys here: enabled, kd_spike_factor," in str(error)


def test_gkd_monitor_requires_rlhf_type_gkd(tmp_path, gkd, sft):
    gkd["custom"] = {"trainer_variant": "gkd_monitor"}
    assert resolve(tmp_path, gkd).custom.trainer_variant == "gkd_monitor"

    sft["custom"] = {"trainer_variant": "gkd_monitor"}
    error = rule_error(tmp_path, sft)
    assert key_paths(error) == ["custom.trainer_variant"]
    assert "gkd_monitor requires rlhf.rlhf_type: gkd" in str(error)


@pytest.mark.parametrize("key", ["beta", "lmbda", "temperature"])  # RLHF-only keys and a shared one
def test_rlhf_keys_need_rlhf_type(tmp_path, gkd, key):
    gkd["rlhf"][key] = 0.5
    assert resolve(tmp_path, gkd).sections["rlhf"][key] == 0.5

    gkd["rlhf"] = {key: 0.5}
    error = rule_error(tmp_path, gkd)
    assert key_paths(error) == [f"rlhf.{key}"]
    assert "needs rlhf.rlhf_type (e.g. rlhf_type: gkd)" in str(error)


def test_seq_kd_is_anchorkds_and_never_reaches_ms_swift(tmp_path, gkd, clean_tb_env):
    """ms-swift 4.6.0 raises NotImplementedError for its own seq_kd: anchorkd keeps the knob (like
    llm_kd_weight) and its trainer never sees it, so neither ms-swift nor TRL generates anything per step."""
    gkd["rlhf"]["seq_kd"] = False
    assert resolve(tmp_path, gkd).seq_kd is False

    gkd["rlhf"]["seq_kd"] = True
    settings = ConfigLoader.load_training_config(write_config(tmp_path, gkd), create_output_dir=False)
    assert settings.config.seq_kd is True and settings.anchor.seq_kd is True
    assert settings.train_args.seq_kd is False
    assert settings.train_args.training_args.seq_kd is False
    assert "seq_kd: true" in settings.config.to_yaml()


def test_seq_kd_needs_a_local_teacher_checkpoint(tmp_path, gkd, monkeypatch):
    monkeypatch.setenv("ANCHORKD_ALLOW_NETWORK", "1")  # a hub id would otherwise be fine: ms-swift fetches it
    gkd["rlhf"]["teacher_model"] = "Qwen/Qwen3-VL-4B-Instruct"
    assert resolve(tmp_path, gkd, check_files=True).mode == "gkd"
    gkd["rlhf"]["seq_kd"] = True
    error = rule_error(tmp_path, gkd, check_files=True)
    assert key_paths(error) == ["rlhf.teacher_model"]
    assert "seq_kd generates the targets with a local teacher checkpoint" in str(error)


# --- visual KD ------------------------------------------------------------------------------------------


def test_visual_kd_config_resolves_to_gkd(tmp_path, visual):
    config = resolve(tmp_path, visual)
    assert config.mode == "gkd"
    assert config.visual_kd_active
    assert config.custom.visual_kd.targets == ["merger", "deepstack"]
    assert config.custom.visual_kd.distance == "mse"


def test_visual_kd_enabled_needs_a_positive_weight(tmp_path, visual):
    visual["custom"]["visual_kd"]["weight"] = 0
    error = rule_error(tmp_path, visual)
    assert key_paths(error) == ["custom.visual_kd"]
    assert "visual_kd.enabled is true but visual_kd.weight is 0" in str(error)


def test_visual_kd_weight_needs_enabled(tmp_path, visual):
    visual["custom"]["visual_kd"]["enabled"] = False
    error = rule_error(tmp_path, visual)
    assert key_paths(error) == ["custom.visual_kd"]
    assert "visual_kd.weight is 0.5 but visual_kd.enabled is false" in str(error)


@pytest.mark.parametrize("weight", [-0.5, "high", True, float("nan")])
def test_visual_kd_weight_must_be_a_non_negative_number(tmp_path, visual, weight):
    visual["custom"]["visual_kd"]["weight"] = weight
    error = rule_error(tmp_path, visual)
    assert key_paths(error) == ["custom.visual_kd.weight"]
    assert "visual_kd.weight must be" in str(error)


@pytest.mark.parametrize(
    ("field", "value", "path", "expected"),
    [
        (
            "targets",
            ["merger", "patch_embed"],
            "custom.visual_kd.targets.1",
            "Input should be 'merger' or 'deepstack'",
        ),
        ("distance", "l1", "custom.visual_kd.distance", "Input should be 'mse' or 'cosine'"),
        ("targets", [], "custom.visual_kd.targets", "targets must name at least one of: merger, deepstack"),
        ("targets", ["merger", "merger"], "custom.visual_kd.targets", "targets must not repeat a name"),
    ],
)
def test_visual_kd_targets_and_distance_are_checked(tmp_path, visual, field, value, path, expected):
    visual["custom"]["visual_kd"].update({"targets": ["deepstack"], "distance": "cosine"})
    config = resolve(tmp_path, visual)
    assert (config.custom.visual_kd.targets, config.custom.visual_kd.distance) == (["deepstack"], "cosine")

    visual["custom"]["visual_kd"][field] = value
    error = rule_error(tmp_path, visual)
    assert key_paths(error) == [path]
    assert expected in str(error)


@pytest.mark.parametrize("tuner", [{}, {"freeze_vit": True, "freeze_aligner": True}])
def test_visual_kd_with_vision_and_aligner_frozen_is_rejected(tmp_path, visual, tuner):
    # ms-swift freezes both for multimodal models by default: leaving them out is the same as true.
    visual["tuner"] = {"tuner_type": "lora", **tuner}
    error = rule_error(tmp_path, visual)
    assert key_paths(error) == ["custom.visual_kd"]
    assert "the visual KD term would be identically zero" in str(error)
    assert "tuner.freeze_aligner: false" in str(error)


@pytest.mark.parametrize("tuner", [{"freeze_aligner": False}, {"freeze_vit": False}])
def test_visual_kd_with_a_trainable_vision_path_is_accepted(tmp_path, visual, tuner):
    visual["tuner"] = {"tuner_type": "lora", **tuner}
    assert resolve(tmp_path, visual).visual_kd_active


def test_visual_kd_needs_the_gkd_monitor_trainer(tmp_path, visual):
    visual["custom"]["trainer_variant"] = "default"
    error = rule_error(tmp_path, visual)
    assert key_paths(error) == ["custom.visual_kd.enabled"]
    assert "set custom.trainer_variant: gkd_monitor" in str(error)


def test_teacher_reference_follows_the_model_override(tmp_path, gkd, tiny_model_dir):
    gkd["rlhf"]["teacher_model"] = "${model.model}"
    assert resolve(tmp_path, gkd, check_files=True).sections["rlhf"]["teacher_model"] == str(tiny_model_dir)
    config = resolve(tmp_path, gkd, [f"model.model={tmp_path / 'other'}"])
    assert config.sections["rlhf"]["teacher_model"] == str(tmp_path / "other")


# --- checkpoints on disk ------------------------------------------------------------------------------


def test_missing_model_path_names_model_model_and_the_path(tmp_path, sft):
    resolve(tmp_path, sft, check_files=True)
    sft["model"]["model"] = str(tmp_path / "no-such-model")
    error = rule_error(tmp_path, sft, check_files=True)
    assert key_paths(error) == ["model.model"]
    assert f"checkpoint not found: {tmp_path / 'no-such-model'}" in str(error)


def test_model_folder_without_config_json_is_not_a_checkpoint(tmp_path, sft):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    sft["model"]["model"] = str(folder)
    error = rule_error(tmp_path, sft, check_files=True)
    assert key_paths(error) == ["model.model"]
    assert f"not a checkpoint (no config.json or adapter_config.json): {folder}" in str(error)


def test_hub_model_id_needs_network_permission(tmp_path, sft, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sft["model"]["model"] = "Qwen/Qwen3-VL-4B-Instruct"
    monkeypatch.delenv("ANCHORKD_ALLOW_NETWORK", raising=False)
    error = rule_error(tmp_path, sft, check_files=True)  # offline by default: fail fast, no hub retries
    assert key_paths(error) == ["model.model"]
    assert "ANCHORKD_ALLOW_NETWORK=1" in str(error)
    monkeypatch.setenv("ANCHORKD_ALLOW_NETWORK", "1")  # allowed: not checked on disk, ms-swift fetches it
    assert resolve(tmp_path, sft, check_files=True).sections["model"]["model"] == "Qwen/Qwen3-VL-4B-Instruct"
    monkeypatch.delenv("ANCHORKD_ALLOW_NETWORK")
    sft["model"]["model"] = "./Qwen/Qwen3-VL-4B-Instruct"  # explicitly local: checked
    error = rule_error(tmp_path, sft, check_files=True)
    assert key_paths(error) == ["model.model"]


def test_missing_teacher_path_names_rlhf_teacher_model(tmp_path, gkd):
    assert resolve(tmp_path, gkd, check_files=True).mode == "gkd"
    gkd["rlhf"]["teacher_model"] = str(tmp_path / "no-teacher")
    error = rule_error(tmp_path, gkd, check_files=True)
    assert key_paths(error) == ["rlhf.teacher_model"]
    assert f"checkpoint not found: {tmp_path / 'no-teacher'}" in str(error)


def test_missing_teacher_adapter_names_its_index(tmp_path, gkd):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    gkd["rlhf"]["teacher_adapters"] = [str(adapter)]
    assert resolve(tmp_path, gkd, check_files=True).sections["rlhf"]["teacher_adapters"] == [str(adapter)]

    gkd["rlhf"]["teacher_adapters"] = [str(adapter), str(tmp_path / "gone")]
    error = rule_error(tmp_path, gkd, check_files=True)
    assert key_paths(error) == ["rlhf.teacher_adapters[1]"]
    assert f"checkpoint not found: {tmp_path / 'gone'}" in str(error)


def test_missing_student_adapter_names_tuner_adapters(tmp_path, sft):
    sft["tuner"]["adapters"] = [str(tmp_path / "gone")]
    error = rule_error(tmp_path, sft, check_files=True)
    assert key_paths(error) == ["tuner.adapters[0]"]


def test_check_files_false_skips_the_disk(tmp_path, sft):
    sft["model"]["model"] = str(tmp_path / "no-such-model")
    sft["data"]["dataset"] = [str(tmp_path / "no-such.jsonl")]
    assert resolve(tmp_path, sft, check_files=False).sections["model"]["model"] == str(
        tmp_path / "no-such-model"
    )


# --- what is written ------------------------------------------------------------------------------------


def test_create_output_dir_false_writes_nothing(tmp_path, sft, clean_tb_env):
    out = tmp_path / "out"
    loaded = ConfigLoader.load_training_config(write_config(tmp_path, sft), create_output_dir=False)
    assert type(loaded.train_args).__name__ == "SftArguments"
    assert not out.exists()
    assert not Path(loaded.train_args.output_dir).exists()  # the throwaway dir is gone too
    # ms-swift exports its log dir on construction; validation must not leave it pointing at the
    # throwaway dir for a later run in this process.
    assert TB_ENV not in os.environ


def test_successful_load_creates_the_versioned_output_dir(tmp_path, sft, clean_tb_env):
    out = tmp_path / "out"
    loaded = ConfigLoader.load_training_config(write_config(tmp_path, sft))
    created = list(out.iterdir())
    assert len(created) == 1 and created[0].name.startswith("v0-")
    assert Path(loaded.train_args.output_dir) == created[0]

    out2 = tmp_path / "out2"
    loaded = ConfigLoader.load_training_config(
        write_config(tmp_path, sft), [f"training.output_dir={out2}", "training.add_version=false"]
    )
    assert Path(loaded.train_args.output_dir) == out2
    assert out2.is_dir()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model": {"model": "/no/such/model"}}, "model.model"),
        ({"rlhf": {"llm_kd_weight": -0.1}}, "rlhf.llm_kd_weight"),
        ({"rlhf": {"teacher_model": None}}, "rlhf.teacher_model"),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate"),
    ],
)
def test_failed_load_writes_no_output_dir(tmp_path, gkd, change, expected, clean_tb_env):
    for section, values in change.items():
        gkd[section].update(values)
    with pytest.raises(ConfigError) as info:
        ConfigLoader.load_training_config(write_config(tmp_path, gkd))
    assert expected in key_paths(info.value)
    assert not (tmp_path / "out").exists()


def test_ms_swift_rejection_removes_the_output_dir_it_created(tmp_path, gkd, clean_tb_env):
    # ms-swift checks gkd_logits_topk after it has created the output dir.
    gkd["rlhf"]["gkd_logits_topk"] = 0
    with pytest.raises(ConfigError) as info:
        ConfigLoader.load_training_config(write_config(tmp_path, gkd))
    assert info.value.key_path == "rlhf.gkd_logits_topk"  # the key ms-swift's message names
    assert info.value.source == str((tmp_path / "run.yaml").resolve())
    assert "gkd_logits_topk must be a positive integer" in str(info.value)
    assert not (tmp_path / "out").exists()

    # An output dir that existed before keeps its contents; only what ms-swift added goes.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError):
        ConfigLoader.load_training_config(write_config(tmp_path, gkd))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("message", "key_path"),
    [
        ("'mystery' is not a valid choice", "training.lr_scheduler_type"),  # the value it quotes
        ("To use `deepspeed_autotp_size`, set `--deepspeed`", "training.deepspeed_autotp_size"),  # the key
        ("the model is too large for this device", "(ms-swift arguments)"),  # no single key
    ],
)
def test_an_ms_swift_refusal_names_the_key_it_is_about(tmp_path, gkd, message, key_path):
    from anchorkd.config.loader import _swift_refusal

    gkd["training"].update({"lr_scheduler_type": "cosine", "deepspeed_autotp_size": 2})
    config = ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False)
    sections = {
        **config.sections,
        "training": {**config.sections["training"], "lr_scheduler_type": "mystery"},
    }
    config = dataclasses.replace(config, sections=sections)
    error = _swift_refusal(ValueError(message), config)
    assert error.key_path == key_path and message in str(error)


def test_bad_data_line_is_a_data_error_before_anything_is_written(tmp_path, sft, clean_tb_env):
    from anchorkd.checks import check_run

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 3}\n')
    sft["data"]["dataset"] = [str(bad)]
    with pytest.raises(DataError, match=f"{bad}:2"):
        check_run(write_config(tmp_path, sft))
    assert not (tmp_path / "out").exists()


def test_missing_data_file_is_found_before_anything_is_written(tmp_path, gkd, clean_tb_env):
    from anchorkd.checks import check_run

    gkd["data"]["dataset"] = ["/no/such/train.jsonl"]
    with pytest.raises(ConfigError) as info:
        check_run(write_config(tmp_path, gkd))
    assert key_paths(info.value) == ["data.dataset[0]"]
    assert not (tmp_path / "out").exists()


def test_resolved_config_round_trips_through_to_yaml(tmp_path, visual):
    config = resolve(tmp_path, visual)
    text = config.to_yaml()
    assert text.startswith(f"# Resolved by anchorkd from: {(tmp_path / 'run.yaml').resolve()}\n")
    again = ConfigLoader.resolve(
        write_config(tmp_path, yaml.safe_load(text), "again.yaml"), check_files=False
    )
    assert again.swift_kwargs() == config.swift_kwargs()
    assert again.sections["rlhf"]["llm_kd_weight"] == 1.0  # the default is written out explicitly
    assert again.custom == config.custom
    assert again.llm_kd_weight == config.llm_kd_weight
    assert again.mode == config.mode


def test_write_resolved_writes_the_resolved_yaml(tmp_path, sft):
    config = resolve(tmp_path, sft)
    out = tmp_path / "run-out"
    out.mkdir()
    target = ConfigLoader.write_resolved(config, out)
    assert target == out / "anchorkd_config.yaml"
    assert target.read_text() == config.to_yaml()
    assert [p.name for p in out.iterdir()] == ["anchorkd_config.yaml"]  # no temp file left


@pytest.mark.parametrize(
    ("has_gpu", "given", "expected"), [(False, None, False), (False, True, True), (True, None, True)]
)
def test_fp16_is_off_without_a_gpu_unless_the_config_sets_it(
    tmp_path, sft, monkeypatch, clean_tb_env, has_gpu, given, expected
):
    """ms-swift turns fp16 on for this float32 model; without a GPU anchorkd turns it off (DeepSpeed's CPU
    accelerator refuses it), unless the config says otherwise."""
    from anchorkd.config.rules import LaunchEnvironment

    monkeypatch.setattr(LaunchEnvironment, "detect", classmethod(lambda cls: cls(1, has_gpu)))
    if given is not None:
        sft["training"]["fp16"] = given
    config = ConfigLoader.resolve(write_config(tmp_path, sft), check_files=False)
    assert ConfigLoader.build_settings(config, create_output_dir=False).train_args.fp16 is expected


def test_deepspeed_without_a_gpu_needs_a_mapping_accelerator_config(tmp_path, sft, monkeypatch, clean_tb_env):
    """Without a GPU anchorkd adds ``use_configured_state`` to ``training.accelerator_config`` (see
    ``swift_seam.start_cpu_deepspeed_state``); a file path there cannot be extended: refused with the other
    rules (before the gloo state starts), nothing written."""
    from anchorkd.config.rules import LaunchEnvironment

    monkeypatch.setattr(LaunchEnvironment, "detect", classmethod(lambda cls: cls(1, False)))
    sft["training"].update({"deepspeed": "zero3", "accelerator_config": "accelerator.json"})
    with pytest.raises(ConfigError) as info:
        ConfigLoader.resolve(write_config(tmp_path, sft))
    assert info.value.key_path == "training.accelerator_config"
    assert not (tmp_path / "out").exists()


def test_a_separate_teacher_of_the_students_architecture_takes_the_students_model_type(
    tmp_path, gkd, tiny_model_dir, clean_tb_env
):
    # Another spelling of the same folder makes ms-swift load a separate copy; ms-swift cannot infer the
    # type of a folder named "tiny-qwen3-vl" and would fail at load time without one.
    gkd["rlhf"]["teacher_model"] = f"{tiny_model_dir}/"
    settings = ConfigLoader.load_training_config(write_config(tmp_path, gkd), create_output_dir=False)
    assert settings.anchor.teacher_mode == "separate"
    assert settings.train_args.teacher_model_type == settings.train_args.model_type == "qwen3_vl"
