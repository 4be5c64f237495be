"""The ``anchorkd`` command line, run in-process: exit codes, messages, and what is (not) written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from anchorkd.cli import EXIT_BAD_INPUT, main

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_STAGE_2 = REPO_ROOT / "configs" / "demo" / "stage_2_llm_lora.yaml"
DEMO_GKD = REPO_ROOT / "configs" / "demo" / "stage_2_llm_lora_gkd.yaml"
DEMO_ANCHOR = REPO_ROOT / "configs" / "demo" / "anchor_prompts.yaml"
TB_ENV = "TENSORBOARD_LOGGING_DIR"


def runs_snapshot(workdir: Path) -> list[str] | None:
    """What is under the demo configs' output root (None: not even the folder)."""
    runs = workdir / "outputs" / "demo" / "runs"
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*")) if runs.exists() else None


def test_validate_demo_config_passes_and_writes_nothing(in_demo_workdir, capsys):
    before = runs_snapshot(in_demo_workdir)
    code = main(["validate", str(DEMO_STAGE_2)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{DEMO_STAGE_2}: OK (sft, SftArguments)" in out
    assert "trainer_variant=default llm_kd_weight=1.0 visual_kd=off" in out
    assert runs_snapshot(in_demo_workdir) == before
    assert TB_ENV not in os.environ


def test_validate_print_shows_the_resolved_yaml(in_demo_workdir, capsys):
    before = runs_snapshot(in_demo_workdir)
    code = main(["validate", "--print", str(DEMO_STAGE_2), "training.max_steps=7"])
    out, err = capsys.readouterr()
    assert code == 0, err
    header = "# Resolved by anchorkd from: "
    assert header in out
    resolved_text = out[out.index(header) :]
    sources = resolved_text.splitlines()[0].removeprefix(header).split(", ")
    assert [Path(s).name for s in sources] == ["stage_2_llm_lora.yaml", "_tiny.yaml", "stage_2_llm_lora.yaml"]
    resolved = yaml.safe_load(resolved_text)
    # Values from each layer of the extends chain, the override, and anchorkd's own defaults.
    assert resolved["model"]["model"] == "./outputs/demo/tiny-qwen3-vl"  # _tiny.yaml
    assert resolved["model"]["model_type"] == "qwen3_vl"  # configs/stage_2_llm_lora.yaml
    assert resolved["training"]["output_dir"] == "./outputs/demo/runs/stage_2_llm_lora"  # the demo file
    assert resolved["training"]["max_steps"] == 7  # the override
    assert resolved["rlhf"] == {"llm_kd_weight": 1.0}
    assert resolved["custom"]["trainer_variant"] == "default"
    assert runs_snapshot(in_demo_workdir) == before


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["training.learning_rat=1"], "training.learning_rat"),
        (["training.learning_rate=fast"], "training.learning_rate"),
        (["rlhf.llm_kd_weight=-0.1"], "rlhf.llm_kd_weight"),
        (["modle.model=x"], "modle"),
        (["model.model=./outputs/demo/missing-model"], "model.model"),
        (["data.dataset=[./outputs/demo/data/missing.jsonl]"], "data.dataset[0]"),
        (["custom.trainer_variant=gkd_monitor"], "custom.trainer_variant"),
        (["novalue"], "'novalue' must look like section.key=value"),
        (
            ["training.resume_from_checkpoint=./outputs/demo/runs/stage_2_llm_lora/checkpoint-3"],
            "training.resume_from_checkpoint (in (command line)): checkpoint not found",
        ),
    ],
)
def test_validate_failure_exits_2_naming_the_key(in_demo_workdir, capsys, overrides, expected):
    before = runs_snapshot(in_demo_workdir)
    code = main(["validate", str(DEMO_STAGE_2), *overrides])
    out, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    # ms-swift may log its own INFO line when first imported; anchorkd's error is the last thing said
    assert err.strip().splitlines()[-1].startswith("anchorkd: error: ") and "Traceback" not in err
    assert expected in err
    assert "OK" not in out
    assert runs_snapshot(in_demo_workdir) == before


def test_validate_bad_data_line_exits_2_naming_file_and_line(in_demo_workdir, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad.write_text(json.dumps(good) + "\n" + "{not json\n")
    code = main(["validate", str(DEMO_STAGE_2), f"data.dataset=[{bad}]"])
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert f"{bad}:2: not valid JSON" in err


def test_validate_missing_config_file_exits_2(tmp_path, capsys):
    code = main(["validate", str(tmp_path / "nope.yaml")])
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert f"config: config file not found: {tmp_path / 'nope.yaml'}" in err


def test_validate_invalid_yaml_exits_2_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model: x\ndata: [unclosed\n")
    code = main(["validate", str(bad)])
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert f"invalid YAML at {bad}:" in err


def test_train_with_a_bad_config_exits_2_and_writes_nothing(in_demo_workdir, capsys, tmp_path):
    out_dir = tmp_path / "run"
    before = runs_snapshot(in_demo_workdir)
    code = main(
        ["train", "--config", str(DEMO_STAGE_2), f"training.output_dir={out_dir}", "rlhf.llm_kd_weight=-1"]
    )
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert "rlhf.llm_kd_weight" in err and "non-negative" in err
    assert not out_dir.exists()
    assert runs_snapshot(in_demo_workdir) == before


def test_make_tiny_model_refuses_a_non_empty_dir(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["make-tiny-model", str(out)])
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert "exists and is not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder beside it
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_make_synthetic_data_quick_writes_the_files(tmp_path, capsys):
    from anchorkd.demo.synthetic import MANIFEST_FILE, SPLIT_FILES

    out = tmp_path / "data"
    code = main(["make-synthetic-data", str(out), "--quick"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    for split, name in SPLIT_FILES.items():
        assert (out / name).is_file()
        assert f"{split}: {out / name}" in stdout
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["counts"]["train.jsonl"] == 6  # SyntheticSizes.quick()
    assert any((out / "images").iterdir())

    # A second run into the same folder refuses to overwrite it.
    code = main(["make-synthetic-data", str(out), "--quick"])
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert "exists and is not empty" in err


def test_validate_resume_auto(in_demo_workdir, capsys, tmp_path):
    """``auto`` with no checkpoint is a fresh run; with one, the run it continues is named."""
    before = runs_snapshot(in_demo_workdir)
    auto = ["training.resume_from_checkpoint=auto", f"training.output_dir={tmp_path}"]
    assert main(["validate", str(DEMO_STAGE_2), *auto]) == 0
    assert "resumes from" not in capsys.readouterr().out
    checkpoint = tmp_path / "v0-20260101-000000" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).write_bytes(b"x")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    code = main(["validate", str(DEMO_STAGE_2), *auto])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"resumes from {checkpoint} (step 2) into {checkpoint.parent}" in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["v0-20260101-000000", "checkpoint-2", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"]
        + ["rng_state.pth", "trainer_state.json"]
    )
    assert runs_snapshot(in_demo_workdir) == before


# --- every refusal before anything loads: validate, check and train alike ----------------------------------


def command_line(command: str, config: Path, overrides: list[str], out: Path) -> list[str]:
    """``anchorkd COMMAND`` of ``config`` in the form each command takes."""
    if command == "train":
        return ["train", "--config", str(config), *overrides]
    if command == "teacher-targets":
        return ["teacher-targets", "--config", str(config), "--out", str(out), *overrides]
    return [command, str(config), *overrides]


def assert_refused(capsys, args: list[str], key_path: str, words: str) -> str:
    code = main(args)
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert code == EXIT_BAD_INPUT, (out, err)
    assert last.startswith(f"anchorkd: error: {key_path} (in ") and words in last, last
    assert "Traceback" not in err and "<ms-swift>" not in err
    return last


@pytest.mark.parametrize("command", ["validate", "check", "train"])
@pytest.mark.parametrize(
    ("override", "key_path", "words"),
    [
        # ms-swift's and transformers' knobs: named by their own key, not by ms-swift or a data file
        ("training.optim=adamw_bogus", "training.optim", "unknown value 'adamw_bogus'"),
        ("template.template=qwen3_bogus", "template.template", "unknown value 'qwen3_bogus'"),
        ("training.deepspeed=zero9", "training.deepspeed", "neither one of ms-swift's presets"),
        ("template.max_pixels=-5", "template.max_pixels", "must be >= 1"),
        ("training.adam_epsilon=.nan", "training.adam_epsilon", "must be > 0"),
        # settings that would make a feature inert
        ("rlhf.seq_kd=true", "rlhf.seq_kd", "has no effect with rlhf.lmbda: 1"),
        ("custom.monitor.kd_spike_factor=.inf", "custom.monitor.kd_spike_factor", "must be a finite number"),
    ],
)
def test_a_refused_value_names_its_key_and_writes_nothing(
    in_demo_workdir, capsys, tmp_path, command, override, key_path, words
):
    out_dir = tmp_path / "run"
    overrides = [f"training.output_dir={out_dir}", "rlhf.lmbda=1", override]
    assert_refused(capsys, command_line(command, DEMO_GKD, overrides, tmp_path / "t.jsonl"), key_path, words)
    assert sorted(tmp_path.iterdir()) == []  # no output dir, no teacher-answer cache beside it
    assert runs_snapshot(in_demo_workdir) is None


@pytest.mark.parametrize("command", ["validate", "check", "train"])
def test_a_key_written_twice_is_refused_with_file_and_line(in_demo_workdir, capsys, tmp_path, command):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"extends: {DEMO_GKD}\nrlhf:\n  llm_kd_weight: 1.0\ntraining:\n  output_dir: {tmp_path / 'run'}\n"
        "rlhf:\n  llm_kd_weight: 0.0\n"
    )
    last = assert_refused(
        capsys, command_line(command, config, [], tmp_path / "t.jsonl"), "rlhf", "lines 2 and 6"
    )
    assert f"(in {config}:6)" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


@pytest.mark.parametrize("command", ["validate", "check", "train"])
@pytest.mark.parametrize(
    ("where", "words"),
    [("a_file", "exists and is not a folder"), ("a_file/run", "a_file is a file, not a folder")],
)
def test_an_output_dir_that_cannot_be_a_folder_is_refused(
    in_demo_workdir, capsys, tmp_path, command, where, words
):
    (tmp_path / "a_file").write_text("mine")
    args = command_line(command, DEMO_GKD, [f"training.output_dir={tmp_path / where}"], tmp_path / "t.jsonl")
    assert_refused(capsys, args, "training.output_dir", words)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"] and (tmp_path / "a_file").read_text() == "mine"


def test_an_output_dir_that_cannot_be_written_is_refused(in_demo_workdir, capsys, tmp_path, monkeypatch):
    """Checked with the permission the process has (os.access), never by creating the folder."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    for target, words in (
        (locked, "is not writable"),
        (locked / "run", f"cannot be created: {locked} is not"),
    ):
        args = ["validate", str(DEMO_GKD), f"training.output_dir={target}"]
        assert_refused(capsys, args, "training.output_dir", words)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command", ["validate", "check", "teacher-targets", "train"])
def test_an_anchor_ratio_that_rounds_to_no_row_is_refused_before_the_teacher_loads(
    in_demo_workdir, capsys, tmp_path, command
):
    """A rule on the rows ms-swift derives per generation buffer: refused by every command, before a teacher
    is loaded or its answers are written (the teacher-answer cache sits beside the output dir)."""
    overrides = [
        f"training.output_dir={tmp_path / 'runs' / 'anchor'}",
        "training.per_device_train_batch_size=1",
        "training.gradient_accumulation_steps=1",
        "custom.anchor.ratio=0.1",
    ]
    args = command_line(command, DEMO_ANCHOR, overrides, tmp_path / "answers.jsonl")
    assert_refused(capsys, args, "custom.anchor.ratio", "rounds to no anchor row")
    assert list(tmp_path.iterdir()) == []
    assert runs_snapshot(in_demo_workdir) is None


def test_other_torchrun_ranks_leave_a_refusal_to_rank_0(in_demo_workdir, capsys, monkeypatch):
    bad = ["validate", str(DEMO_GKD), "training.optim=adamw_bogus"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert main(bad) == EXIT_BAD_INPUT
    assert "anchorkd: error" not in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert main(bad) == EXIT_BAD_INPUT
    assert "anchorkd: error: training.optim" in capsys.readouterr().err


# --- one command-line shape: FILE or --config FILE on every command that takes a config ---------------------

CONFIG_COMMANDS = ("train", "validate", "check", "teacher-targets")


def extra_options(command: str, tmp_path: Path) -> list[str]:
    return ["--out", str(tmp_path / "targets.jsonl")] if command == "teacher-targets" else []


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("form", ["positional", "option", "option last"])
def test_config_commands_take_the_config_as_file_or_as_option(monkeypatch, tmp_path, command, form):
    import anchorkd.cli as cli

    seen = []
    handler = f"_cmd_{command.replace('-', '_')}"
    monkeypatch.setattr(cli, handler, lambda ns: seen.append((ns.config, ns.overrides)) or 0)
    config, overrides = "run.yaml", ["training.max_steps=3", "rlhf.beta=0.5"]
    arguments = {
        "positional": [config, *overrides],
        "option": ["--config", config, *overrides],
        "option last": [*overrides, "--config", config],
    }[form]
    assert main([command, *extra_options(command, tmp_path), *arguments]) == 0
    assert seen == [(config, overrides)]


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["a.yaml", "--config", "b.yaml"],
            "the config file is given twice (a.yaml and --config b.yaml): give one",
        ),
        (
            ["--config", "b.yaml", "a.yml", "x.y=1"],
            "the config file is given twice (a.yml and --config b.yaml)",
        ),
        ([], "a config file is required: FILE or --config FILE"),
        (["training.max_steps=3"], "a config file is required: FILE or --config FILE"),
    ],
)
def test_config_given_twice_or_not_at_all_is_a_usage_error(
    monkeypatch, capsys, tmp_path, command, arguments, message
):
    import anchorkd.cli as cli

    monkeypatch.setattr(cli, f"_cmd_{command.replace('-', '_')}", lambda ns: pytest.fail("the command ran"))
    with pytest.raises(SystemExit) as exited:
        main([command, *extra_options(command, tmp_path), *arguments])
    _, err = capsys.readouterr()
    assert exited.value.code == EXIT_BAD_INPUT
    assert f"usage: anchorkd {command} [options] (FILE | --config FILE)" in err
    assert f"anchorkd {command}: error: {message}" in err
    assert list(tmp_path.iterdir()) == []


def test_validate_with_the_config_option_reads_the_same_config(in_demo_workdir, capsys):
    before = runs_snapshot(in_demo_workdir)
    assert main(["validate", "--config", str(DEMO_STAGE_2), "training.max_steps=7"]) == 0
    out, _ = capsys.readouterr()
    assert f"{DEMO_STAGE_2}: OK (sft, SftArguments)" in out
    # beside --config, an argument that is no config file stays an override and is checked as one
    assert main(["validate", "--config", str(DEMO_STAGE_2), "novalue"]) == EXIT_BAD_INPUT
    assert "'novalue' must look like section.key=value" in capsys.readouterr().err
    assert runs_snapshot(in_demo_workdir) == before
