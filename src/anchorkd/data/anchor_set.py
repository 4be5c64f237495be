"""``anchorkd anchors build``: a prompt-only anchor set (``custom.anchor``) made from the user's own data.

Anchors protect the prompts they ask (docs/evaluation.md): drift follows the prompt a model is fine-tuned
on, so the strongest anchor asks the base the training set's own prompts about images from outside the
domain. The set mixes three kinds of rows, none with an assistant turn (the teacher answers them before
training, through the teacher-answer cache, as for any prompt-only anchor row):

- ``training_prompts``: every distinct final user turn of the training set (with its system prompt and its
  ``<image>`` tags) on off-domain images;
- ``general``: general prompts (a shipped list, or the user's) on the same images;
- ``text``: text-only questions (a shipped list, or the user's), so the language side is anchored too.

Off-domain images come from folders (searched recursively for every format PIL decodes) or JSONL files
(ms-swift rows, or ``{"image": path}`` rows). An image whose bytes (SHA-256) also appear in the training
set or in a named eval set is left out and counted, as is a second copy of the same bytes. The images,
prompts and questions are drawn in passes of seeded permutations, so every item is used once per pass
before any is used again, and the same inputs and seed give the same bytes.

Everything is read and checked before anything is written; the anchor set and its summary
(``<name>.summary.json``: what went in) are each written atomically.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from ..errors import ConfigError, DataError
from ..io import atomic_write_json, iter_jsonl, sha256_file, write_jsonl
from ..resources import default_general_prompts_path, default_text_questions_path
from .media import image_problem
from .validate import ROLE_ALIASES, read_jsonl_records

KINDS = ("training_prompts", "general", "text")
IMAGE_KINDS = ("training_prompts", "general")
DEFAULT_ROWS = 400
DEFAULT_SHARES = {"training_prompts": 0.5, "general": 0.25, "text": 0.25}
SUMMARY_SUFFIX = ".summary.json"
IMAGE_TAG = "<image>"
# Tags of media an anchor row cannot carry: the builder pairs prompts with images only.
OTHER_MEDIA_TAGS = ("<video>", "<audio>")
EXAMPLES_KEPT = 5
_SHARE_TOLERANCE = 1e-6


# --- prompts ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One anchor prompt: a user turn (``<image>`` tags included), the images it takes, its system prompt."""

    text: str
    images: int = 0
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        user = [{"role": "user", "content": self.text}]
        return [{"role": "system", "content": self.system}, *user] if self.system is not None else user

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"text": self.text, "images": self.images}
        if self.system is not None:
            described["system"] = self.system
        return described


def content_text(content: Any) -> str | None:
    """A message content as the text ms-swift sees, typed image blocks as ``<image>`` tags; None for a
    content with other media blocks (videos, audio), which an anchor row cannot carry."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(block.get("text") or "")
        elif kind in ("image", "image_url"):
            parts.append(IMAGE_TAG)
        else:
            return None
    return "".join(parts)


def _media_count(record: dict, key: str) -> int:
    items = record.get(key) or []
    return 1 if isinstance(items, (str, dict)) else len(items)


def training_prompt(record: dict) -> tuple[Prompt | None, str]:
    """The prompt a training row fine-tunes on: its final user turn before the final assistant turn, with the
    row's system prompt, taking as many images as the turn has ``<image>`` tags (or, in a row without any
    tag, as the row has images: ms-swift puts their tags before the first message). Returns the prompt and
    ``"ok"``, or None and why the row gives no anchor prompt."""
    messages = record["messages"]
    roles = [ROLE_ALIASES[message["role"]] for message in messages]
    if roles[-1] != "assistant":
        return None, "no_answer"
    if any(role in ("tool", "tool_call") for role in roles):
        return None, "tool_turns"
    users = [i for i, role in enumerate(roles[:-1]) if role == "user"]
    if not users:
        return None, "no_user_turn"
    texts = [content_text(message["content"]) for message in messages]
    if any(text is None for text in texts) or record.get("videos") or record.get("audios"):
        return None, "video_or_audio"
    if any(tag in text for text in texts for tag in OTHER_MEDIA_TAGS):
        return None, "video_or_audio"
    text = texts[users[-1]]
    tags = text.count(IMAGE_TAG)
    if tags:
        images = tags
    elif any(IMAGE_TAG in other for other in texts):
        return None, "images_in_other_turns"
    else:  # typed image blocks are tags already (content_text), so these are the row's ``images``
        images = _media_count(record, "images")
    if images == 0:
        # A text prompt asked again would pull the student back to the base on its own domain prompt.
        return None, "text_only"
    system = texts[0] if roles[0] == "system" else None
    return Prompt(text, images, system), "ok"


class FileDigests(dict):
    """SHA-256 of files by path, each file read once (an image is often listed by many rows)."""

    def __missing__(self, path: Path) -> str:
        self[path] = digest = sha256_file(path)
        return digest


# Rows that ask nothing a training step answers: they hold no training prompt at all.
_NOT_TRAINING_ROWS = ("no_answer", "no_user_turn")


@dataclasses.dataclass
class TrainingSet:
    """What the training files hold that the anchor set needs: their distinct image prompts (in order of
    first appearance), how often each occurs, why the other rows give none, and their images' SHA-256."""

    prompts: dict[Prompt, int] = dataclasses.field(default_factory=dict)
    skipped: Counter = dataclasses.field(default_factory=Counter)
    image_hashes: dict[str, str] = dataclasses.field(default_factory=dict)  # sha256 -> "file:line"
    files: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def read_training_set(paths: Sequence[Path]) -> TrainingSet:
    """Read and check every training file (every line and image, as ``anchorkd validate`` does). A file in
    which no row ends with an assistant turn after a user turn holds no training prompt: DataError."""
    training = TrainingSet()
    digests = FileDigests()
    for path in paths:
        path = _jsonl_path(path, "training set")
        rows = answered = 0
        file_prompts: set[Prompt] = set()
        for line_no, record in read_jsonl_records(path):
            rows += 1
            prompt, why = training_prompt(record)
            answered += why not in _NOT_TRAINING_ROWS
            if prompt is None:
                training.skipped[why] += 1
            else:
                training.prompts[prompt] = training.prompts.get(prompt, 0) + 1
                file_prompts.add(prompt)
            for image in local_images(record, path, line_no):
                training.image_hashes.setdefault(digests[image], f"{path}:{line_no}")
        if not answered:
            raise DataError(
                str(path),
                "holds no training prompt: no row ends with an assistant turn after a user turn (is it a "
                "prompt-only file rather than the training set?)",
            )
        training.files.append(
            {"path": str(path), "sha256": sha256_file(path), "rows": rows, "image_prompts": len(file_prompts)}
        )
    return training


def read_prompt_file(path: Path, what: str) -> list[tuple[Prompt, str]]:
    """``(prompt, file:line)`` of a ``.txt`` file (one prompt per line; blank and ``#`` lines skipped) or of
    an ms-swift ``.jsonl`` file (its final user turn and system prompt; an answer, if any, is dropped).
    ``what`` is ``general`` (prompts asked about an image) or ``text`` (questions without one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(str(path), f"{what} prompt file not found")
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(str(path), f"not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
        found = [
            (Prompt(line.strip()), line_no)
            for line_no, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    elif path.suffix == ".jsonl":
        found = []
        for line_no, record in read_jsonl_records(path):
            if _media_count(record, "images"):
                raise DataError(
                    str(path),
                    f"a {what} prompt carries no images of its own (the builder pairs it with the "
                    "off-domain images, or with none for text questions)",
                    line_no,
                )
            found.append((_final_user_turn(record, path, line_no), line_no))
    else:
        raise DataError(str(path), f"a {what} prompt file must be .txt (one prompt per line) or .jsonl")
    if not found:
        raise DataError(str(path), f"holds no {what} prompt")
    return [(_checked_prompt(prompt, what, path, line_no), f"{path}:{line_no}") for prompt, line_no in found]


def _final_user_turn(record: dict, path: Path, line_no: int) -> Prompt:
    messages = record["messages"]
    roles = [ROLE_ALIASES[message["role"]] for message in messages]
    users = [i for i, role in enumerate(roles) if role == "user"]
    if not users or any(role not in ("system", "user", "assistant") for role in roles):
        raise DataError(str(path), "a prompt row needs a user turn and no tool turns", line_no)
    text = content_text(messages[users[-1]]["content"])
    system = content_text(messages[0]["content"]) if roles[0] == "system" else None
    if text is None or (system is None and roles[0] == "system"):
        raise DataError(str(path), "a prompt row holds text and <image> tags only", line_no)
    return Prompt(text, 0, system)


def _checked_prompt(prompt: Prompt, what: str, path: Path, line_no: int) -> Prompt:
    for tag in OTHER_MEDIA_TAGS:
        if tag in prompt.text:
            raise DataError(str(path), f"{tag} in a {what} prompt: anchor rows carry images only", line_no)
    tags = prompt.text.count(IMAGE_TAG)
    if what == "text":
        if tags:
            raise DataError(str(path), "a text question must not hold an <image> tag", line_no)
        return prompt
    # A general prompt is about an image: without a tag it gets one at its start, where ms-swift puts it.
    return dataclasses.replace(
        prompt, text=prompt.text if tags else IMAGE_TAG + prompt.text, images=tags or 1
    )


# --- images -----------------------------------------------------------------------------------------------


def decodable_suffixes() -> frozenset[str]:
    """File suffixes of the image formats PIL can decode: every format it opens, less the stubs that need a
    handler of their own (HDF5, GRIB, BUFR, WMF) and MPEG, which it identifies but cannot decode."""
    Image.init()
    undecodable = {"MPEG"}
    for name, (factory, _) in Image.OPEN.items():
        if inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile):
            undecodable.add(name)
    return frozenset(
        suffix
        for suffix, name in Image.registered_extensions().items()
        if name in Image.OPEN and name not in undecodable
    )


def local_images(record: dict, path: Path, line_no: int) -> list[Path]:
    """The local image files of an ms-swift row (``images`` entries and typed image blocks); relative paths
    are relative to the working directory, as ms-swift reads them. URLs and inline data cannot be hashed
    without fetching them and are left out."""
    images = record.get("images") or []
    found = [images] if isinstance(images, (str, dict)) else list(images)
    for message in record.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            for block in message["content"]:
                if isinstance(block, dict) and block.get("type") in ("image", "image_url"):
                    found.append(block.get("image") or block.get("image_url"))
    paths = []
    for item in found:
        if isinstance(item, dict):
            item = item.get("path") or item.get("url")
        if not isinstance(item, str):
            raise DataError(str(path), f"image entry {item!r} is not a path", line_no)
        if not item.startswith(("http://", "https://", "data:")):
            paths.append(Path(item).expanduser())
    return paths


def check_readable(image: Path, path: Path | None = None, line_no: int | None = None) -> None:
    """Decode ``image`` as ms-swift will (:func:`~anchorkd.data.media.image_problem`); DataError naming the
    image (and the ``file:line`` that lists it) otherwise."""
    where = (str(path), line_no) if path is not None else (str(image), None)
    if not image.is_file():
        raise DataError(where[0], f"image not found: {image}", where[1])
    problem = image_problem(image)
    if problem is not None:
        what = (
            f"not a readable image: {image} ({problem})"
            if path is not None
            else f"not a readable image ({problem})"
        )
        raise DataError(where[0], what, where[1])


@dataclasses.dataclass(frozen=True)
class SourceImage:
    path: Path  # absolute
    origin: str  # the folder, or the file:line that lists it


def list_source_images(source: Path) -> tuple[list[SourceImage], dict[str, Any]]:
    """Every image of one off-domain source, each checked readable, and a description of the source.

    A folder is searched recursively (hidden files and folders skipped) for files with a suffix of a
    format PIL decodes (:func:`decodable_suffixes`); other files are counted and left alone. A ``.jsonl``
    file lists images as ms-swift rows (``images``; rows without one, such as text chats, are counted) or
    as ``{"image": path}`` rows."""
    source = Path(source).expanduser()
    if source.is_dir():
        suffixes = decodable_suffixes()
        images, others = [], 0
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source).parts
            if any(part.startswith(".") for part in relative) or not path.is_file():
                continue
            if path.suffix.lower() in suffixes:
                check_readable(path)
                images.append(SourceImage(path.resolve(), str(source)))
            else:
                others += 1
        if not images:
            raise DataError(
                str(source),
                f"holds no image files ({others} other file(s); image suffixes PIL decodes: "
                f"{', '.join(sorted(suffixes)[:12])}, ...)",
            )
        return images, {"path": str(source), "type": "folder", "images": len(images), "other_files": others}
    if source.is_file() and source.suffix == ".jsonl":
        images, without = [], 0
        for line_no, record in iter_jsonl(source):
            if not isinstance(record, dict):
                raise DataError(str(source), "a row must be a JSON object", line_no)
            if "image" in record and "images" not in record:
                record = {"images": [record["image"]]}
            listed = local_images(record, source, line_no)
            if not listed and "messages" not in record:
                raise DataError(str(source), "the row names no local image ('images' or 'image')", line_no)
            without += not listed  # an ms-swift row without an image (a text chat) adds none
            for image in listed:
                check_readable(image, source, line_no)
                images.append(SourceImage(image.resolve(), f"{source}:{line_no}"))
        if not images:
            raise DataError(str(source), f"lists no local image ({without} row(s) without one)")
        description = {
            "path": str(source),
            "type": "jsonl",
            "images": len(images),
            "rows_without_image": without,
        }
        return images, description
    if not source.exists():
        raise DataError(str(source), "image source not found")
    raise DataError(str(source), "an image source must be a folder of images or a .jsonl file")


@dataclasses.dataclass
class ImagePool:
    """The off-domain images left after the exclusions, in source order, and what was left out."""

    images: list[tuple[SourceImage, str]]  # (image, sha256)
    candidates: int
    excluded: dict[str, list[dict[str, str]]]  # reason -> every excluded image
    sources: list[dict[str, Any]]


def off_domain_pool(
    sources: Sequence[Path], training_hashes: Mapping[str, str], eval_hashes: Mapping[str, str]
) -> ImagePool:
    """The images of every source, less those whose bytes are in the training set, in an eval set, or
    already taken from an earlier file. DataError when nothing is left."""
    listed, described = [], []
    for source in sources:
        images, description = list_source_images(source)
        listed += images
        described.append(description)
    pool: list[tuple[SourceImage, str]] = []
    excluded: dict[str, list[dict[str, str]]] = {"in_training": [], "in_eval": [], "repeated": []}
    first_seen: dict[str, str] = {}
    for image in listed:
        digest = sha256_file(image.path)
        entry = {"image": str(image.path), "sha256": digest}
        if digest in training_hashes:
            excluded["in_training"].append({**entry, "also_in": training_hashes[digest]})
        elif digest in eval_hashes:
            excluded["in_eval"].append({**entry, "also_in": eval_hashes[digest]})
        elif digest in first_seen:
            excluded["repeated"].append({**entry, "also_in": first_seen[digest]})
        else:
            first_seen[digest] = str(image.path)
            pool.append((image, digest))
    if not pool:
        counts = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in excluded.items() if v)
        raise DataError(
            ", ".join(str(s) for s in sources),
            f"no off-domain image is left: all {len(listed)} image(s) are excluded ({counts}); name images "
            "that are in neither the training set nor the eval sets",
        )
    return ImagePool(pool, len(listed), excluded, described)


def eval_image_hashes(paths: Sequence[Path]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """SHA-256 -> first ``file:line`` of every local image of the eval sets (ms-swift JSONL files, each
    checked whole, or image folders), and a description of each set."""
    hashes: dict[str, str] = {}
    described = []
    digests = FileDigests()
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            images, _ = list_source_images(path)
            for image in images:
                hashes.setdefault(digests[image.path], str(image.path))
            count = len(images)
        else:
            path = _jsonl_path(path, "eval set")
            count = 0
            for line_no, record in read_jsonl_records(path):
                for image in local_images(record, path, line_no):
                    hashes.setdefault(digests[image], f"{path}:{line_no}")
                    count += 1
        sha = None if path.is_dir() else sha256_file(path)
        described.append({"path": str(path), "sha256": sha, "images": count})
    return hashes, described


def _jsonl_path(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(str(path), f"{what} not found")
    if path.suffix != ".jsonl":
        raise DataError(str(path), f"a {what} must be an ms-swift .jsonl file")
    return path


# --- sizes and draws --------------------------------------------------------------------------------------


def parse_shares(text: str) -> dict[str, float]:
    """``training_prompts=0.5,general=0.25,text=0.25`` -> a share per kind (kinds left out get 0); the shares
    must be non-negative and add up to 1. ConfigError naming ``--share`` otherwise."""
    shares = dict.fromkeys(KINDS, 0.0)
    named = set()
    for part in (p.strip() for p in text.split(",")):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise ConfigError("--share", f"{part!r} is not KIND=SHARE with KIND one of {', '.join(KINDS)}")
        if kind in named:
            raise ConfigError("--share", f"{kind} is given twice")
        try:
            share = float(value)
        except ValueError:
            raise ConfigError(
                "--share", f"the share of {kind} must be a number, got {value.strip()!r}"
            ) from None
        if not math.isfinite(share) or share < 0:
            raise ConfigError(
                "--share", f"the share of {kind} must be a finite number >= 0, got {value.strip()}"
            )
        named.add(kind)
        shares[kind] = share
    return check_shares(shares)


def check_shares(shares: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(shares) - set(KINDS))
    if unknown:
        raise ConfigError("--share", f"unknown kind(s) {', '.join(unknown)}; kinds: {', '.join(KINDS)}")
    full = {kind: float(shares.get(kind, 0.0)) for kind in KINDS}
    if any(not math.isfinite(v) or v < 0 for v in full.values()):
        raise ConfigError("--share", f"shares must be finite numbers >= 0, got {full}")
    total = sum(full.values())
    if abs(total - 1.0) > _SHARE_TOLERANCE:
        raise ConfigError("--share", f"the shares must add up to 1, they add up to {total:g}")
    return full


def rows_per_kind(rows: int, shares: Mapping[str, float]) -> dict[str, int]:
    """``rows`` split by ``shares`` (which add up to 1): each kind gets the floor of its share, and the rows
    left go to the largest remainders (ties in the order of ``KINDS``)."""
    exact = {kind: rows * shares[kind] for kind in KINDS}
    counts = {kind: math.floor(exact[kind] + 1e-9) for kind in KINDS}
    left = rows - sum(counts.values())
    by_remainder = sorted(KINDS, key=lambda kind: (-(exact[kind] - counts[kind]), KINDS.index(kind)))
    for kind in by_remainder[:left]:
        counts[kind] += 1
    return counts


def draw(count: int, size: int, seed: int, stream: str) -> list[int]:
    """``count`` indices into ``range(size)``: passes of permutations seeded by (seed, stream, pass), so each
    index is drawn once per pass before any is drawn again."""
    order: list[int] = []
    pass_index = 0
    while len(order) < count:
        permutation = list(range(size))
        random.Random(f"anchorkd-anchor-set:{seed}:{stream}:{pass_index}").shuffle(permutation)
        order += permutation[: count - len(order)]
        pass_index += 1
    return order


@dataclasses.dataclass(frozen=True)
class KindPrompts:
    """The prompts of one kind and where each comes from (``{"from": file:line}``, or for a training prompt
    ``{"training_rows": n}``)."""

    prompts: list[Prompt]
    origins: list[dict[str, Any]]


def compose_rows(
    counts: Mapping[str, int],
    prompts: Mapping[str, KindPrompts],
    pool: Sequence[tuple[Path, str]],
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Counter], Counter]:
    """The anchor rows: each kind's prompts drawn in seeded passes; the image kinds each walk the same seeded
    order of ``pool`` (``(path, sha256)``) from its start, so general prompts are asked about the images the
    training prompts are. Returns the rows, the rows per prompt index of each kind, and per image path."""
    rows: list[dict[str, Any]] = []
    per_prompt: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    per_image: Counter = Counter()
    orders = {
        kind: draw(counts[kind], len(prompts[kind].prompts), seed, kind) if counts[kind] else []
        for kind in KINDS
    }
    slots = max(sum(prompts[kind].prompts[i].images for i in orders[kind]) for kind in IMAGE_KINDS)
    if slots and not pool:
        raise ValueError("image rows without off-domain images")
    image_order = draw(slots, len(pool), seed, "images") if slots else []
    for kind in KINDS:
        cursor = 0
        for number, index in enumerate(orders[kind]):
            prompt = prompts[kind].prompts[index]
            record: dict[str, Any] = {"messages": prompt.messages()}
            if prompt.images:
                chosen = [pool[i] for i in image_order[cursor : cursor + prompt.images]]
                cursor += prompt.images
                record["images"] = [str(path) for path, _ in chosen]
                per_image.update(str(path) for path, _ in chosen)
            record["meta"] = {"id": f"anchor-{kind}-{number:05d}", "kind": kind, "prompt": index}
            per_prompt[kind][index] += 1
            rows.append(record)
    return rows, per_prompt, per_image


# --- the command ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnchorSetRequest:
    """What ``anchorkd anchors build`` is asked for (see its ``--help``)."""

    train: tuple[Path, ...]
    out: Path
    images: tuple[Path, ...] = ()
    evals: tuple[Path, ...] = ()
    rows: int = DEFAULT_ROWS
    shares: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SHARES))
    general_prompts: Path | None = None
    text_questions: Path | None = None
    seed: int = 0
    force: bool = False


@dataclasses.dataclass(frozen=True)
class AnchorSet:
    path: Path
    summary_path: Path
    summary: dict[str, Any]


def summary_path_for(out: Path) -> Path:
    """``anchors.jsonl`` -> ``anchors.summary.json`` beside it."""
    return out.with_name(out.stem + SUMMARY_SUFFIX)


def _check_outputs(out: Path, force: bool) -> Path:
    if out.suffix != ".jsonl":
        raise ConfigError(
            "--out", f"{out}: the anchor set must be a .jsonl file (custom.anchor.dataset reads those)"
        )
    summary = summary_path_for(out)
    for path in (out, summary):
        if path.is_dir():
            raise FileExistsError(f"{path} is a folder; name the anchor set's .jsonl file")
        if path.exists() and not force:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    return summary


def _excluded_summary(excluded: Mapping[str, list[dict[str, str]]]) -> dict[str, Any]:
    return {
        reason: {"count": len(items), "examples": items[:EXAMPLES_KEPT]} for reason, items in excluded.items()
    }


def build_anchor_set(request: AnchorSetRequest) -> AnchorSet:
    """Read and check every input, compose the rows, then write the anchor set and its summary (each
    atomically). Raises ConfigError / DataError / FileExistsError, with nothing written, on bad input."""
    out = Path(request.out).expanduser()
    summary_path = _check_outputs(out, request.force)
    if isinstance(request.rows, bool) or not isinstance(request.rows, int) or request.rows < 1:
        raise ConfigError("--rows", f"the anchor set needs at least 1 row, got {request.rows!r}")
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or request.seed < 0:
        raise ConfigError("--seed", f"the seed must be an integer >= 0, got {request.seed!r}")
    shares = check_shares(request.shares)
    counts = rows_per_kind(request.rows, shares)
    if not request.train:
        raise ConfigError("--train", "name the training set (its prompts, and its images to leave out)")
    needs_images = any(counts[kind] for kind in IMAGE_KINDS)
    if needs_images and not request.images:
        raise ConfigError(
            "--images",
            f"{counts['training_prompts']} training-prompt and {counts['general']} general rows need "
            "off-domain images: name a folder or a .jsonl file of them (or set those shares to 0)",
        )

    training = read_training_set(request.train)
    if counts["training_prompts"] and not training.prompts:
        raise DataError(
            ", ".join(str(p) for p in request.train),
            f"no training prompt takes an image ({_skipped_text(training.skipped)}): the training_prompts "
            "rows pair the training prompts with off-domain images; set their share to 0 for a set of "
            "general prompts and text questions",
        )
    eval_hashes, eval_sets = eval_image_hashes(request.evals)
    general_file = request.general_prompts or default_general_prompts_path()
    text_file = request.text_questions or default_text_questions_path()
    general = read_prompt_file(general_file, "general") if counts["general"] else []
    text = read_prompt_file(text_file, "text") if counts["text"] else []
    pool = off_domain_pool(request.images, training.image_hashes, eval_hashes) if needs_images else None

    prompts = {
        "training_prompts": KindPrompts(
            list(training.prompts), [{"training_rows": n} for n in training.prompts.values()]
        ),
        "general": KindPrompts([p for p, _ in general], [{"from": o} for _, o in general]),
        "text": KindPrompts([p for p, _ in text], [{"from": o} for _, o in text]),
    }
    pool_images = [(image.path, digest) for image, digest in pool.images] if pool else []
    rows, per_prompt, per_image = compose_rows(counts, prompts, pool_images, request.seed)
    summary = _summary(
        request,
        out,
        counts,
        shares,
        prompts,
        per_prompt,
        per_image,
        training,
        eval_sets,
        pool,
        general_file if counts["general"] else None,
        text_file if counts["text"] else None,
    )
    write_jsonl(out, rows)
    try:
        atomic_write_json(summary_path, summary)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return AnchorSet(out, summary_path, summary)


def _skipped_text(skipped: Counter) -> str:
    return ", ".join(f"{n} row(s) {why.replace('_', ' ')}" for why, n in sorted(skipped.items())) or "no rows"


def _summary(
    request: AnchorSetRequest,
    out: Path,
    counts: Mapping[str, int],
    shares: Mapping[str, float],
    prompts: Mapping[str, KindPrompts],
    per_prompt: Mapping[str, Counter],
    per_image: Counter,
    training: TrainingSet,
    eval_sets: list[dict[str, Any]],
    pool: ImagePool | None,
    general_file: Path | None,
    text_file: Path | None,
) -> dict[str, Any]:
    kinds = {}
    for kind in KINDS:
        listed = [
            {"index": i, **prompt.describe(), "rows": per_prompt[kind][i], **prompts[kind].origins[i]}
            for i, prompt in enumerate(prompts[kind].prompts)
        ]
        kinds[kind] = {
            "rows": counts[kind],
            "share_requested": shares[kind],
            "prompts_available": len(listed),
            "prompts_used": sum(1 for p in listed if p["rows"]),
            "prompts": listed,
        }
    images: dict[str, Any] = {"sources": [], "candidates": 0, "available": 0, "used": 0, "list": []}
    excluded = _excluded_summary({"in_training": [], "in_eval": [], "repeated": []})
    if pool is not None:
        images = {
            "sources": pool.sources,
            "candidates": pool.candidates,
            "available": len(pool.images),
            "used": len(per_image),
            "list": [
                {
                    "path": str(image.path),
                    "sha256": digest,
                    "from": image.origin,
                    "rows": per_image[str(image.path)],
                }
                for image, digest in pool.images
                if per_image[str(image.path)]
            ],
        }
        excluded = _excluded_summary(pool.excluded)
    return {
        "anchor_set": str(out),
        "rows": sum(counts.values()),
        "seed": request.seed,
        "kinds": kinds,
        "training_sets": training.files,
        "training_rows_without_an_image_prompt": dict(sorted(training.skipped.items())),
        "eval_sets": eval_sets,
        "prompt_files": {
            "general": str(general_file) if general_file else None,
            "text": str(text_file) if text_file else None,
        },
        "images": images,
        "excluded_images": excluded,
    }


def describe(anchor_set: AnchorSet) -> Iterable[str]:
    """The lines ``anchorkd anchors build`` prints."""
    summary = anchor_set.summary
    kinds = ", ".join(
        f"{kind} {info['rows']} ({info['prompts_used']} prompt(s))" for kind, info in summary["kinds"].items()
    )
    yield f"anchorkd: {summary['rows']} anchor rows in {anchor_set.path}: {kinds}"
    images, excluded = summary["images"], summary["excluded_images"]
    if images["candidates"]:
        yield (
            f"anchorkd: {images['used']} of {images['available']} off-domain images used; left out: "
            f"{excluded['in_training']['count']} in the training set, {excluded['in_eval']['count']} in the eval "
            f"sets, {excluded['repeated']['count']} repeated"
        )
    yield f"anchorkd: summary in {anchor_set.summary_path}"
