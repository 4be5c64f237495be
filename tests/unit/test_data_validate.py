"""Training data checks before any model is loaded: each error names the file and line (or config key).

Row-length rules are in test_data_row_lengths.py; the agreement of these rules with what ms-swift
itself drops is in tests/integration/test_data_rules_match_ms_swift.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from anchorkd.checks import check_run
from anchorkd.config import ConfigError, DataError
from anchorkd.data.validate import (
    ACCEPTED_ROLES,
    ROLE_ALIASES,
    DataRules,
    check_no_opsd_rows,
    role_order_problem,
    split_dataset_entry,
    validate_dataset_entry,
    validate_jsonl,
)

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


def data_error(path: Path, rules: DataRules | None = None) -> DataError:
    with pytest.raises(DataError) as info:
        validate_jsonl(path, rules=rules)
    return info.value


TOOL_CALL = '{"name": "lookup", "arguments": {"rack": 3}}'


def chat(*roles: str) -> dict:
    """A row with these roles; tool calls get a valid call as content."""
    return {"messages": [{"role": r, "content": TOOL_CALL if "call" in r else "text"} for r in roles]}


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


@pytest.mark.parametrize(
    "entry", ["AI-ModelScope/foo", "AI-ModelScope/foo#200", "swift/self-cognition:zh", "d/mydata"]
)
def test_entry_that_is_not_local_is_refused_offline(entry, tmp_path, monkeypatch):
    """Left to ms-swift, a hub id is retried for ~45 s offline and fails after the output folder exists."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANCHORKD_ALLOW_NETWORK", raising=False)
    with pytest.raises(ConfigError) as info:
        validate_dataset_entry(entry, "data.dataset[2]")
    assert info.value.key_path == "data.dataset[2]"
    assert f"{entry!r} is not a local file, and anchorkd runs offline by default" in str(info.value)
    assert "ANCHORKD_ALLOW_NETWORK=1" in str(info.value)


@pytest.mark.parametrize("entry", ["AI-ModelScope/foo", "AI-ModelScope/foo#200", "swift/self-cognition:zh"])
def test_hub_dataset_ids_pass_when_the_network_is_allowed(entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANCHORKD_ALLOW_NETWORK", "1")
    assert validate_dataset_entry(entry, "data.dataset[0]") is None


def test_local_folder_is_accepted_offline(tmp_path, monkeypatch):
    """A folder is a local dataset repository: ms-swift loads it without a hub."""
    monkeypatch.delenv("ANCHORKD_ALLOW_NETWORK", raising=False)
    folder = tmp_path / "mydata"
    folder.mkdir()
    assert validate_dataset_entry(str(folder), "data.dataset[0]") is None
    monkeypatch.chdir(tmp_path)
    assert validate_dataset_entry("mydata", "data.dataset[0]") is None


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
    assert check_run(write_config(tmp_path, tiny_model_dir, [train]))

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


def test_config_with_a_hub_dataset_is_refused_offline(
    tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch
):
    monkeypatch.delenv("ANCHORKD_ALLOW_NETWORK", raising=False)
    train = str(synthetic_data_dir / "train.jsonl")
    with pytest.raises(ConfigError) as info:
        check_run(write_config(tmp_path, tiny_model_dir, [train, "d/mydata"]))
    assert info.value.key_path == "data.dataset[1]"
    assert "'d/mydata' is not a local file" in str(info.value)


# --- roles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "roles",
    [
        ("user", "assistant"),
        ("human", "gpt"),
        ("user", "bot"),
        ("system", "user", "assistant"),
        ("user", "tool_call", "tool", "assistant"),
        ("user", "function_call", "function_response", "assistant"),
        ("user", "function-call", "function-response", "assistant"),
        ("user", "tool_call", "tool_response", "assistant"),
        ("user", "tool_call", "observation", "observations", "assistant"),
        ("user", "tool", "assistant"),  # a tool result right after the user joins the user turn
        ("user", "user", "assistant", "assistant"),  # repeated roles merge
        ("assistant",),  # pre-training style: ms-swift puts an empty user turn first
        ("user",),  # a prompt without a response: accepted (nothing is dropped)
        ("user", "assistant", "tool"),
    ],
)
def test_roles_ms_swift_accepts_pass(tmp_path, roles):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(*roles)])
    assert validate_jsonl(path) == 1


def test_every_accepted_role_is_accepted_in_its_place(tmp_path):
    assert set(ACCEPTED_ROLES) == {
        *("system", "user", "human", "assistant", "gpt", "bot", "tool", "tool_call", "tool_response"),
        *("function_call", "function-call", "function_response", "function-response", "observation"),
        "observations",
    }
    for role in ACCEPTED_ROLES:
        roles = {
            "system": (role, "user", "assistant"),
            "user": (role, "assistant"),
            "assistant": ("user", role),
            "tool_call": ("user", role, "tool", "assistant"),
            "tool": ("user", "tool_call", role, "assistant"),
        }[ROLE_ALIASES[role]]
        path = write_jsonl(tmp_path / f"{role}.jsonl", [chat(*roles)])
        assert validate_jsonl(path) == 1, role


@pytest.mark.parametrize("role", ["User", "model", "function", "developer", "tool-call", ""])
def test_role_ms_swift_does_not_accept_names_role_and_accepted_set(tmp_path, role):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [GOOD, {"messages": [{"role": "user", "content": "Q"}, {"role": role, "content": "A"}]}],
    )
    error = data_error(path)
    assert error.line == 2
    assert f"{path}:2: messages[1].role {role!r} is not a role ms-swift accepts" in str(error)
    assert "accepted: system, user, human, assistant, gpt, bot, tool_call" in str(error)


def test_role_that_is_not_a_string_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": 3, "content": "Q"}]}])
    assert "messages[0].role 3 is not a role ms-swift accepts" in str(data_error(path))


def test_null_content_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": None}]}])
    assert str(data_error(path)) == f"{path}:1: messages[0].content is null (ms-swift drops such rows)"


@pytest.mark.parametrize(
    ("roles", "index", "why"),
    [
        (["user", "system", "assistant"], 1, "a system message must be the first message"),
        (["system", "user", "assistant", "system"], 3, "a system message must be the first message"),
        (["system"], 0, "the row has no user or assistant message"),
        (["tool", "assistant"], 0, "a tool message must follow a user or assistant message"),
        (["system", "observation", "assistant"], 1, "a tool message must follow a user or assistant message"),
        (
            ["user", "assistant", "tool", "user", "assistant"],
            3,
            "a 'user' message where ms-swift expects an assistant turn",
        ),
        (
            ["user", "tool_call", "observation", "human", "gpt"],
            3,
            "a 'human' message where ms-swift expects an assistant turn",
        ),
    ],
)
def test_role_order_ms_swift_cannot_pair(tmp_path, roles, index, why):
    assert role_order_problem(roles) == (index, why)
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, chat(*roles)])
    error = data_error(path)
    assert str(error) == f"{path}:3: messages[{index}]: {why} (ms-swift would drop the row)"


# --- media tags ---------------------------------------------------------------------------------------


def image_row(tags: int, images: list, key: str = "images", tag: str = "<image>") -> dict:
    return {
        "messages": [
            {"role": "user", "content": tag * tags + "Describe."},
            {"role": "assistant", "content": "A rack."},
        ],
        key: images,
    }


@pytest.mark.parametrize(("tags", "count"), [(0, 0), (0, 1), (0, 2), (1, 1), (2, 2)])
def test_matching_image_tags_pass(tmp_path, image, tags, count):
    path = write_jsonl(tmp_path / "d.jsonl", [image_row(tags, [str(image)] * count)])
    assert validate_jsonl(path) == 1


def test_tags_are_counted_in_every_message(tmp_path, image):
    row = {
        "messages": [
            {"role": "system", "content": "<image>"},
            {"role": "user", "content": "and <image>?"},
            {"role": "assistant", "content": "Both."},
        ],
        "images": [str(image), str(image)],
    }
    assert validate_jsonl(write_jsonl(tmp_path / "d.jsonl", [row])) == 1


@pytest.mark.parametrize(
    ("tags", "count", "why"),
    [
        (1, 0, "the extra <image> tags would be trained on as plain text"),
        (3, 2, "the extra <image> tags would be trained on as plain text"),
        (1, 2, "ms-swift would put the missing <image> tags at the start of the first message"),
    ],
)
def test_image_tags_that_do_not_match_the_images_are_refused(tmp_path, image, tags, count, why):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, image_row(tags, [str(image)] * count)])
    error = data_error(path)
    assert error.line == 2
    assert f"{tags} <image> tag(s) in the messages but {count} item(s) in 'images'" in str(error)
    assert why in str(error)


def test_video_tags_that_do_not_match_the_videos_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [image_row(2, ["a.mp4"], key="videos", tag="<video>")])
    error = data_error(path, DataRules(check_images=False))
    assert "2 <video> tag(s) in the messages but 1 item(s) in 'videos'" in str(error)
    ok = write_jsonl(tmp_path / "ok.jsonl", [image_row(1, ["a.mp4"], key="videos", tag="<video>")])
    assert validate_jsonl(ok) == 1


def test_image_content_blocks_count_as_tag_and_item(tmp_path, image):
    blocks = [{"type": "image", "image": str(image)}, {"type": "text", "text": "Describe."}]
    row = {"messages": [{"role": "user", "content": blocks}, {"role": "assistant", "content": "A rack."}]}
    assert validate_jsonl(write_jsonl(tmp_path / "ok.jsonl", [row])) == 1
    both = write_jsonl(tmp_path / "both.jsonl", [{**row, "images": [str(image)]}])
    assert "images given both as content blocks and in 'images'" in str(data_error(both))


# --- OPSD rows ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["teacher_prompt", "teacher_images"])
def test_opsd_rows_are_refused_when_asked(tmp_path, key):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, key: "x"}, {**GOOD, key: "y"}])
    assert validate_jsonl(path) == 3  # fine for ms-swift's own trainers
    expected = f"{path}:2: the row has '{key}' (ms-swift OPSD)"
    assert str(data_error(path, DataRules(refuse_opsd=True))).startswith(expected)
    with pytest.raises(DataError) as info:
        check_no_opsd_rows(path)
    assert str(info.value).startswith(expected)
    assert (
        check_no_opsd_rows(write_jsonl(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "teacher_prompt": None}])) == 2
    )


def test_dataset_entry_passes_rules_to_the_file_check(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "teacher_prompt": "x"}])
    assert validate_dataset_entry(str(path), "data.dataset[0]") == 1
    with pytest.raises(DataError, match="ms-swift OPSD"):
        validate_dataset_entry(str(path), "data.dataset[0]", DataRules(refuse_opsd=True))


@pytest.mark.parametrize(
    "content",
    [
        TOOL_CALL,
        {"name": "lookup", "arguments": {"rack": 3}},
        {"name": "lookup", "parameters": '{"rack": 3}'},
        "{'name': 'lookup', 'arguments': {}}",  # a Python literal: ms-swift falls back to literal_eval
    ],
)
def test_tool_call_content_ms_swift_can_read_passes(tmp_path, content):
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "tool_call", "content": content}]}
    assert validate_jsonl(write_jsonl(tmp_path / "d.jsonl", [record])) == 1


@pytest.mark.parametrize(
    "content",
    [
        "look up rack 3",
        '["lookup"]',
        {"arguments": {}},
        {"name": "lookup"},
        '{"name": "f", "arguments": "x y"}',
    ],
)
def test_tool_call_content_ms_swift_cannot_read_is_refused(tmp_path, content):
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "function_call", "content": content}]}
    error = data_error(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert (
        "messages[1] is a tool call, so its content must be an object (or its JSON text) with 'name'"
        in str(error)
    )
