"""The data rules against ms-swift itself: each row our rules refuse is one ms-swift's preprocessor or
template fails on (and, in a run, drops), each row they accept is one it encodes; the row-length count is
a lower bound of ms-swift's own encoded length, exact on the image tokens.

ms-swift's processor and ``qwen3_vl`` template are built for the tiny checkpoint (no model weights).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from PIL import Image

from anchorkd.config import DataError
from anchorkd.data.validate import RowTokenCounter, check_media_tags, check_record

pytestmark = pytest.mark.integration

IMAGE_PAD = 151655


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from swift.model import get_processor

    return get_processor(str(tiny_model_dir), model_type="qwen3_vl", download_model=False)


def make_template(processor, max_length=None, max_pixels=None):
    from swift.template import get_template

    template = get_template(processor, max_length=max_length, max_pixels=max_pixels)
    template.set_mode("train")
    return template


@pytest.fixture(scope="module")
def template(processor):
    return make_template(processor)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[tuple[int, int], str]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for size in [(8, 8), (192, 192), (300, 100), (333, 517), (1000, 700), (37, 2000)]:
        paths[size] = str(folder / f"{size[0]}x{size[1]}.png")
        Image.new("RGB", size, (30, 60, 90)).save(paths[size])
    return paths


def swift_encode(template, record: dict) -> dict:
    """What ms-swift does with one row of a local JSONL file: its messages preprocessor (strict, so the
    error surfaces instead of a dropped row), then the template's encoding."""
    from swift.dataset.preprocessor import MessagesPreprocessor

    batched = {key: [copy.deepcopy(value)] for key, value in record.items()}
    rows = MessagesPreprocessor().batched_preprocess(batched, strict=True, ignore_max_length_error=False)
    row = {key: values[0] for key, values in rows.items()}
    row["images"] = [image["path"] for image in row.get("images") or []]
    return template.encode(row)


def ours_refuses(record: dict) -> bool:
    try:
        check_record(record, Path("d.jsonl"), 1)
    except DataError:
        return True
    return False


def chat(*roles: str, tool_call='{"name": "lookup", "arguments": {"rack": 3}}') -> dict:
    return {"messages": [{"role": r, "content": tool_call if "call" in r else f"text of {r}"} for r in roles]}


ROLE_CASES = [
    ("user", "assistant"),
    ("human", "gpt"),
    ("user", "bot"),
    ("system", "user", "assistant"),
    ("user", "tool_call", "tool", "assistant"),
    ("user", "function_call", "function_response", "assistant"),
    ("user", "function-call", "function-response", "assistant"),
    ("user", "tool_call", "tool_response", "assistant"),
    ("user", "tool_call", "observation", "observations", "assistant"),
    ("user", "tool", "assistant"),
    ("user", "user", "assistant", "assistant"),
    ("assistant",),
    ("user",),
    ("user", "assistant", "tool"),
    # refused
    ("user", "model"),
    ("User", "assistant"),
    ("user", "developer", "assistant"),
    ("user", "tool-call", "assistant"),
    ("user", "system", "assistant"),
    ("system", "user", "assistant", "system"),
    ("system",),
    ("tool", "assistant"),
    ("system", "observation", "assistant"),
    ("user", "assistant", "tool", "user", "assistant"),
    ("user", "tool_call", "observation", "human", "gpt"),
]


@pytest.mark.parametrize("roles", ROLE_CASES, ids=["-".join(r) for r in ROLE_CASES])
def test_role_rules_refuse_exactly_what_ms_swift_fails_on(template, roles):
    record = chat(*roles)
    try:
        swift_encode(template, record)
        swift_fails = False
    except Exception:  # noqa: BLE001 - any failure here is a row ms-swift drops in a run
        swift_fails = True
    assert ours_refuses(record) == swift_fails


TOOL_CALL_CASES = [
    '{"name": "lookup", "arguments": {"rack": 3}}',
    {"name": "lookup", "arguments": {"rack": 3}},
    {"name": "lookup", "parameters": '{"rack": 3}'},
    "{'name': 'lookup', 'arguments': {}}",
    # refused
    "look up rack 3",
    '["lookup"]',
    {"arguments": {}},
    {"name": "lookup"},
    '{"name": "f", "arguments": "x y"}',
]


@pytest.mark.parametrize("content", TOOL_CALL_CASES, ids=[str(i) for i in range(len(TOOL_CALL_CASES))])
def test_tool_call_rule_refuses_exactly_what_ms_swift_fails_on(template, content):
    record = chat("user", "tool_call", "tool", "assistant", tool_call=content)
    try:
        swift_encode(template, record)
        swift_fails = False
    except Exception:  # noqa: BLE001 - any failure here is a row ms-swift drops in a run
        swift_fails = True
    assert ours_refuses(record) == swift_fails


def test_null_content_fails_in_ms_swift(template):
    record = {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "A"}]}
    assert ours_refuses(record)
    with pytest.raises(AssertionError):
        swift_encode(template, record)


def test_untagged_images_are_placed_by_ms_swift(template, images):
    """No <image> tag with one image: ms-swift adds the tag itself, so the image is encoded."""
    record = {
        "messages": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A rack."}],
        "images": [images[(192, 192)]],
    }
    check_media_tags(record, Path("d.jsonl"), 1)
    assert swift_encode(template, record)["input_ids"].count(IMAGE_PAD) == 36


def test_surplus_image_tags_become_literal_text_in_ms_swift(template, images, processor):
    """Two tags, one image: ms-swift encodes the second tag as the characters "<image>"."""
    record = {
        "messages": [
            {"role": "user", "content": "<image><image>Describe."},
            {"role": "assistant", "content": "A."},
        ],
        "images": [images[(192, 192)]],
    }
    with pytest.raises(DataError, match="2 <image> tag\\(s\\) in the messages but 1 item\\(s\\)"):
        check_media_tags(record, Path("d.jsonl"), 1)
    ids = swift_encode(template, record)["input_ids"]
    assert processor.tokenizer.decode(ids).count("<image>") == 1


def length_rows(images) -> list[dict]:
    rows = [
        chat("user", "assistant"),
        chat("user", "assistant", "user", "assistant"),
        {
            "messages": [
                {"role": "user", "content": "Q1 про стойку 机柜 " * 40},
                {"role": "assistant", "content": "ok"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief and exact."},
                {"role": "user", "content": "Look <image> and <image>: what differs?"},
                {"role": "assistant", "content": "The left rack has two more switches than the right one."},
            ],
            "images": [images[(333, 517)], images[(1000, 700)]],
        },
    ]
    for path in images.values():
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "What is it?"},
                    {"role": "assistant", "content": "A rack."},
                ],
                "images": [path],
            }
        )
    return rows


@pytest.mark.parametrize("max_pixels", [None, 65536])
def test_row_token_count_is_a_tight_lower_bound_of_ms_swift_length(
    processor, tiny_model_dir, images, max_pixels
):
    template = make_template(processor, max_pixels=max_pixels)
    counter = RowTokenCounter(tiny_model_dir, max_pixels=max_pixels)
    for record in length_rows(images):
        ids = swift_encode(template, record)["input_ids"]
        counted = counter.count(record, 10**6)
        image_tokens = sum(counter.image_tokens(*Image.open(p).size) - 2 for p in record.get("images", []))
        assert ids.count(IMAGE_PAD) == image_tokens
        # What is not counted is the chat template: 5 tokens per message with the qwen3_vl template.
        assert len(ids) - counted == 5 * len(record["messages"])


def test_ms_swift_refuses_rows_over_max_length(processor, tiny_model_dir, images):
    """The rows the length rule refuses are the ones ms-swift's template raises MaxLengthError on (its
    default truncation_strategy 'delete' drops them)."""
    from swift.template import MaxLengthError

    record = length_rows(images)[-2]  # the 1000x700 image: 684 counted tokens
    counted = RowTokenCounter(tiny_model_dir).count(record, 10**6)
    with pytest.raises(MaxLengthError):
        swift_encode(make_template(processor, max_length=counted), record)
    assert (
        len(swift_encode(make_template(processor, max_length=counted + 10), record)["input_ids"])
        == counted + 10
    )
