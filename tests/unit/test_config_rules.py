"""Every rule of ``anchorkd.config.rules``: one test each, with a config that breaks it and the key path it
must name; numeric ranges are parametrized over the whole table. Plus where errors say the value came
from (a file or the command line) and that a refused run writes nothing and exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anchorkd.cli import EXIT_BAD_INPUT, main
from anchorkd.config import (
    COMMAND_LINE,
    AnchorRlhfKnobs,
    ConfigError,
    ConfigErrors,
    ConfigLoader,
    CustomConfig,
    rules,
)
from anchorkd.config.rules import NUMERIC_RANGES, RULES


def write_config(folder: Path, config: dict, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def gkd(tmp_path, tiny_model_dir, synthetic_data_dir) -> dict:
    return {
        "model": {"model": str(tiny_model_dir), "model_type": "qwen3_vl", "torch_dtype": "float32"},
        "data": {"dataset": [str(synthetic_data_dir / "train.jsonl")]},
        "tuner": {"tuner_type": "lora"},
        "training": {"output_dir": str(tmp_path / "out")},
        "rlhf": {"rlhf_type": "gkd", "teacher_model": str(tiny_model_dir), "beta": 0.1, "lmbda": 0.0},
        "custom": {"trainer_variant": "gkd_monitor"},
    }


def errors_of(tmp_path, config, overrides=()) -> list[ConfigError]:
    with pytest.raises(ConfigError) as info:
        ConfigLoader.resolve(write_config(tmp_path, config), overrides, check_files=False)
    error = info.value
    return error.errors if isinstance(error, ConfigErrors) else [error]


def only_error(tmp_path, config, overrides=()) -> ConfigError:
    errors = errors_of(tmp_path, config, overrides)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


# --- numeric ranges ---------------------------------------------------------------------------------------

BAD_VALUES = {
    "rlhf.sft_alpha": -0.5,
    "rlhf.beta": 1.5,
    "rlhf.lmbda": -0.1,
    "rlhf.temperature": 0,
    "training.temperature": -1.0,
    "rlhf.max_completion_length": 0,
    "tuner.lora_rank": 0,
    "tuner.lora_alpha": 0,
    "tuner.lora_dropout": 1.0,
    "training.learning_rate": 0.0,
    "tuner.vit_lr": -1e-5,
    "tuner.aligner_lr": 0,
    "training.per_device_train_batch_size": 0,
    "training.per_device_eval_batch_size": -2,
    "training.gradient_accumulation_steps": 0,
    "training.num_train_epochs": 0,
    "training.max_steps": 0,
    "training.warmup_ratio": 1.5,
    "training.adam_epsilon": float("nan"),  # passes torch's own check and turns the weights into NaN
    "training.adam_beta1": 1.0,
    "training.adam_beta2": -0.1,
    "training.weight_decay": -0.1,
    "training.max_grad_norm": -1.0,
    "training.logging_steps": 0,
    "training.save_steps": -5,
    "training.eval_steps": 0,
    "template.max_length": 0,
    "template.max_pixels": -5,  # the data check's image resizing took a square root of it
    "rlhf.steps_per_generation": 0,
    "rlhf.generation_batch_size": 0,
}


def test_every_numeric_range_has_a_bad_value_here():
    assert {numeric.key_path for numeric in NUMERIC_RANGES} == set(BAD_VALUES)


@pytest.mark.parametrize("numeric", NUMERIC_RANGES, ids=lambda n: n.key_path)
def test_numeric_range_names_the_key_and_the_rule(tmp_path, gkd, numeric):
    section, key = numeric.key_path.split(".")
    gkd.setdefault(section, {})[key] = BAD_VALUES[numeric.key_path]
    error = only_error(tmp_path, gkd)
    assert error.key_path == numeric.key_path
    assert f"must be {numeric.rule}, got {BAD_VALUES[numeric.key_path]!r}" in str(error)


@pytest.mark.parametrize(
    ("key_path", "value"),
    [
        ("training.adam_epsilon", float("inf")),
        ("training.weight_decay", float("nan")),
        ("training.max_grad_norm", float("inf")),
        ("training.adam_beta2", float("nan")),
    ],
)
def test_non_finite_optimiser_knobs_are_refused(tmp_path, gkd, key_path, value):
    section, key = key_path.split(".")
    gkd[section][key] = value
    error = only_error(tmp_path, gkd)
    assert error.key_path == key_path and f"got {value!r}" in str(error)


def test_values_inside_the_ranges_pass(tmp_path, gkd):
    gkd["rlhf"].update({"sft_alpha": 0, "beta": 1, "lmbda": 1, "temperature": 0.5})
    gkd["tuner"].update({"lora_rank": 1, "lora_dropout": 0.0})
    gkd["training"].update({"max_steps": -1, "learning_rate": 1e-6, "warmup_ratio": 0})
    gkd["training"].update({"adam_epsilon": 1e-8, "adam_beta1": 0, "adam_beta2": 0.999, "max_grad_norm": 0})
    gkd["template"] = {"max_pixels": 1}
    config = ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False)
    assert config.mode == "gkd"


def test_several_range_errors_are_reported_together(tmp_path, gkd):
    gkd["rlhf"]["sft_alpha"] = -1
    gkd["training"]["learning_rate"] = -1
    assert {e.key_path for e in errors_of(tmp_path, gkd)} == {"rlhf.sft_alpha", "training.learning_rate"}


# --- one test per rule ---------------------------------------------------------------------------------------


def test_llm_kd_weight_on_a_run_without_gkd_is_an_error(tmp_path, gkd):
    del gkd["rlhf"]
    gkd["custom"] = {}
    gkd["rlhf"] = {"llm_kd_weight": 0.5}
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.llm_kd_weight"
    assert "only GKD runs have an LM-head KD term" in str(error)


def test_llm_kd_weight_on_another_rlhf_type_is_an_error(tmp_path, gkd):
    gkd["rlhf"] = {"rlhf_type": "dpo", "llm_kd_weight": 2.0}
    gkd["custom"] = {}
    assert "rlhf.llm_kd_weight" in [e.key_path for e in errors_of(tmp_path, gkd)]


def test_rlhf_keys_need_rlhf_type(tmp_path, gkd):
    del gkd["rlhf"]["rlhf_type"]
    gkd["custom"] = {}
    assert only_error(tmp_path, gkd).key_path == "rlhf.teacher_model"


def test_gkd_monitor_needs_gkd(tmp_path, gkd):
    del gkd["rlhf"]
    assert only_error(tmp_path, gkd).key_path == "custom.trainer_variant"


def test_kd_weight_other_than_one_needs_gkd_monitor(tmp_path, gkd):
    gkd["custom"] = {}
    gkd["rlhf"]["llm_kd_weight"] = 0.5
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.llm_kd_weight" and "always weighs the KD term by 1.0" in str(error)


def test_visual_kd_needs_gkd_monitor(tmp_path, gkd):
    gkd["custom"] = {"visual_kd": {"enabled": True, "weight": 1.0}}
    gkd["tuner"]["freeze_aligner"] = False
    assert only_error(tmp_path, gkd).key_path == "custom.visual_kd.enabled"


def test_seq_kd_resolves_on_a_gkd_run(tmp_path, gkd):
    gkd["rlhf"]["seq_kd"] = True
    config = ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False)
    assert config.mode == "gkd" and config.seq_kd is True
    assert "seq_kd" not in config.swift_kwargs()  # ms-swift 4.6.0 raises NotImplementedError for it


def test_seq_kd_needs_gkd(tmp_path, gkd):
    gkd["rlhf"] = {"seq_kd": True}
    gkd["custom"] = {}
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.seq_kd" and "need a GKD run with a teacher" in str(error)


def test_seq_kd_needs_a_kd_term(tmp_path, gkd):
    gkd["rlhf"].update({"seq_kd": True, "llm_kd_weight": 0.0})
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.seq_kd" and "plain SFT and loads no teacher" in str(error)


def test_seq_kd_needs_a_local_teacher(tmp_path, gkd):
    gkd[
        "custom"
    ] = {}  # ms-swift's own trainer accepts a teacher server; seq_kd still cannot generate with one
    gkd["rlhf"].update({"seq_kd": True, "teacher_model_server": "http://127.0.0.1:8000"})
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.teacher_model_server" and "local teacher checkpoint" in str(error)


@pytest.mark.parametrize(
    ("adapters", "backend", "words"),
    [
        (["/a", "/b"], "transformers", "at most one teacher adapter, got 2"),
        (["/a"], "vllm", "merge the adapter"),
    ],
)
def test_seq_kd_teacher_adapters(tmp_path, gkd, monkeypatch, adapters, backend, words):
    monkeypatch.setattr(rules, "infer_backend_installed", lambda name: True)
    gkd["rlhf"].update({"seq_kd": True, "teacher_adapters": adapters})
    gkd["custom"]["teacher_targets"] = {"infer_backend": backend}
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.teacher_adapters" and words in str(error)


@pytest.mark.parametrize(
    ("data", "key_path"),
    [
        ({"dataset": ["AI-ModelScope/LaTeX_OCR"]}, "data.dataset[0]"),
        ({"dataset": ["a.jsonl", "b.jsonl#100"]}, "data.dataset[1]"),
        ({"cached_dataset": ["cache/train"]}, "data.cached_dataset"),
    ],
)
def test_seq_kd_needs_local_jsonl(tmp_path, gkd, data, key_path):
    gkd["rlhf"]["seq_kd"] = True
    gkd["data"] = data
    error = only_error(tmp_path, gkd)
    assert error.key_path == key_path and "seq_kd" in str(error)


def test_infer_backend_must_be_installed(tmp_path, gkd, monkeypatch):
    monkeypatch.setattr(rules, "infer_backend_installed", lambda name: name != "vllm")
    gkd["rlhf"]["seq_kd"] = True
    gkd["custom"]["teacher_targets"] = {"infer_backend": "vllm"}
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.teacher_targets.infer_backend"
    assert "vllm is not installed in this environment" in str(error)
    gkd["rlhf"]["seq_kd"] = False  # the backend is only used to write seq_kd's targets
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).seq_kd is False


def test_seq_kd_with_every_batch_on_policy_is_refused(tmp_path, gkd):
    """lmbda is the chance a batch is the student's own samples: at 1 the teacher's answers never train."""
    gkd["rlhf"].update({"seq_kd": True, "lmbda": 1})
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.seq_kd" and "has no effect with rlhf.lmbda: 1" in str(error)
    gkd["rlhf"]["lmbda"] = 0.9  # some batches are the teacher's answers
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).seq_kd is True
    gkd["rlhf"].update({"seq_kd": False, "lmbda": 1})  # fully on-policy GKD without seq_kd is fine
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).mode == "gkd"


@pytest.mark.parametrize(
    ("values", "key_path", "words"),
    [
        ({"temperature": -0.5}, "custom.teacher_targets.temperature", "must be non-negative"),
        ({"temperature": True}, "custom.teacher_targets.temperature", "must be a number"),
        ({"infer_backend": "pt"}, "custom.teacher_targets.infer_backend", "'transformers' or 'vllm'"),
        ({"batch_size": 0}, "custom.teacher_targets.batch_size", "greater than 0"),
    ],
)
def test_teacher_targets_fields(tmp_path, gkd, values, key_path, words):
    gkd["custom"]["teacher_targets"] = values
    error = only_error(tmp_path, gkd)
    assert error.key_path == key_path and words in str(error)


# --- KD-only anchor prompts (custom.anchor) ----------------------------------------------------------------

ANCHOR = {"dataset": ["/data/general_prompts.jsonl"], "weight": 0.5, "ratio": 0.25}


def test_anchor_prompts_resolve_on_a_gkd_monitor_run(tmp_path, gkd):
    gkd["custom"]["anchor"] = ANCHOR
    config = ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False)
    assert config.mode == "gkd" and config.custom.anchor.active
    assert (config.custom.anchor.weight, config.custom.anchor.ratio) == (0.5, 0.25)
    assert config.custom.teacher_targets.cache_dir == str(tmp_path / "teacher_targets")  # rows to answer
    # Anchor prompts alone keep a run GKD: domain rows train on CE only, anchor rows on the KD term.
    gkd["rlhf"]["llm_kd_weight"] = 0.0
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).mode == "gkd"


@pytest.mark.parametrize(
    ("values", "key_path", "words"),
    [
        ({"ratio": 0.0}, "custom.anchor.ratio", "must be in (0, 1)"),
        ({"ratio": 1.0}, "custom.anchor.ratio", "must be in (0, 1)"),
        ({"ratio": "a quarter"}, "custom.anchor.ratio", "must be a number"),
        ({"weight": 0}, "custom.anchor.weight", "remove custom.anchor"),
        ({"weight": -1.0}, "custom.anchor.weight", "must be non-negative"),
        ({"weight": float("inf")}, "custom.anchor.weight", "must be finite"),
    ],
)
def test_anchor_fields(tmp_path, gkd, values, key_path, words):
    gkd["custom"]["anchor"] = {**ANCHOR, **values}
    error = only_error(tmp_path, gkd)
    assert error.key_path == key_path and words in str(error)


def test_anchor_settings_need_a_dataset(tmp_path, gkd):
    gkd["custom"]["anchor"] = {"ratio": 0.3}
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.anchor" and "needs dataset" in str(error)
    gkd["custom"]["anchor"] = {"dataset": [], "ratio": 0.3}  # as a resolved config writes "off"
    assert not ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).custom.anchor.active


def test_anchor_needs_gkd(tmp_path, gkd):
    gkd["rlhf"] = {}
    gkd["custom"] = {"anchor": ANCHOR}
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.anchor.dataset" and "set rlhf.rlhf_type: gkd" in str(error)


def test_anchor_needs_gkd_monitor(tmp_path, gkd):
    gkd["custom"] = {"anchor": ANCHOR}
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.anchor.dataset" and "custom.trainer_variant: gkd_monitor" in str(error)


@pytest.mark.parametrize(
    ("dataset", "key_path"),
    [
        (["AI-ModelScope/LaTeX_OCR"], "custom.anchor.dataset[0]"),
        (["a.jsonl", "b.jsonl#10"], "custom.anchor.dataset[1]"),
    ],
)
def test_anchor_needs_local_jsonl(tmp_path, gkd, dataset, key_path):
    gkd["custom"]["anchor"] = {**ANCHOR, "dataset": dataset}
    error = only_error(tmp_path, gkd)
    assert error.key_path == key_path and "local .jsonl file" in str(error)


@pytest.mark.parametrize(
    ("key_path", "value"),
    [("template.padding_free", True), ("data.packing", True), ("template.sequence_parallel_size", 2)],
)
def test_anchor_needs_padded_batches(tmp_path, gkd, key_path, value):
    section, key = key_path.split(".")
    gkd.setdefault(section, {})[key] = value
    gkd["custom"]["anchor"] = ANCHOR
    assert any(
        e.key_path == key_path and "not supported with custom.anchor" in str(e)
        for e in errors_of(tmp_path, gkd)
    )


def test_anchor_prompts_need_a_teacher(tmp_path, gkd):
    del gkd["rlhf"]["teacher_model"]
    gkd["rlhf"]["llm_kd_weight"] = 0.0
    gkd["custom"]["anchor"] = ANCHOR
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.teacher_model" and "custom.anchor.dataset is set" in str(error)


def test_an_anchor_ratio_that_rounds_to_no_row_is_refused(tmp_path, gkd):
    # batch 1 and accumulation 1: a generation buffer holds one data-set row, and 0.1 of it rounds to no
    # anchor row. The rule derives the buffer as ms-swift does, so it runs with the other rules.
    gkd["custom"]["anchor"] = {**ANCHOR, "ratio": 0.1}
    gkd["training"].update({"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1})
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.anchor.ratio"
    assert "0.1 of a step of 1 data-set rows per rank rounds to no anchor row" in str(error)
    gkd["training"]["gradient_accumulation_steps"] = 4
    gkd["custom"]["anchor"]["ratio"] = 0.25  # 4 rows: round(1.33) = 1 anchor row
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).custom.anchor.active


@pytest.mark.parametrize(
    ("training", "rlhf", "rows"),
    [
        ({"per_device_train_batch_size": 1}, {}, 16),  # accumulation: ceil(16 / 1 / 1 process)
        ({"per_device_train_batch_size": 3}, {}, 18),  # ceil(16 / 3) = 6 steps of 3 rows
        ({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}, {}, 8),
        (
            {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1},
            {"steps_per_generation": 3},
            6,
        ),
        ({"per_device_train_batch_size": 2}, {"generation_batch_size": 8}, 8),
    ],
)
def test_rows_per_generation_buffer_equals_ms_swifts_own(tmp_path, gkd, training, rlhf, rows, clean_tb_env):
    """The rule's derivation against the value ms-swift derives when it builds the arguments."""
    from anchorkd.config.rules import ConfigDraft, LaunchEnvironment, rows_per_generation_buffer
    from anchorkd.swift_seam import rows_per_generation_buffer as swift_rows

    gkd["training"].update(training)
    gkd["rlhf"].update(rlhf)
    config = ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False)
    draft = ConfigDraft(config.sections, config.custom, AnchorRlhfKnobs(), LaunchEnvironment(1, False))
    settings = ConfigLoader.build_settings(config, create_output_dir=False)
    assert rows_per_generation_buffer(draft) == swift_rows(settings.train_args.training_args) == rows


def test_rows_per_generation_buffer_counts_the_processes(tmp_path, gkd):
    from anchorkd.config.rules import ConfigDraft, LaunchEnvironment, rows_per_generation_buffer

    def rows(training: dict, rlhf: dict) -> int:
        sections = {**gkd, "training": training, "rlhf": rlhf, "template": {}, "data": {}}
        return rows_per_generation_buffer(
            ConfigDraft(sections, CustomConfig(), AnchorRlhfKnobs(), LaunchEnvironment(2, False))
        )

    assert rows({"per_device_train_batch_size": 2}, {}) == 8  # ceil(16 / 2 / 2) = 4 steps of 2 rows
    assert rows({"per_device_train_batch_size": 2}, {"generation_batch_size": 8}) == 4  # 8 over 2 ranks


@pytest.mark.parametrize(
    ("training", "rlhf", "words"),
    [
        (
            {"per_device_train_batch_size": 3},
            {"generation_batch_size": 8},
            "8 is not a multiple of the global",
        ),
        (
            {"per_device_train_batch_size": 2},
            {"generation_batch_size": 8, "steps_per_generation": 3},
            "x rlhf.steps_per_generation 3: give only one of the two",
        ),
    ],
)
def test_generation_batch_fits_the_global_batch(tmp_path, gkd, training, rlhf, words):
    gkd["training"].update(training)
    gkd["rlhf"].update(rlhf)
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.generation_batch_size" and words in str(error)


def test_anchor_prompts_generate_with_at_most_one_teacher_adapter(tmp_path, gkd):
    gkd["rlhf"]["teacher_adapters"] = ["/a", "/b"]
    gkd["custom"]["anchor"] = ANCHOR
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.teacher_adapters" and "at most one teacher adapter, got 2" in str(error)


def test_seq_kd_must_be_a_boolean(tmp_path, gkd):
    gkd["rlhf"]["seq_kd"] = "yes"
    assert only_error(tmp_path, gkd).key_path == "rlhf.seq_kd"


def test_teacher_required_for_kd(tmp_path, gkd):
    del gkd["rlhf"]["teacher_model"]
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.teacher_model" and "required when rlhf.llm_kd_weight > 0" in str(error)


def test_visual_kd_needs_a_trainable_vision_path(tmp_path, gkd):
    gkd["custom"]["visual_kd"] = {"enabled": True, "weight": 1.0}
    assert only_error(tmp_path, gkd).key_path == "custom.visual_kd"


@pytest.mark.parametrize(
    ("key_path", "value", "words"),
    [
        ("rlhf.teacher_model_server", "http://127.0.0.1:8000", "needs its hidden states"),
        ("rlhf.gkd_logits_topk", 20, "uses the full vocabulary"),
        ("training.use_liger_kernel", True, "turn liger off"),
    ],
)
def test_unsupported_with_gkd_monitor_is_refused_before_loading(tmp_path, gkd, key_path, value, words):
    section, key = key_path.split(".")
    gkd[section][key] = value
    error = only_error(tmp_path, gkd)
    assert error.key_path == key_path and words in str(error)


def test_unsupported_keys_are_fine_with_ms_swifts_own_trainer(tmp_path, gkd):
    gkd["custom"] = {}
    gkd["rlhf"]["gkd_logits_topk"] = 20
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).mode == "gkd"


def test_the_launching_process_checks_for_the_processes_it_will_start(monkeypatch):
    """Before the torchrun relaunch the rules see the world size of the run (NPROC_PER_NODE x NNODES, ms-swift's
    variables); in a worker, torchrun's WORLD_SIZE."""
    from anchorkd.config.rules import LaunchEnvironment

    for name in ("WORLD_SIZE", "NPROC_PER_NODE", "NNODES"):
        monkeypatch.delenv(name, raising=False)
    assert LaunchEnvironment.detect().world_size == 1
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    assert LaunchEnvironment.detect().world_size == 2
    monkeypatch.setenv("NNODES", "3")
    assert LaunchEnvironment.detect().world_size == 6
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert LaunchEnvironment.detect().world_size == 4


@pytest.fixture
def two_cpu_ranks(monkeypatch):
    from anchorkd.config.rules import LaunchEnvironment

    monkeypatch.setattr(LaunchEnvironment, "detect", classmethod(lambda cls: cls(2, False)))


def test_explicit_use_cpu_false_with_several_cpu_ranks_is_refused(tmp_path, gkd, two_cpu_ranks):
    gkd["training"]["use_cpu"] = False
    error = only_error(tmp_path, gkd)
    assert error.key_path == "training.use_cpu" and "the ranks would train unsynchronised" in str(error)


def test_several_cpu_ranks_get_use_cpu_automatically(tmp_path, gkd, two_cpu_ranks, clean_tb_env):
    config = ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False)
    settings = ConfigLoader.build_settings(config, create_output_dir=False)
    assert settings.train_args.use_cpu is True
    assert "use_cpu" not in config.sections["training"]  # the config file is left as written


def test_one_process_keeps_ms_swifts_device_choice(tmp_path, gkd, clean_tb_env):
    config = ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False)
    assert ConfigLoader.build_settings(config, create_output_dir=False).train_args.use_cpu is False


@pytest.mark.parametrize("world_size", [1, 2])
def test_fsdp_without_a_gpu_is_refused(tmp_path, gkd, monkeypatch, world_size):
    from anchorkd.config.rules import LaunchEnvironment

    gkd["training"]["fsdp"] = "fsdp2"
    monkeypatch.setattr(LaunchEnvironment, "detect", classmethod(lambda cls: cls(world_size, False)))
    error = only_error(tmp_path, gkd)
    assert error.key_path == "training.fsdp" and "FSDP needs GPUs" in str(error)
    assert "silently trains the model unsharded" in str(error)
    monkeypatch.setattr(LaunchEnvironment, "detect", classmethod(lambda cls: cls(world_size, True)))
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).sections["training"]["fsdp"]


def test_cpu_deepspeed_accelerator_config_is_a_mapping(tmp_path, gkd, monkeypatch):
    from anchorkd.config.rules import LaunchEnvironment

    monkeypatch.setattr(LaunchEnvironment, "detect", classmethod(lambda cls: cls(1, False)))
    gkd["training"].update({"deepspeed": "zero2", "accelerator_config": "accelerate.json"})
    error = only_error(tmp_path, gkd)
    assert error.key_path == "training.accelerator_config" and "must be a mapping for DeepSpeed" in str(error)
    gkd["training"]["accelerator_config"] = {"dispatch_batches": False}
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).mode == "gkd"
    # With a GPU anchorkd adds nothing to it, and transformers reads the JSON file itself.
    monkeypatch.setattr(LaunchEnvironment, "detect", classmethod(lambda cls: cls(1, True)))
    gkd["training"]["accelerator_config"] = "accelerate.json"
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).mode == "gkd"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("zero9", "'zero9' is neither one of ms-swift's presets (zero0, zero1"),
        ("./ds_config.json", "nor an existing JSON file"),
        ("BROKEN_FILE", "is not a readable JSON file"),
        ('{"train_batch_size": 4', "is not valid JSON"),
        ('{"train_batch_size": 4}', "has no zero_optimization section"),
        ({"train_batch_size": 4}, "has no zero_optimization section"),
    ],
)
def test_deepspeed_config_is_readable(tmp_path, gkd, value, words):
    if value == "BROKEN_FILE":
        value = str(tmp_path / "ds.json")
        Path(value).write_text("{zero_optimization: }")
    gkd["training"]["deepspeed"] = value
    error = only_error(tmp_path, gkd)
    assert error.key_path == "training.deepspeed" and words in str(error)


def test_deepspeed_presets_files_and_the_teachers_config_pass(tmp_path, gkd):
    import swift

    # The preset names are ms-swift's: each is a file of its config folder.
    from anchorkd.config.rules import DEEPSPEED_PRESETS

    assert all(
        (Path(swift.__file__).parent / "config" / f"{name}.json").is_file() for name in DEEPSPEED_PRESETS
    )
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    for value in ("zero3", str(ds), {"zero_optimization": {"stage": 3}}):
        gkd["training"]["deepspeed"] = value
        assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).mode == "gkd"
    gkd["rlhf"]["teacher_deepspeed"] = "zero4"
    error = only_error(tmp_path, gkd)
    assert error.key_path == "rlhf.teacher_deepspeed" and "neither one of ms-swift's presets" in str(error)


# --- values ms-swift and transformers check only when they build the arguments -----------------------------


@pytest.mark.parametrize(
    ("key_path", "value", "words"),
    [
        ("training.optim", "adamw_bogus", "unknown value 'adamw_bogus' (did you mean adamw_"),
        ("training.lr_scheduler_type", "cosine_bogus", "unknown value 'cosine_bogus'"),
        ("training.save_strategy", "sometimes", "valid: best, epoch, no, steps"),
        ("template.template", "qwen3_vll", "did you mean qwen3_vl?"),
        ("tuner.tuner_type", "lorra", "did you mean lora?"),
    ],
)
def test_a_name_the_engine_does_not_know_names_its_key(tmp_path, gkd, key_path, value, words):
    section, key = key_path.split(".")
    gkd.setdefault(section, {})[key] = value
    error = only_error(tmp_path, gkd)
    assert error.key_path == key_path and words in str(error)


def test_names_from_ms_swift_plugins_are_left_to_ms_swift(tmp_path, gkd):
    plugin = tmp_path / "plugin.py"
    plugin.write_text("# registers a template and a tuner\n")
    gkd["template"] = {"template": "my_template"}
    gkd["training"].update({"external_plugins": [str(plugin)], "optim": "adamw_bogus"})
    # Template names can come from the plugin; transformers' optimiser names cannot.
    assert only_error(tmp_path, gkd).key_path == "training.optim"
    gkd["training"]["optim"] = "adamw_torch"
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).mode == "gkd"


@pytest.mark.parametrize("key", ["kd_spike_factor", "kd_spike_min_threshold", "sft_regression_tolerance"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), "inf"])
def test_an_alert_threshold_that_switches_its_alert_off_is_refused(tmp_path, gkd, key, value):
    gkd["custom"]["monitor"] = {key: value}
    error = only_error(tmp_path, gkd)
    assert error.key_path == f"custom.monitor.{key}"
    assert "must be a finite number" in str(error) and "custom.monitor.enabled: false" in str(error)


def test_teacher_cache_needs_gkd_monitor(tmp_path, gkd):
    gkd["custom"] = {"teacher_cache": str(tmp_path / "cache")}
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.teacher_cache" and "custom.trainer_variant: gkd_monitor" in str(error)


@pytest.mark.parametrize("lmbda", [0.5, None])  # None: ms-swift's default (0.5)
def test_teacher_cache_needs_forward_only_kd(tmp_path, gkd, lmbda):
    gkd["custom"]["teacher_cache"] = str(tmp_path / "cache")
    if lmbda is None:
        del gkd["rlhf"]["lmbda"]
    else:
        gkd["rlhf"]["lmbda"] = lmbda
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.teacher_cache" and "rlhf.lmbda: 0" in str(error) and "0.5" in str(error)
    gkd["rlhf"]["lmbda"] = 0.0
    assert ConfigLoader.resolve(write_config(tmp_path, gkd), check_files=False).custom.teacher_cache


def test_teacher_cache_refuses_visual_kd(tmp_path, gkd):
    gkd["custom"].update(
        {"teacher_cache": str(tmp_path / "cache"), "visual_kd": {"enabled": True, "weight": 1.0}}
    )
    gkd["tuner"]["freeze_aligner"] = False
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.teacher_cache" and "visual KD" in str(error)


def test_teacher_cache_refuses_seq_kd(tmp_path, gkd):
    gkd["custom"]["teacher_cache"] = str(tmp_path / "cache")
    gkd["rlhf"]["seq_kd"] = True
    error = only_error(tmp_path, gkd)
    assert error.key_path == "custom.teacher_cache" and "rlhf.seq_kd" in str(error)


def test_every_rule_is_exercised_by_a_test_here():
    source = Path(__file__).read_text()
    named = {
        "rule_numeric_ranges": "test_numeric_range_names_the_key_and_the_rule",
        "rule_rlhf_keys_need_rlhf_type": "test_rlhf_keys_need_rlhf_type",
        "rule_llm_kd_weight_needs_gkd": "test_llm_kd_weight_on_a_run_without_gkd_is_an_error",
        "rule_gkd_monitor_needs_gkd": "test_gkd_monitor_needs_gkd",
        "rule_kd_weight_needs_gkd_monitor": "test_kd_weight_other_than_one_needs_gkd_monitor",
        "rule_visual_kd_needs_gkd_monitor": "test_visual_kd_needs_gkd_monitor",
        "rule_seq_kd_needs_gkd": "test_seq_kd_needs_gkd",
        "rule_seq_kd_needs_kd_term": "test_seq_kd_needs_a_kd_term",
        "rule_seq_kd_needs_local_teacher": "test_seq_kd_needs_a_local_teacher",
        "rule_seq_kd_teacher_adapters": "test_seq_kd_teacher_adapters",
        "rule_seq_kd_needs_local_jsonl": "test_seq_kd_needs_local_jsonl",
        "rule_seq_kd_needs_dataset_batches": "test_seq_kd_with_every_batch_on_policy_is_refused",
        "rule_infer_backend_installed": "test_infer_backend_must_be_installed",
        "rule_anchor_needs_gkd": "test_anchor_needs_gkd",
        "rule_anchor_needs_gkd_monitor": "test_anchor_needs_gkd_monitor",
        "rule_anchor_needs_local_jsonl": "test_anchor_needs_local_jsonl",
        "rule_anchor_needs_padded_batches": "test_anchor_needs_padded_batches",
        "rule_anchor_ratio_gives_a_row": "test_an_anchor_ratio_that_rounds_to_no_row_is_refused",
        "rule_generation_batch_fits_the_global_batch": "test_generation_batch_fits_the_global_batch",
        "rule_teacher_cache_needs_gkd_monitor": "test_teacher_cache_needs_gkd_monitor",
        "rule_teacher_cache_needs_forward_only": "test_teacher_cache_needs_forward_only_kd",
        "rule_teacher_cache_no_visual_kd": "test_teacher_cache_refuses_visual_kd",
        "rule_teacher_cache_no_seq_kd": "test_teacher_cache_refuses_seq_kd",
        "rule_teacher_required_for_kd": "test_teacher_required_for_kd",
        "rule_visual_kd_needs_trainable_vision": "test_visual_kd_needs_a_trainable_vision_path",
        "rule_cpu_data_parallel_needs_use_cpu": "test_explicit_use_cpu_false_with_several_cpu_ranks_is_refused",
        "rule_fsdp_needs_a_gpu": "test_fsdp_without_a_gpu_is_refused",
        "rule_cpu_deepspeed_accelerator_config_is_a_mapping": "test_cpu_deepspeed_accelerator_config_is_a_mapping",
        "rule_deepspeed_config_is_readable": "test_deepspeed_config_is_readable",
        "rule_no_teacher_server_with_gkd_monitor": "test_unsupported_with_gkd_monitor_is_refused_before_loading",
        "rule_no_topk_with_gkd_monitor": "test_unsupported_with_gkd_monitor_is_refused_before_loading",
        "rule_no_liger_with_gkd_monitor": "test_unsupported_with_gkd_monitor_is_refused_before_loading",
    }
    assert {rule.__name__ for rule in RULES} == set(named)
    assert all(f"def {test}(" in source for test in named.values())


# --- where a value came from -------------------------------------------------------------------------------


def test_a_value_from_the_command_line_is_reported_as_such(tmp_path, gkd):
    error = only_error(tmp_path, gkd, ["rlhf.sft_alpha=-1"])
    assert error.source == COMMAND_LINE
    assert str(error).startswith("rlhf.sft_alpha (in (command line)): must be >= 0")


def test_a_value_from_an_extended_file_names_that_file(tmp_path, gkd):
    base = dict(gkd)
    base["rlhf"] = {**gkd["rlhf"], "beta": 2.0}
    write_config(tmp_path, base, "base.yaml")
    overlay = write_config(tmp_path, {"extends": "base.yaml", "training": {"max_steps": 3}}, "overlay.yaml")
    with pytest.raises(ConfigError) as info:
        ConfigLoader.resolve(overlay, check_files=False)
    assert info.value.key_path == "rlhf.beta"
    assert info.value.source == str((tmp_path / "base.yaml").resolve())


# --- a refused run writes nothing and exits 2 ----------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    ["rlhf.sft_alpha=-0.5", "rlhf.temperature=0", "tuner.lora_rank=0", "training.learning_rate=0"],
)
def test_train_refuses_before_writing_anything(tmp_path, gkd, capsys, override, clean_tb_env):
    config = write_config(tmp_path, gkd)
    status = main(["train", "--config", str(config), override])
    err = capsys.readouterr().err
    assert status == EXIT_BAD_INPUT
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"anchorkd: error: {override.split('=')[0]} (in (command line)): must be")
    )
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
