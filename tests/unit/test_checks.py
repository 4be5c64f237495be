"""``anchorkd.checks.check_run`` applies the data rules that follow from the config: row lengths against
``template.max_length`` with the student's tokenizer, and no OPSD rows for anchorkd's GKD trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from anchorkd.checks import check_run, data_rules
from anchorkd.cli import EXIT_BAD_INPUT, main
from anchorkd.config import ConfigLoader, DataError

ROW = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}
LONG = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}


def write(folder: Path, name: str, rows: list[dict]) -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config_file(folder: Path, tiny_model_dir: Path, dataset: Path, gkd: bool, **template) -> Path:
    config = {
        "model": {"model": str(tiny_model_dir), "model_type": "qwen3_vl"},
        "data": {"dataset": [str(dataset)]},
        "template": {"max_length": 64, **template},
        "tuner": {"tuner_type": "lora"},
        "training": {"output_dir": str(folder / "out")},
    }
    if gkd:
        config["rlhf"] = {"rlhf_type": "gkd", "teacher_model": str(tiny_model_dir), "llm_kd_weight": 0.5}
        config["custom"] = {"trainer_variant": "gkd_monitor"}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_rows_longer_than_max_length_are_refused_with_count_and_first_line(tmp_path, tiny_model_dir):
    data = write(tmp_path, "train.jsonl", [ROW, LONG, ROW, LONG])
    with pytest.raises(DataError) as info:
        check_run(config_file(tmp_path, tiny_model_dir, data, gkd=False))
    assert f"{data}:2: 2 row(s) longer than template.max_length (64 tokens)" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_truncation_instead_of_dropping_lets_long_rows_through(tmp_path, tiny_model_dir):
    data = write(tmp_path, "train.jsonl", [ROW, LONG])
    config = check_run(
        config_file(tmp_path, tiny_model_dir, data, gkd=False, truncation_strategy="left"), teacher=False
    )
    assert data_rules(config).truncation_strategy == "left"


def test_opsd_rows_are_refused_for_gkd_monitor_only(tmp_path, tiny_model_dir):
    opsd = {**ROW, "teacher_prompt": "a different prompt"}
    data = write(tmp_path, "train.jsonl", [ROW, opsd])
    with pytest.raises(DataError, match=f"{data}:2"):
        check_run(config_file(tmp_path, tiny_model_dir, data, gkd=True))
    sft = ConfigLoader.resolve(config_file(tmp_path, tiny_model_dir, data, gkd=False))
    assert data_rules(sft).refuse_opsd is False


def test_cli_validate_reports_a_data_rule_and_exits_2(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path, "train.jsonl", [LONG])
    status = main(["validate", str(config_file(tmp_path, tiny_model_dir, data, gkd=False))])
    err = capsys.readouterr().err
    assert status == EXIT_BAD_INPUT
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"anchorkd: error: {data}:1: 1 row(s) longer than template.max_length")
    )
    assert "Traceback" not in err


def anchor_config(folder: Path, tiny_model_dir: Path, dataset: Path, anchor: list[str]) -> Path:
    path = config_file(folder, tiny_model_dir, dataset, gkd=True)
    config = yaml.safe_load(path.read_text())
    config["custom"]["anchor"] = {"dataset": anchor, "ratio": 0.25}
    path.write_text(yaml.safe_dump(config))
    return path


def test_anchor_prompt_files_are_checked_like_the_data(tmp_path, tiny_model_dir):
    """A missing anchor file names its key; a bad anchor row names its file:line; a prompt without an
    assistant turn is fine (the teacher answers it before training)."""
    from anchorkd.config import ConfigError

    data = write(tmp_path, "train.jsonl", [ROW])
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ConfigError) as info:
        check_run(anchor_config(tmp_path, tiny_model_dir, data, [str(missing)]), teacher=False)
    assert info.value.key_path == "custom.anchor.dataset[0]" and "data file not found" in str(info.value)
    prompt_only = {"messages": [{"role": "user", "content": "describe the scene"}]}
    bad = {"messages": [{"role": "narrator", "content": "x"}]}
    anchors = write(tmp_path, "anchors.jsonl", [prompt_only, ROW, bad])
    with pytest.raises(DataError) as info:
        check_run(anchor_config(tmp_path, tiny_model_dir, data, [str(anchors)]), teacher=False)
    assert str(info.value).startswith(f"{anchors}:3: messages[0].role 'narrator'")
    anchors = write(tmp_path, "anchors.jsonl", [prompt_only, ROW])
    config = check_run(anchor_config(tmp_path, tiny_model_dir, data, [str(anchors)]), teacher=False)
    assert config.custom.anchor.dataset == [str(anchors)]
    assert not (tmp_path / "out").exists()


def seq_kd_config(folder: Path, tiny_model_dir: Path, dataset: Path, anchor: list[str] | None = None) -> Path:
    path = config_file(folder, tiny_model_dir, dataset, gkd=True)
    config = yaml.safe_load(path.read_text())
    config["rlhf"]["seq_kd"] = anchor is None
    if anchor is not None:
        config["custom"]["anchor"] = {"dataset": anchor, "ratio": 0.5}
    path.write_text(yaml.safe_dump(config))
    return path


def test_rows_the_teacher_answers_are_checked_before_it_loads(tmp_path, tiny_model_dir):
    """seq_kd prompts the teacher with every row; a row it cannot take is refused by the checks, with its
    file:line, before the teacher loads or anything is written to the teacher-answer cache."""
    tools = {**ROW, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    (tmp_path / "d").mkdir()
    data = write(tmp_path / "d", "train.jsonl", [ROW, tools])
    with pytest.raises(DataError) as info:
        check_run(seq_kd_config(tmp_path, tiny_model_dir, data), teacher=False)
    assert str(info.value).startswith(f"{data}:2: the teacher is prompted with messages and images only")
    assert "this row also has 'tools'" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "run.yaml"]  # no cache, no output dir
    data = write(tmp_path / "d", "train.jsonl", [ROW, ROW])
    assert check_run(seq_kd_config(tmp_path, tiny_model_dir, data), teacher=False).seq_kd


def test_anchor_rows_without_an_answer_are_checked_as_teacher_prompts(tmp_path, tiny_model_dir):
    (tmp_path / "d").mkdir()
    data = write(tmp_path / "d", "train.jsonl", [ROW])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    answered = {**ROW, "tools": tools}  # keeps its own answer: the teacher never sees it
    prompt = {"messages": [{"role": "user", "content": "describe the scene"}], "tools": tools}
    anchors = write(tmp_path / "d", "anchors.jsonl", [answered, prompt])
    with pytest.raises(DataError) as info:
        check_run(seq_kd_config(tmp_path, tiny_model_dir, data, [str(anchors)]), teacher=False)
    assert str(info.value).startswith(f"{anchors}:2: the teacher is prompted with messages and images only")
    anchors = write(tmp_path / "d", "anchors.jsonl", [answered, {"messages": prompt["messages"]}])
    config = check_run(seq_kd_config(tmp_path, tiny_model_dir, data, [str(anchors)]), teacher=False)
    assert config.custom.anchor.active and not config.seq_kd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "run.yaml"]


def test_the_checks_start_no_distributed_state_in_a_torchrun_worker(tmp_path, tiny_model_dir, monkeypatch):
    """Every rank runs the checks before training; building ms-swift's (transformers') arguments would join the
    process group there (their device set-up), so the checks build none."""
    import torch.distributed

    class JoinedProcessGroup(RuntimeError):
        pass

    def refuse(*args, **kwargs):
        raise JoinedProcessGroup("the checks started a process group")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens: joining would fail, not wait
    data = write(tmp_path, "train.jsonl", [ROW, ROW])
    config = check_run(config_file(tmp_path, tiny_model_dir, data, gkd=True))
    assert config.mode == "gkd" and not torch.distributed.is_initialized()
    assert not (tmp_path / "out").exists()
