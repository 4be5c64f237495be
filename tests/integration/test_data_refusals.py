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
