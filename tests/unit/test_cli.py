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
