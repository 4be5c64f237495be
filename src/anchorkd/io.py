"""File input and output shared by every part of anchorkd: atomic writes, JSON/JSONL, SHA-256, numbers.

Everything that anchorkd writes goes through :func:`atomic_writer`: the bytes land in a temporary file
beside the target and are renamed over it only once complete (and flushed to disk), so a crash or a
full disk never leaves a half-written report, score file or data set behind. Everything that reads
JSON or JSONL reports a bad line as ``file:line`` through :class:`~anchorkd.errors.DataError`.

Only the standard library is imported here, so any module may depend on this one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from anchorkd.errors import DataError

_HASH_CHUNK = 1 << 20
# mkstemp creates files readable by their owner only; written files get the usual mode instead. The
# process umask can only be read by setting it, so it is read once, at import.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, text: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; move it onto ``path`` when the block succeeds.

    The temporary file is a hidden ``.<name>.<random>.tmp`` in the target's folder (so the final rename
    stays on one file system and is atomic); it is flushed and fsync'ed before the rename, and removed
    if the block raises. Text mode writes UTF-8 with ``\\n`` line ends on every platform.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, _FILE_MODE)
        if text:
            handle: IO[Any] = open(descriptor, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        else:
            handle = open(descriptor, "wb")  # noqa: SIM115
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`); return ``path``."""
    with atomic_writer(path, text=False) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically; return ``path``."""
    with atomic_writer(path) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, document: Any, *, allow_nan: bool = False) -> Path:
    """Write ``document`` as indented JSON (UTF-8, one trailing newline) atomically; return ``path``.

    NaN and infinity are not JSON: by default they raise ValueError instead of being written as the
    ``NaN`` literals that strict JSON readers reject.
    """
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=allow_nan) + "\n"
    return atomic_write_text(path, text)


def save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Render a matplotlib ``figure`` to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# JSON and JSONL
# --------------------------------------------------------------------------------------------------


def jsonl_line(record: Any) -> str:
    """One JSONL line: compact JSON of ``record`` (non-ASCII kept as is) and a newline."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write one JSON line per record to ``path`` atomically; return the number of records.

    ``records`` may be a generator that takes long (captions produced batch by batch): each line is
    flushed as it comes, so progress shows in the temporary file, and ``path`` appears only when the
    last record is written.
    """
    count = 0
    with atomic_writer(path) as handle:
        for record in records:
            handle.write(jsonl_line(record))
            handle.flush()
            count += 1
    return count


def append_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Append one JSON line per record to ``path`` (a log that others may read while it grows)."""
    with Path(path).open("a", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(jsonl_line(record))


def iter_jsonl(path: str | Path, *, error: type[DataError] = DataError) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed JSON)`` for each non-blank line of a JSONL file.

    A line that is not UTF-8 or not JSON raises ``error`` (a :class:`DataError`) naming ``file:line``.
    NaN and Infinity literals are accepted, as Python's own writer produces them.
    """
    path = Path(path)
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(
                    str(path), f"not valid UTF-8 text ({exc.reason} at byte {exc.start})", line_no
                ) from None
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(str(path), f"not valid JSON ({exc.msg} at column {exc.colno})", line_no) from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object stored in ``path``; DataError (with the line of a syntax error) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"not valid JSON ({exc.msg})", exc.lineno) from None
    if not isinstance(document, dict):
        raise DataError(str(path), "must hold a JSON object")
    return document


# --------------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (data sets with inline images can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Numbers read from files
# --------------------------------------------------------------------------------------------------


def real_number(value: Any) -> float | None:
    """``value`` as a float when it is an int or float (NaN and infinity included), else None.

    ``True`` is an int to Python but never a measurement, and a string such as ``"3/10"`` is not a
    number: both give None.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite int or float, else None (missing, text, NaN, infinity)."""
    number = real_number(value)
    return number if number is not None and math.isfinite(number) else None
