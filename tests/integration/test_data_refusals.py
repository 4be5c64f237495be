"""A real ``anchorkd train`` process refuses a data set with one image ms-swift could not load, before it
writes anything: without the decode check, ms-swift would train on another row in that row's place and exit 0.

The image is a PNG whose compressed data has a run of zeros in the middle, its chunk checksum rewritten to
match, so that PIL's ``verify()`` passes it (the check anchorkd made before) and decoding does not.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image
from test_data_rules_match_ms_swift import swift_encode

from anchorkd.config import DataError
from anchorkd.data.media import MediaFieldError, row_media
from anchorkd.data.validate import check_record

pytestmark = pytest.mark.integration

DEMO_STAGE_2 = Path(__file__).resolve().parents[2] / "configs" / "demo" / "stage_2_llm_lora.yaml"
# A refused run stops before any model loads: importing ms-swift is most of its time. The limit only
# catches a hung process on a loaded machine.
LIMIT_S = 600


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def corrupt_stream_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="PNG")
    data, out, position = buffer.getvalue(), buffer.getvalue()[:8], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IDAT":
            body = body[: length // 2] + bytes(64) + body[length // 2 + 64 :]
        out += _chunk(kind, body)
        position += 12 + length
    path.write_bytes(out)
    with Image.open(path) as image:
        image.verify()  # passes: the structure is intact
    return path


def test_train_refuses_a_data_set_with_a_corrupt_image_before_writing(demo_workdir, tmp_path):
    train = demo_workdir / "outputs" / "demo" / "data" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    broken = corrupt_stream_png(tmp_path / "broken.png")
    rows[2] = {**rows[2], "images": [str(broken)]}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"

    command = [
        *(sys.executable, "-m", "anchorkd.cli", "train", "--config", str(DEMO_STAGE_2)),
        f"data.dataset=[{data}]",
        f"training.output_dir={out}",
    ]
    env = {**os.environ, "ANCHORKD_MEDIA_CACHE": str(tmp_path / "media-verified.txt"), "OMP_NUM_THREADS": "1"}
    env.pop("NPROC_PER_NODE", None)
    result = subprocess.run(
        command, cwd=demo_workdir, env=env, capture_output=True, text=True, timeout=LIMIT_S, check=False
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"anchorkd: error: {data}:3: not a readable image: {broken} (OSError: " in result.stderr
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "broken.png",
        "media-verified.txt",
        "train.jsonl",
    ]


# --- the content rule against ms-swift itself -----------------------------------------------------------------

TOOL_CALL = '{"name": "f", "arguments": {}}'


@pytest.fixture(scope="module")
def template(tiny_model_dir):
    """ms-swift's processor and qwen3_vl template for the tiny checkpoint (no model weights)."""
    from swift.model import get_processor
    from swift.template import get_template

    processor = get_processor(str(tiny_model_dir), model_type="qwen3_vl", download_model=False)
    template = get_template(processor)
    template.set_mode("train")
    return template


def row(content, role: str = "user") -> dict:
    if role == "user":
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "A"}]}
    return {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content}]}


def ours_refuses(record: dict) -> bool:
    """The row checks of ``validate_data_file`` that need no file: its shape and its media fields."""
    try:
        check_record(record, Path("d.jsonl"), 1)
        row_media(record)
    except (DataError, MediaFieldError):
        return True
    return False


@pytest.mark.parametrize(
    "record",
    [
        row(3),
        row(True),
        row({"text": "Q"}),
        row([1, 2]),
        row(5, role="assistant"),
        row([{"type": "text", "text": 5}]),
        row([{"type": "text"}]),
        row([{"text": "Q"}]),
    ],
)
def test_content_our_rule_refuses_fails_in_ms_swift(template, record):
    assert ours_refuses(record)
    with pytest.raises((TypeError, AttributeError, KeyError)):
        swift_encode(template, record)


@pytest.mark.parametrize(
    ("record", "literal"),
    [
        (row([{"type": "input_text", "text": "Q"}]), "<input_text>"),
        (row([{"type": "image"}, {"type": "text", "text": "Q"}]), "<image>"),
    ],
)
def test_blocks_our_rule_refuses_become_literal_text_in_ms_swift(template, record, literal):
    """ms-swift encodes these rows without a word, with the tag as plain text where the block was."""
    assert ours_refuses(record)
    text = template.tokenizer.decode(swift_encode(template, record)["input_ids"])
    assert f"user\n{literal}" in text


@pytest.mark.parametrize(
    "record",
    [
        row([]),
        row([{"type": "text", "text": "Q"}]),
        {
            "messages": [
                {"role": "user", "content": "Q"},
                {"role": "tool_call", "content": {"name": "f", "arguments": {}}},
                {"role": "tool", "content": {"rows": [1, 2]}},
                {"role": "assistant", "content": "A"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Q"},
                {"role": "tool_call", "content": TOOL_CALL},
                {"role": "tool", "content": 42},
            ]
        },
    ],
)
def test_content_our_rule_accepts_is_encoded_by_ms_swift(template, record):
    assert not ours_refuses(record)
    assert len(swift_encode(template, record)["input_ids"]) > 0
