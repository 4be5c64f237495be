"""Check training data before any model is loaded, and say exactly which file and line is wrong.

ms-swift reads JSONL records of the form ``{"messages": [...], "images": [...]}``; a bad line there
surfaces deep inside dataset preprocessing, minutes into a run. We read each local data file once up
front instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from ..io import iter_jsonl

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def split_dataset_entry(entry: str) -> tuple[str, str | None]:
    """ms-swift allows ``path#N`` (take N samples); return (path, suffix)."""
    path, sep, count = entry.rpartition("#")
    if sep and count.isdigit():
        return path, count
    return entry, None


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.endswith(DATA_SUFFIXES) or os.path.exists(path)


def validate_dataset_entry(entry: str, key_path: str) -> int | None:
    """Validate one ``data.dataset`` entry; returns the record count for local JSONL files."""
    path_text, _ = split_dataset_entry(str(entry))
    if not _looks_local(path_text):
        return None  # a hub dataset id: ms-swift resolves it
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(key_path, f"data file not found: {path}")
    if path.suffix == ".jsonl":
        return validate_jsonl(path)
    return None


def validate_jsonl(path: str | Path, check_images: bool = True) -> int:
    """Check every line of an ms-swift JSONL file; raise DataError naming ``file:line``."""
    path = Path(path)
    count = 0
    checked_images: set[str] = set()
    for line_no, record in iter_jsonl(path):
        _check_record(record, path, line_no)
        if check_images:
            for image in _image_paths(record, path, line_no):
                if image not in checked_images:
                    _check_image(image, path, line_no)
                    checked_images.add(image)
        count += 1
    if count == 0:
        raise DataError(str(path), "the file holds no records")
    return count


def _check_record(record, path: Path, line_no: int) -> None:
    if not isinstance(record, dict):
        raise DataError(str(path), f"a record must be a JSON object, got {type(record).__name__}", line_no)
    messages = record.get("messages")
    if messages is None:
        raise DataError(str(path), "record has no 'messages' field", line_no)
    if not isinstance(messages, list) or not messages:
        raise DataError(str(path), "'messages' must be a non-empty list", line_no)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(str(path), f"messages[{i}] must be an object with 'role' and 'content'", line_no)


def _image_paths(record: dict, path: Path, line_no: int) -> list[str]:
    images = record.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise DataError(str(path), "'images' must be a list of paths", line_no)
    result = []
    for image in images:
        if isinstance(image, dict):
            image = image.get("path")
        if not isinstance(image, str):
            raise DataError(str(path), f"image entry {image!r} is not a path", line_no)
        if image.startswith(("http://", "https://", "data:")):
            continue
        result.append(image)
    return result


def _check_image(image: str, path: Path, line_no: int) -> None:
    image_path = Path(image).expanduser()
    if not image_path.is_file():
        raise DataError(str(path), f"image not found: {image}", line_no)
    try:
        with Image.open(image_path) as handle:
            handle.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(str(path), f"not a readable image: {image} ({exc})", line_no) from None


def read_jsonl_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` of an ms-swift JSONL file after checking every line and image.

    The whole file is validated before the first record is returned, so a bad line fails the caller
    before any model time is spent, with ``file:line``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    validate_jsonl(path)
    yield from iter_jsonl(path)
