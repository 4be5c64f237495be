"""The shared file helpers: atomic writes, JSON/JSONL with file:line errors, SHA-256, number checks."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest

from anchorkd.errors import DataError, TelemetryFormatError
from anchorkd.io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    finite_number,
    iter_jsonl,
    read_json_object,
    real_number,
    sha256_bytes,
    sha256_file,
    write_jsonl,
)


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "report.md"
    assert atomic_write_text(target, "first ünïcode\n") == target
    atomic_write_text(target, "second\n")
    assert target.read_bytes() == b"second\n"
    assert os.listdir(target.parent) == ["report.md"]
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    # Not mkstemp's owner-only mode: the mode any other new file of this process gets.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.md"]


def test_atomic_write_json_refuses_nan_unless_allowed(tmp_path):
    path = tmp_path / "scores.json"
    atomic_write_json(path, {"name": "café", "value": 0.5})
    assert path.read_text(encoding="utf-8") == '{\n  "name": "café",\n  "value": 0.5\n}\n'
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic_write_json(path, {"value": math.nan})
    assert json.loads(path.read_text())["value"] == 0.5  # the old file is untouched
    atomic_write_json(path, {"value": math.nan}, allow_nan=True)
    assert "NaN" in path.read_text()


def test_write_jsonl_then_iter_jsonl_round_trip(tmp_path):
    path = tmp_path / "records.jsonl"
    records = [{"a": 1, "text": "ünïcode"}, [1, 2], "plain"]
    assert write_jsonl(path, iter(records)) == 3
    assert path.read_text(encoding="utf-8").splitlines()[0] == '{"a": 1, "text": "ünïcode"}'
    assert list(iter_jsonl(path)) == [(1, records[0]), (2, records[1]), (3, records[2])]
    append_jsonl(path, [{"b": 2}])
    assert list(iter_jsonl(path))[-1] == (4, {"b": 2})


def test_write_jsonl_leaves_no_file_when_the_records_fail(tmp_path):
    path = tmp_path / "generations.jsonl"

    def records():
        yield {"id": 1}
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        write_jsonl(path, records())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (b'{"a": 1}\n\n{not json\n', 3, "not valid JSON"),
        (b'{"a": 1}\n\xff\xfe\n', 2, "not valid UTF-8 text"),
    ],
)
def test_iter_jsonl_names_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"bad.jsonl:{line}: {message}") as caught:
        list(iter_jsonl(path))
    assert (caught.value.path, caught.value.line) == (str(path), line)
    with pytest.raises(TelemetryFormatError, match=f"bad.jsonl:{line}: {message}"):
        list(iter_jsonl(path, error=TelemetryFormatError))


def test_iter_jsonl_keeps_nan_literals(tmp_path):
    path = tmp_path / "logging.jsonl"
    path.write_text('{"loss": NaN, "grad": Infinity}\n')
    [(_, record)] = list(iter_jsonl(path))
    assert math.isnan(record["loss"]) and record["grad"] == math.inf


def test_read_json_object(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"ppl": 3.5}')
    assert read_json_object(good) == {"ppl": 3.5}
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "ppl": 3.5,\n}')
    with pytest.raises(DataError, match=r"bad\.json:3: not valid JSON"):
        read_json_object(bad)
    array = tmp_path / "array.json"
    array.write_text("[1]")
    with pytest.raises(DataError, match="array.json: must hold a JSON object"):
        read_json_object(array)
    with pytest.raises(DataError, match="missing.json: file not found"):
        read_json_object(tmp_path / "missing.json")


def test_sha256_of_bytes_and_of_a_file_read_in_chunks(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_bytes(data) == expected
    assert sha256_file(path) == expected
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    ("value", "real", "finite"),
    [
        (3, 3.0, 3.0),
        (-0.5, -0.5, -0.5),
        (True, None, None),
        ("3/10", None, None),
        (None, None, None),
        (math.inf, math.inf, None),
    ],
)
def test_number_checks(value, real, finite):
    assert real_number(value) == real
    assert finite_number(value) == finite
    assert isinstance(real_number(value), float | type(None))


def test_nan_is_real_but_not_finite():
    assert math.isnan(real_number(math.nan))
    assert finite_number(math.nan) is None
