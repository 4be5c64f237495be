"""Check training data before any model is loaded, and say exactly which file and line is wrong.

ms-swift reads JSONL records of the form ``{"messages": [...], "images": [...]}``. A row it cannot use
is not an error there: its preprocessor and template catch the exception, log a traceback and drop the
row (or, with lazy tokenization, silently pick another one), minutes into a run. Every rule below is a
way a row would be lost like that; we read each local data file once up front instead and refuse it.

What ms-swift 4.6.0 does, read from its code (``swift/dataset/preprocessor/core.py``,
``swift/template/template_inputs.py``, ``swift/template/base.py``, ``swift/template/templates/qwen.py``):

- roles: ``MessagesPreprocessor`` maps ``human`` to ``user``; ``gpt`` / ``bot`` to ``assistant``;
  ``function_call`` to ``tool_call``; ``function_response`` / ``observation(s)`` to ``tool_response``.
  ``RowPreprocessor._check_messages`` then asserts every role is one of system / user / assistant /
  tool / tool_call / tool_response and that no content is null.
- order: only a first ``system`` message becomes the system prompt; the template pairs the rest as
  (user or tool, assistant) turns after merging repeated roles and folding tool calls and results, and
  asserts on any other shape.
- media: ``Template._add_default_tags`` counts ``<image>`` / ``<video>`` tags in all message texts. With
  fewer tags than items it puts the missing tags at the start of the first message; with more, the
  surplus tags stay in the text as the literal characters ``<image>`` (a warning, nothing else).
- length: with the default ``truncation_strategy`` (``delete``) a row longer than ``max_length`` tokens
  raises ``MaxLengthError`` inside encoding and is dropped without a word.
- content: a message's content is text, or a list of typed blocks (``{"type": "text", "text": ...}``,
  ``{"type": "image", "image": ...}``, ...); ``StdTemplateInputs.from_dict`` turns a tool call's or tool
  result's other JSON values into their JSON text, and fails on any other shape.
- media: each image is loaded when the row is encoded (``anchorkd.data.media`` checks them the same way).
- files: ``.jsonl`` and ``.json`` are read by ``datasets``' JSON builder: a file that starts with ``[`` is one
  JSON array of rows, any other is JSON Lines.
- entries: ``DatasetSyntax.parse`` reads ``[hf::|ms::]location[:subset/...][#N]``, each part only where the
  text before it is not an existing path; ``#N`` takes N rows (N must be a whole number above 0).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ConfigError, DataError
from ..io import iter_jsonl
from ..offline import network_allowed
from . import media

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# The files whose rows are checked here (the others are left to ms-swift).
JSON_SUFFIXES = (".jsonl", ".json")

# Role as written in the data -> the role ms-swift turns it into. Anything else is dropped by ms-swift.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "tool_call": "tool_call",
    "function_call": "tool_call",
    "function-call": "tool_call",
    "tool": "tool",
    "tool_response": "tool",
    "function_response": "tool",
    "function-response": "tool",
    "observation": "tool",
    "observations": "tool",
}
ACCEPTED_ROLES = tuple(ROLE_ALIASES)

MEDIA_TAGS = {"images": "<image>", "videos": "<video>"}
OPSD_KEYS = ("teacher_prompt", "teacher_images")
# ms-swift's truncation strategies that drop an over-long row ('delete' is its default; None means unset).
DROPPING_TRUNCATION = (None, "delete")


@dataclass(frozen=True)
class DataRules:
    """The settings the data rules depend on, taken from the run's config.

    ``max_length``: ``template.max_length``; with ``tokenizer_dir`` (the student checkpoint folder) rows
    longer than it are refused, unless ``truncation_strategy`` (ms-swift's) truncates instead of
    dropping (``left`` / ``right``). ``max_pixels``: ``template.max_pixels``. ``refuse_opsd``: refuse rows
    with ``teacher_prompt`` / ``teacher_images`` (the ``gkd_monitor`` trainer cannot use them).
    ``check_images``: check the media rows name (``anchorkd.data.media``): no URL while offline, every local
    video exists, every local image decodes (once: decoded files are remembered in
    ``media.media_cache_path()``).
    """

    max_length: int | None = None
    tokenizer_dir: str | Path | None = None
    max_pixels: int | None = None
    truncation_strategy: str | None = None
    refuse_opsd: bool = False
    check_images: bool = True

    @property
    def checks_lengths(self) -> bool:
        return (
            self.max_length is not None
            and self.tokenizer_dir is not None
            and self.truncation_strategy in DROPPING_TRUNCATION
        )


# --- dataset entries in the config --------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetEntry:
    """A ``data.dataset`` entry as ms-swift reads it: ``[hub::]location[:subset/...][#sample]``."""

    location: str
    subsets: tuple[str, ...] = ()
    sample: str | None = None  # the text after the last '#', as written
    hub: str | None = None  # the text before '::' (ms-swift knows 'hf' and 'ms')


def _exists(text: str) -> bool:
    return os.path.exists(os.path.expanduser(text))


def parse_dataset_entry(entry: str) -> DatasetEntry:
    """Split ``entry`` as ``DatasetSyntax.parse`` does: each of ``hub::``, ``#sample`` and ``:subsets`` is split
    off only when the text still holding it is not an existing path (so ``odd#name.jsonl`` that exists is a
    file, and one that does not is ``odd`` with the sample ``name.jsonl``)."""
    rest, hub, sample, subsets = entry, None, None, ()
    if not _exists(rest) and "::" in rest:
        hub, rest = rest.split("::", 1)
    if not _exists(rest) and "#" in rest:
        rest, sample = rest.rsplit("#", 1)
    if not _exists(rest) and ":" in rest:
        rest, subset_text = rest.split(":", 1)
        subsets = tuple(subset.strip() for subset in subset_text.split("/"))
    return DatasetEntry(rest.strip(), subsets, sample, hub)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.endswith(DATA_SUFFIXES)


def sample_count(entry: str, parsed: DatasetEntry, key_path: str) -> int | None:
    """The ``#N`` of an entry: ms-swift reads it with ``int()`` and asserts N > 0 after the output folder is
    written (and a text that is no number fails its parsing), so both are refused here."""
    if parsed.sample is None:
        return None
    try:
        count = int(parsed.sample)
    except ValueError:
        count = None
    if count is None or count < 1:
        raise ConfigError(
            key_path,
            f"{entry!r}: ms-swift reads the text after the last '#' as the number of rows to take "
            f"(path#N), and {parsed.sample!r} is not a whole number above 0",
        )
    return count


def check_dataset_location(entry: str, key_path: str) -> Path | None:
    """Where a ``data.dataset`` entry points: an existing local file or folder, or None for a hub
    dataset when the network is allowed. Anything else is a ConfigError naming ``key_path``: left to
    ms-swift, a hub id is retried for about 45 s offline and fails after the output folder exists. The
    ``#N`` sample count must be a whole number above 0, and a local file takes no ``:subset``."""
    entry = str(entry)
    parsed = parse_dataset_entry(entry)
    path = Path(parsed.location).expanduser()
    if parsed.sample is not None and not path.exists() and _looks_local(entry):
        try:
            int(parsed.sample)
        except ValueError:  # no sample count: the '#' is part of a file name that does not exist
            raise ConfigError(key_path, f"data file not found: {Path(entry).expanduser()}") from None
    sample_count(entry, parsed, key_path)
    if path.exists():
        if parsed.subsets and path.is_file():
            raise ConfigError(
                key_path,
                f"{entry!r}: ms-swift reads ':{'/'.join(parsed.subsets)}' as subsets, which a local file does not "
                "have (it would load the whole file and ignore them)",
            )
        return path
    if _looks_local(parsed.location) or _looks_local(entry):
        raise ConfigError(key_path, f"data file not found: {path}")
    if network_allowed():
        return None
    raise ConfigError(
        key_path,
        f"{entry!r} is not a local file, and anchorkd runs offline by default: give the path of a local "
        "data file, or set ANCHORKD_ALLOW_NETWORK=1 to let ms-swift fetch it from a hub",
    )


def validate_dataset_entry(entry: str, key_path: str, rules: DataRules | None = None) -> int | None:
    """Validate one ``data.dataset`` entry; returns the record count of a local ``.jsonl`` / ``.json`` file
    (the whole file: a ``#N`` count takes rows from it, and every row may be taken).

    A folder (a local dataset repository) and other files (``.csv``, ``.parquet``, ...) are left to ms-swift.
    """
    path = check_dataset_location(entry, key_path)
    if path is None or not path.is_file() or path.suffix not in JSON_SUFFIXES:
        return None
    return validate_data_file(path, rules=rules)


# --- files --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowPlace:
    """Where a row is: the line it starts on and, in a JSON array file, its index in the array."""

    line: int
    index: int | None = None

    def error(self, path: Path, message: str) -> DataError:
        where = "" if self.index is None else f"array item [{self.index}]: "
        return DataError(str(path), where + message, self.line)

    def locate(self, error: DataError) -> DataError:
        """``error`` (raised by a check that knows the line only) with the row's array index added."""
        if self.index is None:
            return error
        prefix = f"{error.path}:{error.line}: " if error.line is not None else f"{error.path}: "
        return self.error(Path(error.path), str(error).removeprefix(prefix))


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _holds_json_array(path: Path) -> bool:
    """Whether ``datasets`` reads the file as one JSON array: its first non-blank character is '['."""
    with path.open("rb") as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return stripped.startswith(b"[")
    return False


def _iter_json_array(path: Path) -> Iterator[tuple[RowPlace, object]]:
    """The items of a file holding one JSON array, each with the line it starts on and its index."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(str(path), f"not valid UTF-8 text ({exc.reason} at byte {exc.start})", line) from None
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def line_at(position: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, position)
        counted_to = position
        return line

    def skip(position: int) -> int:
        return _JSON_WHITESPACE.match(text, position).end()

    position = skip(0) + 1  # past the '['
    position = skip(position)
    index = 0
    if text.startswith("]", position):
        position += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as exc:
                raise DataError(
                    str(path), f"not valid JSON ({exc.msg} at column {exc.colno})", exc.lineno
                ) from None
            yield RowPlace(line_at(position), index), record
            position = skip(end)
            if text.startswith(",", position):
                position, index = skip(position + 1), index + 1
                continue
            if text.startswith("]", position):
                position += 1
                break
            raise DataError(
                str(path),
                f"not valid JSON (expected ',' or ']' after array item [{index}])",
                line_at(position),
            )
    if skip(position) != len(text):
        raise DataError(
            str(path), "not valid JSON (text after the closing ']' of the array)", line_at(position)
        )


def iter_data_rows(path: str | Path) -> Iterator[tuple[RowPlace, object]]:
    """The rows of a local ``.jsonl`` / ``.json`` data file as ms-swift reads them (a file that starts with
    '[' is one JSON array; any other is JSON Lines), each with its :class:`RowPlace`. A line that is not
    JSON raises DataError naming ``file:line``."""
    path = Path(path)
    if _holds_json_array(path):
        yield from _iter_json_array(path)
    else:
        for line_no, record in iter_jsonl(path):
            yield RowPlace(line_no), record


def validate_data_file(path: str | Path, rules: DataRules | None = None) -> int:
    """Check every row of an ms-swift ``.jsonl`` / ``.json`` file against every rule; raise DataError naming
    ``file:line`` (and, in a JSON array, the item's index). Returns the number of rows."""
    path = Path(path)
    rules = rules or DataRules()
    lengths = None
    if rules.checks_lengths:
        lengths = RowLengthTally(
            path, rules.max_length, RowTokenCounter(rules.tokenizer_dir, rules.max_pixels)
        )
    files = MediaFiles(path, check_files=rules.check_images)
    count = 0
    for place, record in iter_data_rows(path):
        try:
            check_record(record, path, place.line)
            check_media_tags(record, path, place.line)
            if rules.refuse_opsd:
                check_not_opsd(record, path, place.line)
        except DataError as exc:
            raise place.locate(exc) from None
        files.add(record, place)
        if lengths is not None:
            lengths.add(record, place)
        count += 1
    if count == 0:
        raise DataError(str(path), "the file holds no records")
    files.decode_images()
    if lengths is not None:
        lengths.raise_if_any()
    return count


def validate_jsonl(path: str | Path, check_images: bool = True, rules: DataRules | None = None) -> int:
    """:func:`validate_data_file` (any ``.jsonl`` / ``.json`` file); ``rules`` (when given) replaces
    ``check_images``."""
    return validate_data_file(path, rules=rules or DataRules(check_images=check_images))


# --- one record ---------------------------------------------------------------------------------------


def check_record(record, path: Path, line_no: int) -> None:
    """The shape of one row: an object with a non-empty ``messages`` list of ``{role, content}``, the
    roles ms-swift accepts, contents it can read, in an order its template can pair."""
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
        if message["content"] is None:
            raise DataError(str(path), f"messages[{i}].content is null (ms-swift drops such rows)", line_no)
    check_roles(messages, path, line_no)
    check_contents(messages, path, line_no)
    check_role_order(messages, path, line_no)
    check_tool_calls(messages, path, line_no)


def check_roles(messages: list[dict], path: Path, line_no: int) -> None:
    """Every role must be one ms-swift accepts (it drops the row otherwise)."""
    for i, message in enumerate(messages):
        role = message["role"]
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            raise DataError(
                str(path),
                f"messages[{i}].role {role!r} is not a role ms-swift accepts (it would drop the row); "
                f"accepted: {', '.join(ACCEPTED_ROLES)}",
                line_no,
            )


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "a list", str: "text", type(None): "null"}.get(type(value), "?")


def check_contents(messages: list[dict], path: Path, line_no: int) -> None:
    """Each content is text or a list of typed content blocks; a tool call's or tool result's may be any
    JSON value (ms-swift uses its JSON text). ms-swift's template fails on anything else, after the output
    folder is written."""
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str) or ROLE_ALIASES[message["role"]] in ("tool_call", "tool"):
            continue
        if not isinstance(content, list):
            raise DataError(
                str(path),
                f"messages[{i}].content must be text or a list of content blocks, got {_json_type(content)} "
                f"({json.dumps(content)[:40]})",
                line_no,
            )
        for j, block in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise DataError(
                    str(path),
                    f"{where} must be a content block: an object with a 'type' ({', '.join(media.CONTENT_BLOCK_TYPES)})"
                    f", got {_json_type(block)}",
                    line_no,
                )
            if block["type"] not in media.CONTENT_BLOCK_TYPES:
                raise DataError(
                    str(path),
                    f"{where} has type {block['type']!r}, which ms-swift does not read (it would train on the "
                    f"literal text <{block['type']}> in the block's place); accepted: "
                    f"{', '.join(media.CONTENT_BLOCK_TYPES)}",
                    line_no,
                )
            if block["type"] == "text" and not isinstance(block.get("text"), str):
                raise DataError(
                    str(path),
                    f"{where} is a text block, so its 'text' must be text, got {_json_type(block.get('text'))}",
                    line_no,
                )


def role_order_problem(roles: list[str]) -> tuple[int, str] | None:
    """Where ms-swift's template would fail to pair a row's turns: ``(message index, why)``, or None.

    Follows ``Template._swift_prepare_inputs`` and ``_swift_encode`` on roles alone: the first system
    message is taken out; runs of tool calls become one assistant turn; tool results right after a user
    message are folded into it; results after an assistant turn become one tool turn; repeated user or
    assistant turns merge; a leading assistant turn gets an empty user turn before it. What remains must
    alternate (user or tool, assistant).
    """
    turns = [(i, ROLE_ALIASES[role]) for i, role in enumerate(roles)]
    if turns and turns[0][1] == "system":
        turns = turns[1:]
    for index, role in turns:
        if role == "system":
            return index, "a system message must be the first message"
    if not turns:
        return 0, "the row has no user or assistant message"
    merged: list[tuple[int, str]] = []
    for index, role in turns:
        role = "assistant" if role == "tool_call" else role
        previous = merged[-1][1] if merged else None
        if role == "tool" and previous not in ("assistant", "tool"):
            if previous is None:
                return index, "a tool message must follow a user or assistant message"
            continue  # folded into the user turn before it
        if role == previous:
            continue  # merged with the turn before
        merged.append((index, role))
    if merged[0][1] == "assistant":
        merged.insert(0, (merged[0][0], "user"))
    for position in range(1, len(merged), 2):
        index, role = merged[position]
        if role != "assistant":
            return index, f"a {roles[index]!r} message where ms-swift expects an assistant turn"
    return None


def check_role_order(messages: list[dict], path: Path, line_no: int) -> None:
    problem = role_order_problem([message["role"] for message in messages])
    if problem is not None:
        index, why = problem
        raise DataError(str(path), f"messages[{index}]: {why} (ms-swift would drop the row)", line_no)


def _parse_like_ms_swift(value):
    """JSON, else a Python literal, else None: how ms-swift's agent templates read a tool call."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return None


def check_tool_calls(messages: list[dict], path: Path, line_no: int) -> None:
    """A tool call's content must be an object (or its JSON text) with ``name`` and ``arguments`` (or
    ``parameters``): every ms-swift agent template reads it that way and fails on anything else."""
    for i, message in enumerate(messages):
        if ROLE_ALIASES.get(message["role"]) != "tool_call":
            continue
        call = _parse_like_ms_swift(message["content"])
        arguments = None
        if isinstance(call, dict):
            arguments = call.get("arguments")
            arguments = _parse_like_ms_swift(call.get("parameters") if arguments is None else arguments)
        if not isinstance(call, dict) or "name" not in call or arguments is None:
            raise DataError(
                str(path),
                f"messages[{i}] is a tool call, so its content must be an object (or its JSON text) with "
                "'name' and 'arguments' (ms-swift would drop the row)",
                line_no,
            )


def _media_items(record: dict, key: str) -> list:
    items = record.get(key) or []
    return [items] if isinstance(items, (str, dict)) else items


def _content_text(content) -> str:
    """The text ms-swift sees in a message content (typed blocks contribute their ``text`` parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            block.get("text") or ""
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return json.dumps(content, ensure_ascii=False)


def _inline_media(messages: list[dict], media_type: str) -> int:
    """Typed content blocks (``{"type": "image", ...}`` / ``image_url``) are a tag and an item at once."""
    count = 0
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            count += sum(
                isinstance(block, dict) and block.get("type") in (media_type, f"{media_type}_url")
                for block in content
            )
    return count


def check_media_tags(record: dict, path: Path, line_no: int) -> None:
    """``<image>`` / ``<video>`` tags must match the ``images`` / ``videos`` lists.

    Valid: no tags at all (ms-swift puts one tag per item at the start of the first message), or
    exactly one tag per item. Refused: more tags than items (the surplus is trained on as literal text),
    and some but fewer tags than items (ms-swift would put the rest at the start of the first message,
    away from where the row places the others)."""
    messages = record["messages"]
    for key, tag in MEDIA_TAGS.items():
        items = _media_items(record, key)
        if not isinstance(items, list):
            raise DataError(str(path), f"'{key}' must be a list of paths", line_no)
        inline = _inline_media(messages, key[:-1])
        if inline and items:
            raise DataError(
                str(path),
                f"{key} given both as content blocks and in '{key}' (ms-swift drops the row)",
                line_no,
            )
        # ms-swift turns each typed block into a tag plus an item before it counts tags.
        tags = inline + sum(_content_text(message["content"]).count(tag) for message in messages)
        total = inline + len(items)
        if tags == 0 or tags == total:
            continue
        if tags > total:
            why = f"the extra {tag} tags would be trained on as plain text"
        else:
            why = f"ms-swift would put the missing {tag} tags at the start of the first message"
        raise DataError(
            str(path),
            f"{tags} {tag} tag(s) in the messages but {total} item(s) in '{key}': give one tag per "
            f"item, or none (ms-swift then puts them all at the start of the first message); {why}",
            line_no,
        )


def check_not_opsd(record: dict, path: Path, line_no: int) -> None:
    """Rows with ``teacher_prompt`` / ``teacher_images`` (ms-swift on-policy self-distillation) give the
    teacher a different input than the student; gkd_monitor compares the two position by position."""
    for key in OPSD_KEYS:
        if record.get(key) is not None:
            raise DataError(
                str(path),
                f"the row has '{key}' (ms-swift OPSD): custom.trainer_variant gkd_monitor gives the teacher "
                "the student's own input; remove the field, or train with ms-swift's stock GKD trainer",
                line_no,
            )


def check_no_opsd_rows(path: str | Path) -> int:
    """Refuse a file with any OPSD row (``teacher_prompt`` / ``teacher_images``); returns the row count."""
    path = Path(path)
    count = 0
    for place, record in iter_data_rows(path):
        if isinstance(record, dict):
            try:
                check_not_opsd(record, path, place.line)
            except DataError as exc:
                raise place.locate(exc) from None
        count += 1
    return count


# --- media files ------------------------------------------------------------------------------------

# What ms-swift does with a row whose media it cannot load.
ROW_LOST = "ms-swift would replace the row with another one"


class MediaFiles:
    """The media of one data file. Per row (cheap): every entry has the right type, and with
    ``check_files`` no URL is named while offline and every local file exists. At the end
    (:meth:`decode_images`): every local image decodes, each file once."""

    def __init__(self, path: Path, check_files: bool = True):
        self.path = path
        self.check_files = check_files
        self.seen: set[tuple[str, str]] = set()
        # Each local image file -> the first row naming it, and the value as written there.
        self.images: dict[Path, tuple[RowPlace, str]] = {}

    def add(self, record: dict, place: RowPlace) -> None:
        try:
            refs = media.row_media(record)
        except media.MediaFieldError as exc:
            raise place.error(self.path, str(exc)) from None
        if not self.check_files:
            return
        for ref in refs:
            if (ref.kind, ref.value) in self.seen or media.is_inline(ref.value):
                continue
            self.seen.add((ref.kind, ref.value))
            if media.is_url(ref.value):
                if not network_allowed():
                    raise place.error(
                        self.path,
                        f"{ref.field} is a URL ({ref.value.strip()}), and anchorkd runs offline by default: "
                        "ms-swift would retry it for most of a minute, then replace the row with another one. "
                        "Download it and give its local path, or set ANCHORKD_ALLOW_NETWORK=1",
                    )
                continue
            file = media.local_file(ref.value)
            if not file.is_file():
                raise place.error(self.path, f"{ref.kind} not found: {ref.value} ({ref.field}; {ROW_LOST})")
            if ref.kind == media.IMAGE:
                self.images.setdefault(file, (place, ref.value))

    def decode_images(self) -> None:
        """Decode every image not decoded before (see ``anchorkd.data.media``); refuse the file naming the
        first row whose image fails, and how many fail in all."""
        if not self.images:
            return
        problems = media.undecodable_images(
            list(self.images), media.VerifiedMediaCache(media.media_cache_path())
        )
        if not problems:
            return
        file = next(file for file in self.images if file in problems)
        place, value = self.images[file]
        others = (
            f" {len(problems)} images of this file cannot be read; this is the first."
            if len(problems) > 1
            else ""
        )
        raise place.error(self.path, f"not a readable image: {value} ({problems[file]}); {ROW_LOST}.{others}")


# --- row lengths --------------------------------------------------------------------------------------

# ms-swift splits message text at these tags and tokenizes the pieces apart.
_TAG_SPLIT = re.compile("|".join(re.escape(tag) for tag in (*MEDIA_TAGS.values(), "<audio>")))
# qwen_vl_utils' defaults for the image budget, in merged tokens, and its aspect-ratio limit.
QWEN_VL_IMAGE_MIN_TOKENS = 4
QWEN_VL_IMAGE_MAX_TOKENS = 16384
QWEN_VL_MAX_RATIO = 200
# Per-row settings that change how qwen_vl_utils resizes an image; a row with them counts no image tokens.
_ROW_RESIZE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


@dataclass(frozen=True)
class VisionSettings:
    """How the Qwen-VL template turns an image into tokens (from the checkpoint's processor config)."""

    patch_size: int
    merge_size: int


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen_vl_utils' resize rule: both sides a multiple of ``factor``, the area within the budget,
    the aspect ratio kept as closely as possible (Python's round, as there)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _env_tokens(token_name: str, pixel_name: str, factor: int, default: int) -> int:
    """ms-swift reads ``IMAGE_MAX_TOKEN_NUM`` (or ``MAX_PIXELS`` divided by factor^2) when it loads a
    Qwen-VL processor; so do we, so that the count follows the same budget."""
    if os.environ.get(token_name):
        return int(os.environ[token_name])
    if os.environ.get(pixel_name):
        return int(os.environ[pixel_name]) // factor**2
    return default


def _vision_settings(folder: Path) -> VisionSettings | None:
    for name in ("preprocessor_config.json", "processor_config.json"):
        config = folder / name
        if config.is_file():
            data = json.loads(config.read_text())
            data = data.get("image_processor", data)
            if "patch_size" in data and "merge_size" in data:
                return VisionSettings(int(data["patch_size"]), int(data["merge_size"]))
    return None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(folder: str):
    """The checkpoint's fast tokenizer: ``tokenizer.json`` through ``tokenizers`` (no model, no
    transformers import), else transformers' AutoTokenizer."""
    path = Path(folder)
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        vocab = tokenizer.get_vocab(with_added_tokens=True)

        def encode(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
        vocab = tokenizer.get_vocab()

        def encode(texts: list[str]) -> list[int]:
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    # A token's vocabulary string in UTF-8 is never shorter than the text bytes it stands for (byte-level
    # and sentencepiece symbols take 2-3 bytes for one byte of text), so this bounds what one token covers.
    max_token_bytes = max(len(token.encode("utf-8")) for token in vocab)
    return encode, max_token_bytes


class RowTokenCounter:
    """A lower bound on the tokens ms-swift's Qwen-VL template makes of one row, without a model.

    Counted: the text of every message, tokenized with the student's tokenizer in the pieces ms-swift
    tokenizes (split at media tags), and for each local image the visual tokens its size gives under the
    Qwen-VL rules plus the two vision start/end tokens. Not counted, which keeps it a lower bound: the
    chat template's own tokens (at least 5 per message for Qwen templates; they also absorb the odd
    token merged across a piece boundary), thinking prefixes, videos, and images that are URLs, inline
    bytes, content blocks, or resized by per-row settings. So a row counted over ``max_length`` is
    certainly dropped; one within a few tokens per message of it may still be.

    Images: ms-swift first scales an image above ``template.max_pixels`` down to that area (keeping the
    aspect ratio), then ``qwen_vl_utils.fetch_image`` resizes it to multiples of patch x merge within
    ``IMAGE_MIN_TOKEN_NUM``..``IMAGE_MAX_TOKEN_NUM`` merged tokens (4..16384 unless the environment says
    otherwise); the processor runs with ``do_resize=False``, so its own ``size`` setting does not apply.
    """

    def __init__(self, tokenizer_dir: str | Path, max_pixels: int | None = None):
        folder = Path(tokenizer_dir).expanduser().resolve()
        self._encode, self.max_token_bytes = _load_tokenizer(str(folder))
        self.vision = _vision_settings(folder)
        self.max_pixels = max_pixels
        self._image_tokens: dict[str, int] = {}

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens one image of this size takes in the sequence (visual tokens + vision start/end)."""
        if self.vision is None:
            return 0
        if self.max_pixels and width * height > self.max_pixels:
            ratio = width / height
            scaled_height = math.sqrt(self.max_pixels / ratio)
            height, width = int(scaled_height), int(scaled_height * ratio)
        merge = int(os.environ.get("SPATIAL_MERGE_SIZE") or self.vision.merge_size)
        factor = self.vision.patch_size * merge
        min_tokens = _env_tokens("IMAGE_MIN_TOKEN_NUM", "MIN_PIXELS", factor, QWEN_VL_IMAGE_MIN_TOKENS)
        max_tokens = _env_tokens("IMAGE_MAX_TOKEN_NUM", "MAX_PIXELS", factor, QWEN_VL_IMAGE_MAX_TOKENS)
        h_bar, w_bar = smart_resize(height, width, factor, min_tokens * factor**2, max_tokens * factor**2)
        patches = (h_bar // self.vision.patch_size) * (w_bar // self.vision.patch_size)
        return patches // self.vision.merge_size**2 + 2

    def _local_image_tokens(self, image: str) -> int:
        if image not in self._image_tokens:
            try:
                with Image.open(media.local_file(image)) as handle:
                    width, height = handle.size
            except Exception:  # not found or unreadable: the media check names it; no tokens here
                self._image_tokens[image] = 0
                return 0
            if max(width, height) / max(1, min(width, height)) > QWEN_VL_MAX_RATIO:
                raise ValueError(
                    f"image {image} is {width}x{height}: an aspect ratio above {QWEN_VL_MAX_RATIO}, which "
                    "ms-swift's Qwen-VL image loader refuses (it would drop the row)"
                )
            self._image_tokens[image] = self.image_tokens(width, height)
        return self._image_tokens[image]

    def count(self, record: dict, limit: int) -> int:
        """Lower bound on the row's tokens. Text whose bytes alone prove it longer than ``limit`` is not
        tokenized (the bound is then bytes / the longest token's bytes): a 33 MB line costs its size."""
        texts = [_content_text(message["content"]) for message in record["messages"]]
        text_bytes = sum(len(text.encode("utf-8")) for text in texts)
        if text_bytes > limit * self.max_token_bytes:
            return math.ceil(text_bytes / self.max_token_bytes)
        pieces = [piece for text in texts for piece in _TAG_SPLIT.split(text) if piece]
        tokens = sum(self._encode(pieces)) if pieces else 0
        if not any(key in (record.get("chat_template_kwargs") or {}) for key in _ROW_RESIZE_KEYS):
            for image in _media_items(record, "images"):
                image = image.get("path") if isinstance(image, dict) else image
                if isinstance(image, str) and not (media.is_url(image) or media.is_inline(image)):
                    tokens += self._local_image_tokens(image)
        return tokens


class RowLengthTally:
    """Counts the rows of one file that are longer than ``max_length`` and remembers the first."""

    def __init__(self, path: Path, max_length: int | None, counter: RowTokenCounter | None):
        self.path, self.max_length, self.counter = path, max_length, counter
        self.over = 0
        self.first: tuple[RowPlace, int] | None = None  # (where, tokens)

    def add(self, record: dict, place: RowPlace | int) -> None:
        place = place if isinstance(place, RowPlace) else RowPlace(place)
        try:
            tokens = self.counter.count(record, self.max_length)
        except ValueError as exc:
            raise place.error(self.path, str(exc)) from None
        if tokens > self.max_length:
            self.over += 1
            if self.first is None:
                self.first = (place, tokens)

    def raise_if_any(self) -> None:
        if self.first is None:
            return
        place, tokens = self.first
        raise place.error(
            self.path,
            f"{self.over} row(s) longer than template.max_length ({self.max_length} tokens), the first "
            f"one here with at least {tokens} tokens: ms-swift drops such rows without a word. Shorten or "
            "remove them, raise template.max_length, or set template.truncation_strategy to left or right "
            "to truncate them",
        )


def check_row_lengths(
    path: str | Path, max_length: int, tokenizer_dir: str | Path, max_pixels: int | None = None
) -> int:
    """Refuse a file with rows longer than ``max_length`` tokens (counted by RowTokenCounter), naming the
    count and the first ``file:line``. Returns the row count. Assumes rows that pass ``check_record``."""
    path = Path(path)
    tally = RowLengthTally(path, max_length, RowTokenCounter(tokenizer_dir, max_pixels))
    count = 0
    for place, record in iter_data_rows(path):
        tally.add(record, place)
        count += 1
    tally.raise_if_any()
    return count


def read_jsonl_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` of an ms-swift ``.jsonl`` (or ``.json``) file after checking every
    row and image; the line is the one a row starts on.

    The whole file is validated before the first record is returned, so a bad line fails the caller
    before any model time is spent, with ``file:line``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    validate_data_file(path)
    for place, record in iter_data_rows(path):
        yield place.line, record
