"""Rows longer than template.max_length: ms-swift drops them silently, so they are refused up front with
the count and the first file:line. Token counts come from the tiny checkpoint's real Qwen tokenizer and
the Qwen-VL image rules; the image figures below were read off ms-swift's own encoding of the same images
(tests/integration/test_data_rules_match_ms_swift.py checks the counter against ms-swift directly)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from anchorkd.config import DataError
from anchorkd.data.validate import DataRules, RowTokenCounter, check_row_lengths, smart_resize, validate_jsonl


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def row(user: str, answer: str = "A rack.", images: list[str] | None = None) -> dict:
    record = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    return {**record, "images": images} if images else record


@pytest.fixture
def make_image(tmp_path):
    def make(width: int, height: int) -> str:
        path = tmp_path / f"img_{width}x{height}.png"
        Image.new("RGB", (width, height), (40, 80, 120)).save(path)
        return str(path)

    return make


@pytest.fixture(scope="module")
def counter(tiny_model_dir) -> RowTokenCounter:
    return RowTokenCounter(tiny_model_dir)


@pytest.mark.parametrize(
    ("size", "max_pixels", "tokens"),
    [
        ((8, 8), None, 4 + 2),  # below the minimum: scaled up to 64x64
        ((192, 192), None, 36 + 2),
        ((300, 100), None, 27 + 2),
        ((1000, 700), None, 682 + 2),
        ((37, 2000), None, 62 + 2),  # 2000 / 32 = 62.5 rounds to 62 (Python's round, as in qwen_vl_utils)
        ((1000, 700), 65536, 70 + 2),  # template.max_pixels scales it down first
        ((37, 2000), 65536, 59 + 2),
        ((192, 192), 65536, 36 + 2),  # already within the budget
    ],
)
def test_image_tokens_follow_the_qwen_vl_rules(tiny_model_dir, size, max_pixels, tokens):
    assert RowTokenCounter(tiny_model_dir, max_pixels=max_pixels).image_tokens(*size) == tokens


def test_image_budget_from_the_environment_is_followed(tiny_model_dir, monkeypatch):
    """ms-swift reads IMAGE_MAX_TOKEN_NUM (or MAX_PIXELS) when it loads the processor; so must we."""
    monkeypatch.setenv("IMAGE_MAX_TOKEN_NUM", "64")
    assert RowTokenCounter(tiny_model_dir).image_tokens(1000, 700) == 54 + 2
    monkeypatch.delenv("IMAGE_MAX_TOKEN_NUM")
    monkeypatch.setenv("MAX_PIXELS", str(64 * 32 * 32))
    assert RowTokenCounter(tiny_model_dir).image_tokens(1000, 700) == 54 + 2


def test_smart_resize_keeps_multiples_of_the_factor_within_the_budget():
    assert smart_resize(700, 1000, 32, 4 * 1024, 16384 * 1024) == (704, 992)
    h, w = smart_resize(700, 1000, 32, 4 * 1024, 64 * 1024)
    assert (h % 32, w % 32) == (0, 0) and h * w <= 64 * 1024
    assert smart_resize(8, 8, 32, 4 * 1024, 16384 * 1024) == (64, 64)


def test_text_is_counted_with_the_student_tokenizer(counter):
    assert counter.count(row("Hello world", "Hi"), 1024) == 3  # "Hello", " world", "Hi"
    long_text = " ".join(["word"] * 600)
    assert counter.count(row(long_text, long_text), 10_000) == 2 * 600


def test_rows_longer_than_max_length_name_the_count_and_first_line(tmp_path, tiny_model_dir):
    long = " ".join(["cable"] * 1100)  # 1101 tokens ("c" "able" " cable" ...), plus 3 for "A rack."
    path = write_jsonl(tmp_path / "d.jsonl", [row("short"), row(long), row("short"), row(long), row(long)])
    with pytest.raises(DataError) as info:
        check_row_lengths(path, 1024, tiny_model_dir)
    assert (info.value.path, info.value.line) == (str(path), 2)
    message = str(info.value)
    assert message.startswith(f"{path}:2: 3 row(s) longer than template.max_length (1024 tokens)")
    assert "the first one here with at least 1104 tokens" in message
    assert check_row_lengths(path, 2048, tiny_model_dir) == 5


def test_images_count_towards_the_length(tmp_path, tiny_model_dir, make_image):
    path = write_jsonl(tmp_path / "d.jsonl", [row("Describe.", images=[make_image(1000, 700)])])
    with pytest.raises(DataError, match="1 row\\(s\\) longer than template.max_length \\(512 tokens\\)"):
        check_row_lengths(path, 512, tiny_model_dir)
    assert check_row_lengths(path, 512, tiny_model_dir, max_pixels=65536) == 1


def test_huge_line_is_counted_from_its_size_without_tokenizing(tmp_path, tiny_model_dir, counter):
    """A 33 MB line once cost 6 GB: text whose bytes alone prove it too long is never tokenized."""
    assert counter.max_token_bytes == 256  # the longest Qwen token (128 spaces), byte-level, in UTF-8
    tokenized = []
    spy = RowTokenCounter(tiny_model_dir)
    encode = spy._encode
    spy._encode = lambda texts: tokenized.extend(texts) or encode(texts)
    text = "x" * 2_000_000
    bound = math.ceil((len(text) + len("A rack.")) / 256)
    assert spy.count(row(text), 1024) == bound
    assert tokenized == []
    assert spy.count(row("short"), 1024) == 4  # a row within the byte bound is tokenized as usual
    assert tokenized == ["short", "A rack."]

    path = write_jsonl(tmp_path / "d.jsonl", [row("short"), row(text)])
    with pytest.raises(DataError) as info:
        check_row_lengths(path, 1024, tiny_model_dir)
    assert info.value.line == 2
    assert f"at least {bound} tokens" in str(info.value)


def test_truncating_strategies_keep_long_rows(tmp_path, tiny_model_dir):
    """With truncation_strategy left/right ms-swift truncates instead of dropping: nothing to refuse."""
    path = write_jsonl(tmp_path / "d.jsonl", [row("cable " * 1100)])
    for strategy in ("left", "right"):
        rules = DataRules(max_length=1024, tokenizer_dir=tiny_model_dir, truncation_strategy=strategy)
        assert validate_jsonl(path, rules=rules) == 1
    for strategy in (None, "delete"):
        rules = DataRules(max_length=1024, tokenizer_dir=tiny_model_dir, truncation_strategy=strategy)
        with pytest.raises(DataError, match="1 row\\(s\\) longer than template.max_length"):
            validate_jsonl(path, rules=rules)
    assert validate_jsonl(path, rules=DataRules(max_length=1024)) == 1  # no tokenizer: not counted


def test_image_with_an_extreme_aspect_ratio_is_refused(tmp_path, tiny_model_dir, make_image):
    """qwen_vl_utils refuses images whose sides differ by more than 200x; ms-swift then drops the row."""
    banner = make_image(2010, 10)
    path = write_jsonl(tmp_path / "d.jsonl", [row("Describe."), row("Describe.", images=[banner])])
    with pytest.raises(DataError) as info:
        check_row_lengths(path, 4096, tiny_model_dir)
    assert str(info.value).startswith(f"{path}:2: image {banner} is 2010x10: an aspect ratio above 200")


def test_synthetic_data_fits_the_demo_max_length(synthetic_data_dir, tiny_model_dir):
    """The demo configs use max_length 1024 and max_pixels 65536 (configs/demo/_tiny.yaml)."""
    for name in ("base_train.jsonl", "train.jsonl", "val.jsonl"):
        rules = DataRules(max_length=1024, tokenizer_dir=tiny_model_dir, max_pixels=65536)
        assert validate_jsonl(synthetic_data_dir / name, rules=rules) > 0
