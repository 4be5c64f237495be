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
from test_data_media import corrupt_stream_png, oversized_png, truncated_jpeg

from anchorkd.checks import check_run
from anchorkd.cli import EXIT_BAD_INPUT, main
from anchorkd.config import ConfigError, DataError
from anchorkd.data import media
from anchorkd.data.validate import (
    ACCEPTED_ROLES,
    ROLE_ALIASES,
    DataRules,
    DatasetEntry,
    check_no_opsd_rows,
    parse_dataset_entry,
    role_order_problem,
    validate_dataset_entry,
    validate_jsonl,
)

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.fixture(autouse=True)
def media_cache(tmp_path, monkeypatch) -> Path:
    """Each test remembers decoded images in its own folder, never in the user's cache."""
    path = tmp_path / "media-verified.txt"
    monkeypatch.setenv(media.MEDIA_CACHE_ENV, str(path))
    return path


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


def test_valid_records_with_images_are_counted(tmp_path, image, monkeypatch):
    monkeypatch.setenv("ANCHORKD_ALLOW_NETWORK", "1")  # a URL is refused offline (test_data_media.py)
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
    assert str(error) == (
        f"{path}:2: image not found: {missing} (images[0]; ms-swift would replace the row with another one)"
    )


def test_file_that_is_not_an_image_names_file_and_line(tmp_path, image):
    garbage = tmp_path / "x.png"
    garbage.write_bytes(b"\x00\x01 definitely not a PNG \xff" * 8)
    path = write_jsonl(
        tmp_path / "d.jsonl", [{**GOOD, "images": [str(image)]}, GOOD, {**GOOD, "images": [str(garbage)]}]
    )
    error = data_error(path)
    assert error.line == 3
    assert f"{path}:3: not a readable image: {garbage} (UnidentifiedImageError: cannot identify" in str(error)


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
        ("data/train.jsonl#100", DatasetEntry("data/train.jsonl", sample="100")),
        ("data/train.jsonl", DatasetEntry("data/train.jsonl")),
        ("AI-ModelScope/foo#500", DatasetEntry("AI-ModelScope/foo", sample="500")),
        ("swift/self-cognition:zh/en#20", DatasetEntry("swift/self-cognition", ("zh", "en"), "20")),
        ("hf::org/name", DatasetEntry("org/name", hub="hf")),
        ("odd#name.jsonl", DatasetEntry("odd", sample="name.jsonl")),  # as ms-swift splits it
    ],
)
def test_parse_dataset_entry_follows_ms_swift(entry, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_dataset_entry(entry) == expected


def test_an_existing_path_is_never_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("odd#name.jsonl", "a:b.jsonl", "x::y.jsonl"):
        write_jsonl(tmp_path / name, [GOOD])
        assert parse_dataset_entry(name) == DatasetEntry(name)
        assert validate_dataset_entry(name, "data.dataset[0]") == 1


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
    assert validate_jsonl(ok, check_images=False) == 1


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


# --- content types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (3, "messages[0].content must be text or a list of content blocks, got a number (3)"),
        (True, "messages[0].content must be text or a list of content blocks, got a boolean (true)"),
        (
            {"text": "Q"},
            'messages[0].content must be text or a list of content blocks, got an object ({"text": "Q"})',
        ),
        ([1, 2], "messages[0].content[0] must be a content block: an object with a 'type' (text, image, "),
        ([{"text": "Q"}], "messages[0].content[0] must be a content block: an object with a 'type'"),
        (
            [{"type": "input_text", "text": "Q"}],
            "messages[0].content[0] has type 'input_text', which ms-swift does not",
        ),
        (
            [{"type": "text", "text": 5}],
            "messages[0].content[0] is a text block, so its 'text' must be text, got a number",
        ),
        ([{"type": "text"}], "messages[0].content[0] is a text block, so its 'text' must be text, got null"),
    ],
)
def test_content_of_the_wrong_type_is_refused(tmp_path, content, expected):
    """ms-swift's template fails on these after the output folder is written."""
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "A"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    assert str(data_error(path)).startswith(f"{path}:2: {expected}")


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": []}, {"role": "assistant", "content": "A"}],  # an empty text
        [{"role": "user", "content": [{"type": "text", "text": "Q"}]}, {"role": "assistant", "content": "A"}],
        # A tool result may be any JSON value: ms-swift trains on its JSON text.
        [
            {"role": "user", "content": "Q"},
            {"role": "tool_call", "content": {"name": "f", "arguments": {}}},
            {"role": "tool", "content": {"rows": [1, 2]}},
            {"role": "assistant", "content": "A"},
        ],
        [
            {"role": "user", "content": "Q"},
            {"role": "tool_call", "content": TOOL_CALL},
            {"role": "tool", "content": 42},
        ],
    ],
)
def test_content_ms_swift_reads_passes(tmp_path, messages):
    assert validate_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])) == 1


# --- media: decoded, found, offline -------------------------------------------------------------------


def test_an_image_with_a_corrupt_data_stream_is_refused(tmp_path, image):
    broken = corrupt_stream_png(tmp_path / "broken.png")
    path = write_jsonl(
        tmp_path / "d.jsonl", [{**GOOD, "images": [str(image)]}, GOOD, {**GOOD, "images": [str(broken)]}]
    )
    error = data_error(path)
    assert error.line == 3
    assert str(error).startswith(f"{path}:3: not a readable image: {broken} (OSError: ")
    assert str(error).endswith("); ms-swift would replace the row with another one.")


def test_every_unreadable_image_is_counted_and_the_first_row_named(tmp_path, image):
    cut, broken = truncated_jpeg(tmp_path / "cut.jpg"), corrupt_stream_png(tmp_path / "broken.png")
    rows = [
        {**GOOD, "images": [str(image)]},
        {**GOOD, "images": [str(cut)]},
        {**GOOD, "images": [str(broken)]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [*rows, {**GOOD, "images": [str(cut)]}])
    error = data_error(path)
    assert str(error).startswith(f"{path}:2: not a readable image: {cut} (OSError: image file is truncated")
    assert str(error).endswith("2 images of this file cannot be read; this is the first.")


@pytest.mark.parametrize("with_lengths", [False, True])
def test_an_image_over_the_bomb_limit_is_refused_without_a_traceback(tmp_path, tiny_model_dir, with_lengths):
    big = oversized_png(tmp_path / "big.png")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "images": [str(big)]}])
    rules = DataRules(max_length=1024, tokenizer_dir=tiny_model_dir if with_lengths else None)
    assert str(data_error(path, rules)) == (
        f"{path}:2: not a readable image: {big} (200,000,000 pixels, over PIL's decompression-bomb limit of "
        "178,956,970 pixels (2 x PIL.Image.MAX_IMAGE_PIXELS): PIL refuses to open it; scale it down); ms-swift "
        "would replace the row with another one."
    )


def test_a_second_check_decodes_nothing(tmp_path, image, media_cache, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "images": [str(image)]}])
    assert validate_jsonl(path) == 1
    assert media_cache.read_text().count("\n") == 1

    def no_decoding(file):
        raise AssertionError(f"decoded {file} again")

    monkeypatch.setattr(media, "image_problem", no_decoding)
    assert validate_jsonl(path) == 1


def block_row(block: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [block, {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "A"},
        ]
    }


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {**GOOD, "images": ["https://example.com/a.png"]},
            "images[0] is a URL (https://example.com/a.png), and anchorkd runs offline by default: ms-swift would "
            "retry it for most of a minute, then replace the row with another one. Download it and give its local "
            "path, or set ANCHORKD_ALLOW_NETWORK=1",
        ),
        (
            block_row({"type": "image_url", "image_url": {"url": "http://h/b.png"}}),
            "messages[0].content[0] is a URL (http://h/b.png)",
        ),
        ({**GOOD, "videos": ["https://example.com/v.mp4"]}, "videos[0] is a URL (https://example.com/v.mp4)"),
    ],
)
def test_a_url_is_refused_offline_and_passes_online(tmp_path, monkeypatch, row, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    monkeypatch.delenv("ANCHORKD_ALLOW_NETWORK", raising=False)
    assert str(data_error(path)).startswith(f"{path}:2: {expected}")
    monkeypatch.setenv("ANCHORKD_ALLOW_NETWORK", "1")
    assert validate_jsonl(path) == 2


def test_a_missing_video_is_refused(tmp_path):
    video = tmp_path / "clip.mp4"
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "videos": [str(video)]}])
    assert str(data_error(path)) == (
        f"{path}:1: video not found: {video} (videos[0]; ms-swift would replace the row with another one)"
    )
    video.write_bytes(b"\x00" * 16)  # videos are checked for existence only
    assert validate_jsonl(path) == 1


def test_a_missing_frame_of_a_video_is_refused(tmp_path, image):
    gone = tmp_path / "frame1.png"
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "videos": [[str(image), str(gone)]]}])
    assert str(data_error(path)).startswith(f"{path}:1: image not found: {gone} (videos[0][1];")


def test_a_missing_image_in_a_content_block_is_refused(tmp_path, image):
    gone = tmp_path / "gone.png"
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [block_row({"type": "image", "image": str(image)}), block_row({"type": "image", "image": str(gone)})],
    )
    assert str(data_error(path)) == (
        f"{path}:2: image not found: {gone} (messages[0].content[0]; ms-swift would replace the row with another one)"
    )


def test_a_corrupt_image_in_a_content_block_is_refused(tmp_path):
    broken = corrupt_stream_png(tmp_path / "broken.png")
    path = write_jsonl(tmp_path / "d.jsonl", [block_row({"type": "image", "image": str(broken)})])
    assert str(data_error(path)).startswith(f"{path}:1: not a readable image: {broken} (OSError: ")


def test_relative_image_paths_are_read_from_the_working_directory(tmp_path, image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "images": [image.name]}])
    assert validate_jsonl(path) == 1
    monkeypatch.chdir(tmp_path.parent)
    assert str(data_error(path)).startswith(f"{path}:1: image not found: {image.name} (images[0];")


# --- .json files (one JSON array of rows) -------------------------------------------------------------


def test_a_json_array_gets_the_row_checks_with_line_and_item(tmp_path):
    rows = [GOOD, GOOD, {"messages": [{"role": "user", "content": 3}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2))
    line = json.dumps(rows, indent=2).splitlines().index("  {", 0) + 1  # where item [0] starts
    error = data_error(path)
    assert error.line == line + 2 * json.dumps(GOOD, indent=2).count("\n") + 2
    assert str(error) == (
        f"{path}:{error.line}: array item [2]: messages[0].content must be text or a list of content blocks, got a number (3)"
    )


def test_a_one_line_json_array_names_the_item(tmp_path, image):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "images": [str(tmp_path / "gone.png")]}]))
    assert str(data_error(path)).startswith(
        f"{path}:1: array item [1]: image not found: {tmp_path / 'gone.png'}"
    )
    path.write_text(json.dumps([{**GOOD, "images": [str(corrupt_stream_png(tmp_path / "b.png"))]}, GOOD]))
    assert str(data_error(path)).startswith(f"{path}:1: array item [0]: not a readable image: ")


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ('[\n  {"messages": [{"role": "user", "content": "Q"}]},\n  {"messages": [\n]', 4, "not valid JSON"),
        (
            '[\n{"messages": [{"role": "user", "content": "Q"}]}\n{"messages": []}\n]',
            3,
            "not valid JSON (expected ',' or ']' after array item [0])",
        ),
        (
            '[{"messages": [{"role": "user", "content": "Q"}]}]\nmore',
            1,
            "not valid JSON (text after the closing ']'",
        ),
        ("[\n]", None, "the file holds no records"),
        ("[\n  5\n]", 2, "array item [0]: a record must be a JSON object, got int"),
    ],
)
def test_a_json_array_that_is_not_valid_names_the_line(tmp_path, text, line, expected):
    path = tmp_path / "d.json"
    path.write_text(text)
    error = data_error(path)
    assert error.line == line
    assert expected in str(error)


def test_json_files_are_counted_like_jsonl(tmp_path, image):
    rows = [GOOD, {**GOOD, "images": [str(image)]}, GOOD]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows, indent=1))
    lines = write_jsonl(
        tmp_path / "lines.json", rows
    )  # a .json file may hold JSON Lines, as datasets reads it
    assert validate_dataset_entry(str(array), "data.dataset[0]") == 3
    assert validate_dataset_entry(str(lines), "data.dataset[0]") == 3
    assert validate_dataset_entry(f"{array}#2", "data.dataset[0]") == 3
    with pytest.raises(DataError, match="ms-swift OPSD"):
        array.write_text(json.dumps([GOOD, {**GOOD, "teacher_prompt": "x"}]))
        validate_dataset_entry(str(array), "data.dataset[0]", DataRules(refuse_opsd=True))


def test_a_json_file_of_rows_can_be_read_as_records(tmp_path):
    from anchorkd.data.validate import read_jsonl_records

    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(row) for row in [GOOD, GOOD]) + "\n]")
    assert list(read_jsonl_records(path)) == [(2, GOOD), (3, GOOD)]


# --- dataset entries: #N and :subsets -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["#0", "#-3", "#abc", "#", "#1.5"])
def test_a_sample_count_that_is_not_above_zero_is_refused(synthetic_data_dir, suffix):
    """ms-swift fails on these (int() or its assert) after the output folder is written."""
    entry = f"{synthetic_data_dir / 'train.jsonl'}{suffix}"
    with pytest.raises(ConfigError) as info:
        validate_dataset_entry(entry, "data.dataset[1]")
    assert info.value.key_path == "data.dataset[1]"
    assert str(info.value) == (
        f"data.dataset[1]: {entry!r}: ms-swift reads the text after the last '#' as the number of rows to take "
        f"(path#N), and {suffix[1:]!r} is not a whole number above 0"
    )


def test_a_sample_count_on_a_hub_id_is_checked_too(monkeypatch):
    monkeypatch.setenv("ANCHORKD_ALLOW_NETWORK", "1")
    assert validate_dataset_entry("AI-ModelScope/foo#10", "data.dataset[0]") is None
    with pytest.raises(ConfigError, match="'0' is not a whole number above 0"):
        validate_dataset_entry("AI-ModelScope/foo#0", "data.dataset[0]")


def test_a_sample_count_checks_the_rows_of_its_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": [{"role": "user", "content": 1}]}])
    with pytest.raises(DataError, match=f"{path}:2: messages\\[0\\].content must be text"):
        validate_dataset_entry(f"{path}#1", "data.dataset[0]")


def test_a_subset_on_a_local_file_is_refused(synthetic_data_dir):
    entry = f"{synthetic_data_dir / 'train.jsonl'}:zh"
    with pytest.raises(ConfigError) as info:
        validate_dataset_entry(entry, "data.val_dataset[0]")
    assert str(info.value) == (
        f"data.val_dataset[0]: {entry!r}: ms-swift reads ':zh' as subsets, which a local file does not have (it "
        "would load the whole file and ignore them)"
    )


def test_a_hash_in_a_missing_file_name_is_reported_as_a_missing_file(tmp_path):
    entry = str(tmp_path / "odd#name.jsonl")
    with pytest.raises(ConfigError, match=f"data file not found: {entry}$"):
        validate_dataset_entry(entry, "data.dataset[0]")


# --- every class refused by validate, check and train: exit 2, file:line, nothing written ---------------


def bad_data_sets(root: Path) -> dict[str, tuple[str, str]]:
    """Name -> (data.dataset entry, what stderr must hold)."""
    root.mkdir()
    broken = corrupt_stream_png(root / "broken.png")
    big = oversized_png(root / "big.png")

    def file(name: str, rows: list) -> str:
        return str(write_jsonl(root / name, [GOOD, *rows]))

    number = {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "A"}]}
    array = root / "rows.json"
    array.write_text(f"[\n{json.dumps(GOOD)},\n{json.dumps(number)}\n]")  # item [1] on line 3
    return {
        "corrupt stream": (
            file("a.jsonl", [{**GOOD, "images": [str(broken)]}]),
            f"a.jsonl:2: not a readable image: {broken}",
        ),
        "bomb": (file("b.jsonl", [{**GOOD, "images": [str(big)]}]), "b.jsonl:2: not a readable image: "),
        "url offline": (
            file("c.jsonl", [{**GOOD, "images": ["https://example.com/x.png"]}]),
            "c.jsonl:2: images[0] is a URL",
        ),
        "missing video": (
            file("d.jsonl", [{**GOOD, "videos": [str(root / "v.mp4")]}]),
            "d.jsonl:2: video not found",
        ),
        "missing block image": (
            file("e.jsonl", [block_row({"type": "image", "image": str(root / "gone.png")})]),
            "e.jsonl:2: image not found",
        ),
        "number content": (file("f.jsonl", [number]), "f.jsonl:2: messages[0].content must be text"),
        "json array row": (str(array), "rows.json:3: array item [1]: messages[0].content must be text"),
        "sample count 0": (file("g.jsonl", []) + "#0", "data.dataset[0]: "),
    }


BAD_DATA = [
    "corrupt stream",
    "bomb",
    "url offline",
    "missing video",
    "missing block image",
    "number content",
    "json array row",
    "sample count 0",
]


@pytest.mark.parametrize("command", ["validate", "check", "train"])
@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_refused_by_every_command_before_anything_is_written(
    tmp_path, tiny_model_dir, capsys, monkeypatch, command, case
):
    monkeypatch.delenv("ANCHORKD_ALLOW_NETWORK", raising=False)
    entry, expected = bad_data_sets(tmp_path / "data")[case]
    config = write_config(tmp_path, tiny_model_dir, [entry])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "media-verified.txt")
    status = main([command, "--config", str(config)] if command == "train" else [command, str(config)])
    err = capsys.readouterr().err
    assert status == EXIT_BAD_INPUT
    assert err.startswith("anchorkd: error: ") and "Traceback" not in err
    assert expected in err
    assert not (tmp_path / "out").exists()
    assert (
        sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "media-verified.txt")
        == before
    )
