"""What a checkpoint's own files tell before any weight loads (``anchorkd.checkpoint_rules``): LoRA targets
that name no module with weights, a model type that does not fit the checkpoint, and a resume whose config
differs from what the checkpoint was trained with. Each class is refused with its key path by the checks
``validate``, ``check`` and ``train`` share (exit 2, no traceback, nothing written).

The checkpoints are small folders written here: config.json plus safetensors files of zero tensors, or
config.json alone where transformers' class for the architecture gives the module tree on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from anchorkd.checkpoint_rules import check_checkpoint_rules, checkpoint_modules
from anchorkd.checkpoints import safetensors_header, safetensors_shapes
from anchorkd.cli import EXIT_BAD_INPUT, main
from anchorkd.config import ConfigError, ConfigErrors, ConfigLoader
from anchorkd.errors import DataError

TEXT_TENSORS = {
    "model.embed_tokens.weight": (16, 4),
    "model.layers.0.input_layernorm.weight": (4,),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.self_attn.k_proj.weight": (4, 4),
    "model.layers.0.self_attn.v_proj.weight": (4, 4),
    "model.layers.0.self_attn.o_proj.weight": (4, 4),
    "model.layers.0.mlp.gate_proj.weight": (8, 4),
    "model.layers.0.mlp.up_proj.weight": (8, 4),
    "model.layers.0.mlp.down_proj.weight": (4, 8),
    "model.norm.weight": (4,),
    "lm_head.weight": (16, 4),
}


def weights_folder(folder: Path, config: dict, tensors: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A checkpoint folder: config.json and (when given) one safetensors file of zero tensors."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if tensors:
        arrays = {name: np.zeros(shape, dtype=np.float32) for name, shape in tensors.items()}
        save_file(arrays, str(folder / "model.safetensors"))
    return folder


def custom_text_model(folder: Path, **config) -> Path:
    """An architecture transformers has no class for (remote code): the headers are the only source."""
    return weights_folder(folder, {"architectures": ["CustomForCausalLM"], **config}, TEXT_TENSORS)


def qwen3_vl_model(folder: Path) -> Path:
    """The tiny Qwen3-VL's config.json alone: the module names come from transformers' class on meta."""
    from anchorkd.demo.tiny_model import TinyQwen3VLSizes, build_config

    folder.mkdir(parents=True)
    build_config(TinyQwen3VLSizes()).to_json_file(str(folder / "config.json"))
    return folder


def qwen3_text_model(folder: Path) -> Path:
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 32,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "tie_word_embeddings": True,
    }
    return weights_folder(folder, config)


def write_config(tmp_path: Path, model: Path, *, model_type: str | None = None, **tuner) -> Path:
    body = {
        "model": {"model": str(model), **({"model_type": model_type} if model_type else {})},
        "data": {"dataset": [str(tmp_path / "train.jsonl")]},
        "tuner": {"tuner_type": "lora", **tuner},
        "training": {"output_dir": str(tmp_path / "out")},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def refusal(path: Path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_checkpoint_rules(ConfigLoader.resolve(path, overrides))
    return info.value


def errors_by_key(error: ConfigError) -> dict[str, str]:
    errors = error.errors if isinstance(error, ConfigErrors) else [error]
    return {e.key_path: e.rule for e in errors}


def passes(path: Path, overrides=()) -> None:
    assert check_checkpoint_rules(ConfigLoader.resolve(path, overrides)) is None


# --- safetensors headers ---------------------------------------------------------------------------------


def test_shapes_come_from_the_headers_of_every_shard_the_index_names(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a.weight": np.zeros((2, 3), np.float32)}, str(folder / "model-1.safetensors"))
    save_file({"b.weight": np.zeros((5,), np.float32)}, str(folder / "model-2.safetensors"))
    save_file({"lora_A.weight": np.zeros((1,), np.float32)}, str(folder / "adapter_model.safetensors"))
    index = {"weight_map": {"a.weight": "model-1.safetensors", "b.weight": "model-2.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert safetensors_shapes(folder) == {"a.weight": [2, 3], "b.weight": [5]}
    (folder / "model.safetensors.index.json").unlink()
    # Without an index: every safetensors file but a PEFT adapter's.
    assert safetensors_shapes(folder) == {"a.weight": [2, 3], "b.weight": [5]}


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=f"{path}: not a safetensors file"):
        safetensors_header(path)


# --- 1. LoRA targets -------------------------------------------------------------------------------------


def test_module_names_from_the_headers_alone(tmp_path):
    modules = checkpoint_modules(custom_text_model(tmp_path / "custom"))
    assert "model.layers.0.self_attn.q_proj" in modules.with_weights
    assert "model.layers.0.self_attn" in modules.names - modules.with_weights  # a container
    assert "lm_head" in modules.with_weights


def test_a_tied_lm_head_counts_as_a_module_though_it_is_not_saved(tmp_path):
    tensors = {name: shape for name, shape in TEXT_TENSORS.items() if name != "lm_head.weight"}
    folder = weights_folder(tmp_path / "tied", {"architectures": ["X"], "tie_word_embeddings": True}, tensors)
    assert "lm_head" in checkpoint_modules(folder).with_weights
    passes(write_config(tmp_path, folder, target_modules=["lm_head"]))


def test_module_names_from_the_meta_device_model_without_weights_files(tmp_path):
    modules = checkpoint_modules(qwen3_vl_model(tmp_path / "vl"))
    assert "model.language_model.layers.0.self_attn.q_proj" in modules.with_weights
    assert "model.visual.blocks.0.attn.qkv" in modules.with_weights
    # Modules without weights of their own are known too (an activation, the rotary embedding).
    assert "model.language_model.layers.0.mlp.act_fn" in modules.names - modules.with_weights


def test_a_checkpoint_without_weights_files_or_a_known_class_is_not_judged(tmp_path):
    folder = weights_folder(tmp_path / "bare", {"architectures": ["CustomForCausalLM"]})
    assert checkpoint_modules(folder) is None
    passes(write_config(tmp_path, folder, target_modules=["anything"]))


def test_target_modules_that_match_are_accepted(tmp_path):
    folder = custom_text_model(tmp_path / "custom")
    # PEFT's list rule: the whole name or its end after a dot.
    passes(write_config(tmp_path, folder, target_modules=["q_proj", "mlp.down_proj", "lm_head"]))


def test_an_entry_that_matches_no_module_is_refused_even_next_to_one_that_matches(tmp_path):
    folder = custom_text_model(tmp_path / "custom")
    error = refusal(write_config(tmp_path, folder, target_modules=["q_proj", "qproj"]))
    assert error.key_path == "tuner.target_modules[1]"
    assert f"'qproj' matches no module of {folder} (did you mean q_proj" in error.rule
    assert "its modules with weights end in down_proj, embed_tokens, gate_proj" in error.rule
    assert "(e.g. model.layers.0.self_attn.q_proj)" in error.rule


def test_an_entry_naming_modules_without_weights_is_refused(tmp_path):
    folder = qwen3_vl_model(tmp_path / "vl")
    for target in ("mlp", "act_fn"):
        error = refusal(write_config(tmp_path, folder, model_type="qwen3_vl", target_modules=[target]))
        assert error.key_path == "tuner.target_modules[0]"
        assert "hold no weights of their own (model.language_model.layers.0.mlp" in error.rule
        assert "LoRA cannot wrap" in error.rule


def test_a_regular_expression_in_target_modules_is_pointed_to_target_regex(tmp_path):
    folder = custom_text_model(tmp_path / "custom")
    error = refusal(write_config(tmp_path, folder, target_modules=[r".*\.q_proj"]))
    assert error.key_path == "tuner.target_modules[0]"
    assert "a regular expression goes in tuner.target_regex" in error.rule


def test_target_regex_must_match_a_whole_module_name(tmp_path):
    folder = custom_text_model(tmp_path / "custom")
    passes(write_config(tmp_path, folder, target_regex=r"model\.layers\.\d+\.self_attn\.(q|v)_proj"))
    error = refusal(write_config(tmp_path, folder, target_regex="q_proj"))  # PEFT: re.fullmatch
    assert error.key_path == "tuner.target_regex"
    assert "'q_proj' matches no module" in error.rule and "it must match a module's whole name" in error.rule
    error = refusal(write_config(tmp_path, folder, target_regex=r"model\.layers\..*"))
    assert "hold no weights of their own (model.layers.0, model.layers.0.mlp, " in error.rule
    error = refusal(write_config(tmp_path, folder, target_regex="(q_proj"))
    assert "'(q_proj' is not a valid regular expression" in error.rule


def test_all_linear_is_left_to_ms_swift_on_a_text_model_and_the_other_entries_are_checked(tmp_path):
    folder = qwen3_text_model(tmp_path / "qwen3")
    passes(write_config(tmp_path, folder, model_type="qwen3", target_modules=["all-linear", "all-embedding"]))
    error = refusal(
        write_config(tmp_path, folder, model_type="qwen3", target_modules=["all-linear", "lmhead"])
    )
    assert error.key_path == "tuner.target_modules[1]" and "(did you mean lm_head" in error.rule


def test_all_linear_on_a_multimodal_model_with_every_part_frozen_is_refused(tmp_path):
    folder = qwen3_vl_model(tmp_path / "vl")
    path = write_config(tmp_path, folder, model_type="qwen3_vl", target_modules=["all-linear"])
    passes(path)  # freeze_llm false by default: LoRA on the language model
    error = refusal(path, ["tuner.freeze_llm=true", "tuner.freeze_vit=true", "tuner.freeze_aligner=true"])
    assert error.key_path == "tuner.target_modules"
    assert "all three are true" in error.rule


def test_entries_next_to_all_linear_on_a_multimodal_model_are_refused_as_ignored(tmp_path):
    folder = qwen3_vl_model(tmp_path / "vl")
    path = write_config(tmp_path, folder, model_type="qwen3_vl", target_modules=["all-linear", "lm_head"])
    error = refusal(path)
    assert error.key_path == "tuner.target_modules"
    assert "ms-swift ignores lm_head next to all-linear on a multimodal model" in error.rule
    passes(
        write_config(tmp_path, folder, model_type="qwen3_vl", target_modules=["all-linear", "all-embedding"])
    )


def test_targets_are_not_judged_for_full_tuning_or_a_given_adapter(tmp_path):
    folder = custom_text_model(tmp_path / "custom")
    passes(write_config(tmp_path, folder, tuner_type="full", target_modules=["nothing"]))
    passes(write_config(tmp_path, folder, target_modules=["nothing"], adapters=[str(folder)]))


def test_an_unreadable_weights_header_names_model_model(tmp_path):
    folder = custom_text_model(tmp_path / "custom")
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    error = refusal(write_config(tmp_path, folder, target_modules=["q_proj"]))
    assert error.key_path == "model.model"
    assert f"{folder / 'model.safetensors'}: not a safetensors file" in error.rule


def test_a_config_json_that_is_not_json_names_the_file(tmp_path):
    folder = custom_text_model(tmp_path / "custom")
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(DataError, match=f"{folder / 'config.json'}:1: not valid JSON"):
        check_checkpoint_rules(
            ConfigLoader.resolve(write_config(tmp_path, folder, target_modules=["q_proj"]))
        )


# --- 2. model type ---------------------------------------------------------------------------------------


def test_a_model_type_of_another_architecture_is_refused_naming_those_that_fit(tmp_path):
    folder = qwen3_vl_model(tmp_path / "vl")
    passes(write_config(tmp_path, folder, model_type="qwen3_vl"))
    error = refusal(write_config(tmp_path, folder, model_type="qwen2_vl"))
    assert error.key_path == "model.model_type"
    assert error.rule == (
        f"'qwen2_vl' does not fit {folder}: its config.json says Qwen3VLForConditionalGeneration, and "
        "ms-swift's qwen2_vl loads Qwen2VLForConditionalGeneration; model types for this checkpoint: "
        "qwen3_vl, qwen3_vl_emb, qwen3_vl_reranker"
    )


def test_an_unknown_model_type_is_refused_with_the_closest_names(tmp_path):
    folder = qwen3_vl_model(tmp_path / "vl")
    error = refusal(write_config(tmp_path, folder, model_type="qwen3vl"))
    assert error.key_path == "model.model_type"
    assert "'qwen3vl' is not a model type of ms-swift (did you mean qwen3_vl" in error.rule
    assert "model types for this checkpoint: qwen3_vl, qwen3_vl_emb, qwen3_vl_reranker" in error.rule


def test_the_same_model_family_with_another_head_fits(tmp_path):
    folder = weights_folder(tmp_path / "cls", {"architectures": ["Qwen3ForSequenceClassification"]})
    passes(write_config(tmp_path, folder, model_type="qwen3"))


def test_the_teacher_model_type_is_checked_against_the_teacher(tmp_path):
    student, teacher = qwen3_vl_model(tmp_path / "student"), qwen3_vl_model(tmp_path / "teacher")
    path = write_config(tmp_path, student, model_type="qwen3_vl")
    overrides = [
        "rlhf.rlhf_type=gkd",
        f"rlhf.teacher_model={teacher}",
        "rlhf.llm_kd_weight=0.5",
        "custom.trainer_variant=gkd_monitor",
    ]
    passes(path, [*overrides, "rlhf.teacher_model_type=qwen3_vl"])
    error = refusal(path, [*overrides, "rlhf.teacher_model_type=qwen2_5_vl"])
    assert error.key_path == "rlhf.teacher_model_type" and f"does not fit {teacher}" in error.rule


# --- 3. resume -------------------------------------------------------------------------------------------

ADAPTER = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "bias": "none",
    "use_dora": False,
    "use_rslora": False,
    "target_modules": ["q_proj", "v_proj"],
}


def trained_checkpoint(run_dir: Path, model: Path, *, adapter=None, args=None, step: int = 2) -> Path:
    """A complete LoRA checkpoint of a run on ``model``: rank 4, alpha 16, targets q_proj and v_proj."""
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"x" * 16)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    adapter = {**ADAPTER, "base_model_name_or_path": str(model), **(adapter or {})}
    (folder / "adapter_config.json").write_text(json.dumps(adapter))
    if args is not False:
        recorded = {
            "model": str(model),
            "model_dir": str(model),
            "tuner_type": "lora",
            "lora_rank": 4,
            "lora_alpha": 16.0,
            "lora_dropout": 0.0,
            "lora_bias": "none",
            "target_modules": ["q_proj", "v_proj"],
            "target_regex": None,
            "modules_to_save": [],
            "freeze_llm": False,
            "freeze_vit": True,
            "freeze_aligner": True,
            **(args or {}),
        }
        (folder / "args.json").write_text(json.dumps(recorded))
    return folder


def resume_config(tmp_path: Path, model: Path, checkpoint: Path | str, **tuner) -> Path:
    tuner = {
        "lora_rank": 4,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        **tuner,
    }
    path = write_config(tmp_path, model, **tuner)
    body = yaml.safe_load(path.read_text())
    body["training"]["resume_from_checkpoint"] = str(checkpoint)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_a_resume_with_the_checkpoints_settings_passes(tmp_path):
    model = custom_text_model(tmp_path / "custom")
    checkpoint = trained_checkpoint(tmp_path / "out" / "v0-run", model)
    passes(resume_config(tmp_path, model, checkpoint))
    passes(resume_config(tmp_path, model, "auto"))  # the newest complete checkpoint in training.output_dir
    # Freeze flags choose modules only for all-linear (and full tuning): with named targets they may change.
    passes(resume_config(tmp_path, model, checkpoint, freeze_vit=False))


def test_another_lora_rank_is_refused_naming_both_values(tmp_path):
    model = custom_text_model(tmp_path / "custom")
    checkpoint = trained_checkpoint(tmp_path / "out" / "v0-run", model)
    error = refusal(resume_config(tmp_path, model, "auto", lora_rank=8))
    assert error.key_path == "tuner.lora_rank"
    assert error.rule == (
        f"8 here, but the checkpoint {checkpoint.resolve()} was trained with 4 (adapter_config.json): a resume "
        "goes on as the checkpoint was trained; set tuner.lora_rank=4 to resume it, or start a new run "
        "(another training.output_dir, or no training.resume_from_checkpoint)"
    )


def test_every_difference_is_named(tmp_path):
    model, other = custom_text_model(tmp_path / "custom"), custom_text_model(tmp_path / "other")
    checkpoint = trained_checkpoint(tmp_path / "out" / "v0-run", model)
    path = resume_config(
        tmp_path, other, checkpoint, lora_rank=8, lora_alpha=32, use_dora=True, target_modules=["q_proj"]
    )
    found = errors_by_key(refusal(path))
    assert sorted(found) == [
        "model.model",
        "tuner.lora_alpha",
        "tuner.lora_rank",
        "tuner.target_modules",
        "tuner.use_dora",
    ]
    assert found["model.model"].startswith(f"{other} here, but the checkpoint")
    assert f"was trained with {model} (args.json)" in found["model.model"]
    assert (
        found["tuner.lora_alpha"].startswith("32.0 here")
        and "trained with 16.0 (adapter_config.json)" in (found["tuner.lora_alpha"])
    )
    assert "[q_proj] here" in found["tuner.target_modules"]
    assert "set tuner.target_modules=[q_proj, v_proj] to resume" in found["tuner.target_modules"]
    assert found["tuner.use_dora"].startswith("true here") and "trained with false" in found["tuner.use_dora"]


def test_another_tuner_type_is_named_alone(tmp_path):
    model = custom_text_model(tmp_path / "custom")
    checkpoint = trained_checkpoint(tmp_path / "out" / "v0-run", model)
    found = errors_by_key(refusal(resume_config(tmp_path, model, checkpoint, tuner_type="full", lora_rank=8)))
    assert list(found) == ["tuner.tuner_type"] and found["tuner.tuner_type"].startswith("full here")


def test_freeze_flags_are_compared_where_they_choose_the_trained_modules(tmp_path):
    model = custom_text_model(tmp_path / "custom")
    checkpoint = trained_checkpoint(
        tmp_path / "out" / "v0-run", model, args={"target_modules": ["all-linear"]}
    )
    path = resume_config(tmp_path, model, checkpoint, target_modules=["all-linear"], freeze_vit=False)
    found = errors_by_key(refusal(path))
    assert (
        list(found) == ["tuner.freeze_vit"] and "trained with true (args.json)" in found["tuner.freeze_vit"]
    )


def test_the_adapters_own_rank_counts_over_an_args_json_that_says_otherwise(tmp_path):
    """A run resumed under another rank before this rule existed wrote the config's rank into args.json
    while its adapter kept the checkpoint's: the adapter's file is what a resume loads."""
    model = custom_text_model(tmp_path / "custom")
    checkpoint = trained_checkpoint(tmp_path / "out" / "v0-run", model, args={"lora_rank": 8})
    error = refusal(resume_config(tmp_path, model, checkpoint, lora_rank=8))
    assert error.key_path == "tuner.lora_rank" and "trained with 4 (adapter_config.json)" in error.rule


def test_without_args_json_the_adapter_config_is_compared(tmp_path):
    model, other = custom_text_model(tmp_path / "custom"), custom_text_model(tmp_path / "other")
    checkpoint = trained_checkpoint(tmp_path / "out" / "v0-run", model, args=False)
    passes(resume_config(tmp_path, model, checkpoint))
    found = errors_by_key(refusal(resume_config(tmp_path, other, checkpoint, target_modules=["k_proj"])))
    assert sorted(found) == ["model.model", "tuner.target_modules"]
    assert "(adapter_config.json)" in found["model.model"]


def test_a_base_model_that_no_longer_exists_where_it_was_is_not_counted_as_a_difference(tmp_path):
    model = custom_text_model(tmp_path / "custom")
    checkpoint = trained_checkpoint(tmp_path / "out" / "v0-run", tmp_path / "moved-away")
    passes(resume_config(tmp_path, model, checkpoint))


def test_the_same_folder_by_another_path_is_the_same_model(tmp_path):
    model = custom_text_model(tmp_path / "custom")
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    checkpoint = trained_checkpoint(tmp_path / "out" / "v0-run", tmp_path / "link")
    passes(resume_config(tmp_path, model, checkpoint))


# --- the commands ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "check"])
def test_the_commands_refuse_each_class_with_exit_2_and_write_nothing(tmp_path, capsys, command):
    vl = qwen3_vl_model(tmp_path / "vl")
    model = custom_text_model(tmp_path / "custom")
    trained_checkpoint(tmp_path / "runs" / "v0-run", model)
    cases = {
        "tuner.target_modules[0]": write_config(tmp_path / "a", model, target_modules=["qproj"]),
        "model.model_type": write_config(tmp_path / "b", vl, model_type="qwen2_vl"),
        "tuner.lora_rank": resume_config(tmp_path / "c", model, "auto", lora_rank=8),
    }
    for key, path in cases.items():
        overrides = [f"training.output_dir={tmp_path / 'runs'}"] if key == "tuner.lora_rank" else []
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert main([command, str(path), *overrides]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"anchorkd: error: {key}: " in err and "Traceback" not in err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
