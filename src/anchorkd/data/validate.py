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

from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from ..io import iter_jsonl
from ..offline import network_allowed

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")

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
    ``check_images``: open every local image once.
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


def split_dataset_entry(entry: str) -> tuple[str, str | None]:
    """ms-swift allows ``path#N`` (take N samples); return (path, suffix)."""
    if os.path.exists(entry):  # ms-swift, too, takes an existing path whole before looking for '#'
        return entry, None
    path, sep, count = entry.rpartition("#")
    if sep and count.isdigit():
        return path, count
    return entry, None


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.endswith(DATA_SUFFIXES)


def check_dataset_location(entry: str, key_path: str) -> Path | None:
    """Where a ``data.dataset`` entry points: an existing local file or folder, or None for a hub
    dataset when the network is allowed. Anything else is a ConfigError naming ``key_path``: left to
    ms-swift, a hub id is retried for about 45 s offline and fails after the output folder exists."""
    path_text, _ = split_dataset_entry(str(entry))
    path = Path(path_text).expanduser()
    if path.exists():
        return path
    if _looks_local(path_text):
        raise ConfigError(key_path, f"data file not found: {path}")
    if network_allowed():
        return None
    raise ConfigError(
        key_path,
        f"{entry!r} is not a local file, and anchorkd runs offline by default: give the path of a local "
        "data file, or set ANCHORKD_ALLOW_NETWORK=1 to let ms-swift fetch it from a hub",
    )


def validate_dataset_entry(entry: str, key_path: str, rules: DataRules | None = None) -> int | None:
    """Validate one ``data.dataset`` entry; returns the record count for local JSONL files.

    A folder (a local dataset repository) and files other than ``.jsonl`` are left to ms-swift.
    """
    path = check_dataset_location(entry, key_path)
    if path is None or not path.is_file() or path.suffix != ".jsonl":
        return None
    return validate_jsonl(path, rules=rules)


# --- files --------------------------------------------------------------------------------------------


def validate_jsonl(path: str | Path, check_images: bool = True, rules: DataRules | None = None) -> int:
    """Check every line of an ms-swift JSONL file against every rule; raise DataError naming
    ``file:line``. Returns the number of records. ``rules`` (when given) replaces ``check_images``."""
    path = Path(path)
    rules = rules or DataRules(check_images=check_images)
    lengths = None
    if rules.checks_lengths:
        lengths = RowLengthTally(
            path, rules.max_length, RowTokenCounter(rules.tokenizer_dir, rules.max_pixels)
        )
    count = 0
    checked_images: set[str] = set()
    for line_no, record in iter_jsonl(path):
        check_record(record, path, line_no)
        check_media_tags(record, path, line_no)
        if rules.refuse_opsd:
            check_not_opsd(record, path, line_no)
        if rules.check_images:
            for image in _image_paths(record, path, line_no):
                if image not in checked_images:
                    _check_image(image, path, line_no)
                    checked_images.add(image)
        if lengths is not None:
            lengths.add(record, line_no)
        count += 1
    if count == 0:
        raise DataError(str(path), "the file holds no records")
    if lengths is not None:
        lengths.raise_if_any()
    return count


# --- one record ---------------------------------------------------------------------------------------


def check_record(record, path: Path, line_no: int) -> None:
    """The shape of one row: an object with a non-empty ``messages`` list of ``{role, content}``, the
    roles ms-swift accepts, in an order its template can pair."""
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
    for line_no, record in iter_jsonl(path):
        if isinstance(record, dict):
            check_not_opsd(record, path, line_no)
        count += 1
    return count


def _image_paths(record: dict, path: Path, line_no: int) -> list[str]:
    images = _media_items(record, "images")
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
            with Image.open(Path(image).expanduser()) as handle:
                width, height = handle.size
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
                if isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
                    tokens += self._local_image_tokens(image)
        return tokens


class RowLengthTally:
    """Counts the rows of one file that are longer than ``max_length`` and remembers the first."""

    def __init__(self, path: Path, max_length: int | None, counter: RowTokenCounter | None):
        self.path, self.max_length, self.counter = path, max_length, counter
        self.over = 0
        self.first: tuple[int, int] | None = None  # (line, tokens)

    def add(self, record: dict, line_no: int) -> None:
        try:
            tokens = self.counter.count(record, self.max_length)
        except ValueError as exc:
            raise DataError(str(self.path), str(exc), line_no) from None
        if tokens > self.max_length:
            self.over += 1
            if self.first is None:
                self.first = (line_no, tokens)

    def raise_if_any(self) -> None:
        if self.first is None:
            return
        line_no, tokens = self.first
        raise DataError(
            str(self.path),
            f"{self.over} row(s) longer than template.max_length ({self.max_length} tokens), the first "
            f"one here with at least {tokens} tokens: ms-swift drops such rows without a word. Shorten or "
            "remove them, raise template.max_length, or set template.truncation_strategy to left or right "
            "to truncate them",
            line_no,
        )


def check_row_lengths(
    path: str | Path, max_length: int, tokenizer_dir: str | Path, max_pixels: int | None = None
) -> int:
    """Refuse a file with rows longer than ``max_length`` tokens (counted by RowTokenCounter), naming the
    count and the first ``file:line``. Returns the row count. Assumes rows that pass ``check_record``."""
    path = Path(path)
    tally = RowLengthTally(path, max_length, RowTokenCounter(tokenizer_dir, max_pixels))
    count = 0
    for line_no, record in iter_jsonl(path):
        tally.add(record, line_no)
        count += 1
    tally.raise_if_any()
    return count


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
