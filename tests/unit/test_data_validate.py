"""Training data checks before any model is loaded: each error names the file and line (or config key)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from anchorkd.checks import check_run
from anchorkd.config import ConfigError, DataError
from anchorkd.data.validate import split_dataset_entry, validate_dataset_entry, validate_jsonl

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item is a record (dumped as JSON) or a raw string written as is."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def data_error(path: Path) -> DataError:
    with pytest.raises(DataError) as info:
        validate_jsonl(path)
    return info.value


def test_synthetic_data_set_is_valid(synthetic_data_dir):
    train = synthetic_data_dir / "train.jsonl"
    lines = [line for line in train.read_text().splitlines() if line.strip()]
    assert validate_jsonl(train) == len(lines) == 6
    assert validate_dataset_entry(str(train), "data.dataset[0]") == 6


def test_valid_records_with_images_are_counted(tmp_path, image):
    path = write_jsonl(
        tmp_path / "ok.jsonl",
        [
            {**GOOD, "images": [str(image)]},
            "",  # blank lines are skipped
            {**GOOD, "images": str(image)},  # a single path is fine
            {**GOOD, "images": [{"path": str(image)}, "https://example.com/x.png"]},  # URLs are not fetched
        ],
    )
    assert validate_jsonl(path) == 3


def test_line_that_is_not_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", '{"messages": [', GOOD])
    error = data_error(path)
    assert (error.path, error.line) == (str(path), 3)
    assert str(error).startswith(f"{path}:3: not valid JSON")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"conversation": []}, "record has no 'messages' field"),
        ({"messages": "hello"}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be an object with 'role' and 'content'"),
        ([GOOD], "a record must be a JSON object, got list"),
        ({**GOOD, "images": 5}, "'images' must be a list of paths"),
        ({**GOOD, "images": [5]}, "image entry 5 is not a path"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, record])
    error = data_error(path)
    assert error.line == 2
    assert f"{path}:2: {expected}" in str(error)


def test_missing_image_names_file_line_and_image(tmp_path, image):
    missing = tmp_path / "images" / "gone.png"
    path = write_jsonl(
        tmp_path / "d.jsonl", [{**GOOD, "images": [str(image)]}, {**GOOD, "images": [str(missing)]}]
    )
    error = data_error(path)
    assert str(error) == f"{path}:2: image not found: {missing}"


def test_file_that_is_not_an_image_names_file_and_line(tmp_path, image):
    garbage = tmp_path / "x.png"
    garbage.write_bytes(b"\x00\x01 definitely not a PNG \xff" * 8)
    path = write_jsonl(
        tmp_path / "d.jsonl", [{**GOOD, "images": [str(image)]}, GOOD, {**GOOD, "images": [str(garbage)]}]
    )
    error = data_error(path)
    assert error.line == 3
    assert f"{path}:3: not a readable image: {garbage}" in str(error)


def test_image_checks_can_be_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "images": [str(tmp_path / "gone.png")]}])
    assert validate_jsonl(path, check_images=False) == 1


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_rejected(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    error = data_error(path)
    assert error.line is None
    assert str(error) == f"{path}: the file holds no records"


def test_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\xe9"}\n'.encode("latin-1"))
    error = data_error(path)
    assert error.line == 2
    assert f"{path}:2: not valid UTF-8" in str(error)


# --- dataset entries in the config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("data/train.jsonl#100", ("data/train.jsonl", "100")),
        ("data/train.jsonl", ("data/train.jsonl", None)),
        ("AI-ModelScope/foo#500", ("AI-ModelScope/foo", "500")),
        ("odd#name.jsonl", ("odd#name.jsonl", None)),
    ],
)
def test_split_dataset_entry(entry, expected):
    assert split_dataset_entry(entry) == expected


def test_sampling_suffix_is_accepted(synthetic_data_dir, tmp_path):
    train = synthetic_data_dir / "train.jsonl"
    assert validate_dataset_entry(f"{train}#3", "data.dataset[0]") == 6
    with pytest.raises(ConfigError) as info:
        validate_dataset_entry(f"{tmp_path / 'gone.jsonl'}#3", "data.dataset[0]")
    assert info.value.key_path == "data.dataset[0]"
    assert f"data file not found: {tmp_path / 'gone.jsonl'}" in str(info.value)


@pytest.mark.parametrize("entry", ["AI-ModelScope/foo", "AI-ModelScope/foo#200", "swift/self-cognition:zh"])
def test_hub_dataset_ids_are_not_treated_as_local_files(entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert validate_dataset_entry(entry, "data.dataset[0]") is None


@pytest.mark.parametrize("entry", ["./AI-ModelScope/foo", "rel/train.jsonl", "/abs/train.jsonl"])
def test_local_looking_entries_must_exist(entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="data file not found"):
        validate_dataset_entry(entry, "data.dataset[0]")


def write_config(tmp_path, tiny_model_dir, dataset, val_dataset=None) -> Path:
    data = {"dataset": dataset, **({"val_dataset": val_dataset} if val_dataset else {})}
    config = {
        "model": {"model": str(tiny_model_dir)},
        "data": data,
        "training": {"output_dir": str(tmp_path / "out")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_with_missing_data_file_names_the_key_and_path(tmp_path, tiny_model_dir, synthetic_data_dir):
    train = str(synthetic_data_dir / "train.jsonl")
    assert check_run(write_config(tmp_path, tiny_model_dir, [train, "AI-ModelScope/foo#10"]))

    gone = tmp_path / "gone.jsonl"
    with pytest.raises(ConfigError) as info:
        check_run(write_config(tmp_path, tiny_model_dir, [str(gone)]))
    assert info.value.key_path == "data.dataset[0]"
    assert f"data file not found: {gone}" in str(info.value)

    with pytest.raises(ConfigError) as info:
        check_run(write_config(tmp_path, tiny_model_dir, [train], [train, str(gone)]))
    assert info.value.key_path == "data.val_dataset[1]"


def test_config_with_a_bad_data_line_reports_file_and_line(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, {"messages": "x"}])
    with pytest.raises(DataError, match=f"{bad}:3: 'messages' must be a non-empty list"):
        check_run(write_config(tmp_path, tiny_model_dir, [str(bad)]))
