"""The images and videos a data row names, checked the way ms-swift will load them, before training.

ms-swift opens a row's media only when it encodes the row, minutes into a run. A file it cannot load
(missing, corrupt, over PIL's decompression-bomb limit, a URL it cannot fetch offline) fails the row, and
ms-swift trains on another row in its place without a word. So every local image is decoded here whole,
as ms-swift's loaders decode it (PIL, then ``convert("RGB")``): PIL's ``verify()`` only walks the file's
structure and passes a truncated JPEG or a PNG whose data stream is corrupt but checksummed.

Decoding a large set costs time (``docs/performance.md`` has the figures per 1,000 images), so images are
decoded on a thread pool (PIL's decoders release the GIL), with a progress bar on a terminal, and each file
decoded cleanly is remembered by (resolved path, size, mtime_ns) in a small cache file
(:func:`media_cache_path`): checking the same data again costs one ``stat`` per image.

Videos are checked for existence only: decoding them needs a video backend and takes seconds each.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import PIL
from PIL import Image

IMAGE, VIDEO = "image", "video"
# Content-block types ms-swift reads (``StdTemplateInputs.remove_messages_media``): text, and each media
# type with its ``_url`` alias. The block's value sits under the key named by its type.
MEDIA_BLOCK_TYPES = {
    "image": IMAGE,
    "image_url": IMAGE,
    "video": VIDEO,
    "video_url": VIDEO,
    "audio": "audio",
    "audio_url": "audio",
}
CONTENT_BLOCK_TYPES = ("text", *MEDIA_BLOCK_TYPES)
# ms-swift takes a string longer than this for inline base64 data, not a path (``vision_utils._check_path``).
MAX_PATH_LENGTH = 2000

MEDIA_CACHE_ENV = "ANCHORKD_MEDIA_CACHE"
CACHE_OFF_VALUES = ("off", "0", "none", "false")
# The cache is appended to every this many decoded files, so that an interrupted check keeps its work.
CACHE_FLUSH_EVERY = 256


class MediaFieldError(ValueError):
    """A media field of a row has the wrong type; the message names the field."""


@dataclass(frozen=True)
class MediaRef:
    """One image or video a row names: its ``kind``, the ``value`` as written, and the ``field`` of the row
    that holds it (``images[0]``, ``videos[1][2]`` for a frame, ``messages[0].content[1]`` for a block)."""

    kind: str
    value: str
    field: str


# --- what a row names ---------------------------------------------------------------------------------------


def _listed(items) -> list | None:
    """ms-swift's reading of an ``images`` / ``videos`` value: one item or a list of them (None: not a list)."""
    if items is None:
        return []
    if isinstance(items, (str, dict)):
        return [items]
    return items if isinstance(items, list) else None


def _path_value(value, field: str, kind: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MediaFieldError(f"{field} must be the path or URL of the {kind}, got {value!r}")
    return value


def _image_entry(item, field: str) -> MediaRef | None:
    """An ``images`` entry: a path or URL, or an object with a ``path`` (or inline ``bytes``)."""
    if isinstance(item, dict):
        if item.get("path") is None and item.get("bytes") is not None:
            return None  # inline data, decoded from the row itself
        item = item.get("path")
    if not isinstance(item, str):
        raise MediaFieldError(f"image entry {item!r} is not a path")
    return MediaRef(IMAGE, _path_value(item, field, IMAGE), field)


def _video_entry(item, field: str) -> list[MediaRef]:
    """A video: a path or URL, or a list of frame images (qwen_vl_utils reads a list as the frames)."""
    if isinstance(item, list):
        return [
            MediaRef(IMAGE, _path_value(frame, f"{field}[{j}]", "frame"), f"{field}[{j}]")
            for j, frame in enumerate(item)
        ]
    if not isinstance(item, str):
        raise MediaFieldError(
            f"{field} must be the path or URL of a video, or a list of frame paths, got {item!r}"
        )
    return [MediaRef(VIDEO, _path_value(item, field, VIDEO), field)]


def _block_media(block: dict, field: str) -> list[MediaRef]:
    """The media of one typed content block: ``{"type": "image", "image": PATH}``, or the OpenAI form
    ``{"type": "image_url", "image_url": {"url": URL}}``."""
    block_type = block.get("type")
    kind = MEDIA_BLOCK_TYPES.get(block_type) if isinstance(block_type, str) else None
    if kind is None:
        return []  # text, or a block check_record refuses
    value = block.get(block["type"])
    if isinstance(value, dict):
        if "url" not in value:
            raise MediaFieldError(f"{field}: the {block['type']!r} block's object has no 'url'")
        value = value["url"]
    if value is None or value == "":
        raise MediaFieldError(
            f"{field}: a block of type {block['type']!r} without its {block['type']!r} value (ms-swift would "
            f"train on the literal text <{kind}> in its place)"
        )
    if kind == VIDEO:
        return _video_entry(value, field)
    if kind == IMAGE:
        return [MediaRef(IMAGE, _path_value(value, field, IMAGE), field)]
    return []  # audio: the Qwen-VL templates take none; left to ms-swift


def row_media(record: dict) -> list[MediaRef]:
    """Every image and video ``record`` names, in row order: ``images``, ``videos``, then typed content
    blocks. Raises MediaFieldError for an entry of the wrong type. Assumes a record with a ``messages`` list
    of objects (``check_record``'s shape)."""
    images = _listed(record.get("images"))
    if images is None:
        raise MediaFieldError("'images' must be a list of paths")
    refs = [ref for i, item in enumerate(images) if (ref := _image_entry(item, f"images[{i}]"))]
    videos = _listed(record.get("videos"))
    if videos is None:
        raise MediaFieldError("'videos' must be a list of paths")
    for i, item in enumerate(videos):
        refs += _video_entry(item, f"videos[{i}]")
    for i, message in enumerate(record["messages"]):
        content = message.get("content")
        if isinstance(content, list):
            for j, block in enumerate(content):
                if isinstance(block, dict):
                    refs += _block_media(block, f"messages[{i}].content[{j}]")
    return refs


def is_url(value: str) -> bool:
    """A value ms-swift and qwen_vl_utils fetch over the network."""
    return value.strip().startswith(("http://", "https://"))


def is_inline(value: str) -> bool:
    """Inline data (a ``data:`` URI, or text too long for a path): decoded from the row itself."""
    return value.startswith("data:") or len(value) > MAX_PATH_LENGTH


def local_file(value: str) -> Path:
    """The file a local media value names, as ms-swift finds it: relative to the working directory, or else
    below ``ROOT_IMAGE_DIR`` when that variable is set."""
    path = Path(value).expanduser()
    root = os.environ.get("ROOT_IMAGE_DIR")
    if not path.exists() and root:
        return (Path(root).expanduser() / value).absolute()
    return path


# --- decoding -----------------------------------------------------------------------------------------------


def bomb_limit() -> int | None:
    """The pixel count above which PIL refuses to open an image (it only warns between half that and it)."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def image_problem(file: str | Path) -> str | None:
    """Why ms-swift could not load the image ``file``, or None when it can: PIL opens it, decodes it whole
    and converts it to RGB, as ms-swift's and qwen_vl_utils' loaders do."""
    try:
        with Image.open(file) as image:
            image.load()
            if image.mode != "RGB":
                image.convert("RGB")
    except Image.DecompressionBombError as exc:
        # Raised by Image.open from the size in the header, before any pixel is decoded.
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else str(exc)
        return (
            f"{size}, over PIL's decompression-bomb limit of {bomb_limit():,} pixels (2 x "
            "PIL.Image.MAX_IMAGE_PIXELS): PIL refuses to open it; scale it down"
        )
    except Exception as exc:  # a corrupt file makes PIL's decoders raise exceptions of every kind
        return f"{type(exc).__name__}: {exc}"
    return None


def default_workers() -> int:
    """One decoding thread per CPU core this process may run on (at most 8: decoding is memory-hungry)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _in_order(function: Callable, items: Iterable, workers: int) -> Iterator[tuple[object, object]]:
    """``(item, function(item))`` in input order, computed on ``workers`` threads with a bounded number in
    flight (a million files never become a million pending futures)."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anchorkd-decode") as pool:
        pending: deque[tuple[object, Future]] = deque()
        for item in items:
            pending.append((item, pool.submit(function, item)))
            if len(pending) >= 4 * workers:
                done_item, future = pending.popleft()
                yield done_item, future.result()
        while pending:
            done_item, future = pending.popleft()
            yield done_item, future.result()


# --- the cache of decoded files -----------------------------------------------------------------------------


def media_cache_path() -> Path | None:
    """Where decoded files are remembered: ``$ANCHORKD_MEDIA_CACHE`` (``off`` turns the cache off), else
    ``$XDG_CACHE_HOME/anchorkd/media-verified.txt`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    chosen = os.environ.get(MEDIA_CACHE_ENV, "").strip()
    if chosen:
        return None if chosen.lower() in CACHE_OFF_VALUES else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(base).expanduser() / "anchorkd" / "media-verified.txt"


def file_key(file: Path) -> str:
    """The identity of one version of a file, under this Pillow and its bomb limit (a newer Pillow may
    decode differently): a hash of (resolved path, size, mtime_ns, Pillow version, limit)."""
    stat = file.stat()
    identity = "\0".join(
        (str(file.resolve()), str(stat.st_size), str(stat.st_mtime_ns), PIL.__version__, str(bomb_limit()))
    )
    return hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


_KEY = re.compile(r"[0-9a-f]{32}")


class VerifiedMediaCache:
    """The keys (:func:`file_key`) of files decoded cleanly, one per line of a text file that only grows
    (33 bytes a file). Several processes may append at once: a torn line is skipped on reading. A cache
    that cannot be read or written is no cache: the check then decodes every time."""

    def __init__(self, path: Path | None):
        self.path = path
        self.keys: set[str] = set()
        if path is not None:
            try:
                with path.open(encoding="ascii", errors="replace") as handle:
                    self.keys = {line.strip() for line in handle if _KEY.fullmatch(line.strip())}
            except OSError:
                pass

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, keys: Sequence[str]) -> None:
        new = [key for key in keys if key not in self.keys]
        self.keys.update(new)
        if self.path is None or not new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="ascii") as handle:
                handle.write("".join(f"{key}\n" for key in new))
        except OSError:
            pass


def undecodable_images(
    files: Sequence[Path],
    cache: VerifiedMediaCache | None = None,
    *,
    workers: int | None = None,
    progress: bool | None = None,
) -> dict[Path, str]:
    """Decode each of ``files`` (existing image files) that ``cache`` does not know; return ``{file: why}``
    for those that fail, and remember the others in ``cache``.

    ``progress``: a progress bar on stderr (None: only on a terminal, and only for 100 files or more).
    """
    cache = cache if cache is not None else VerifiedMediaCache(None)
    todo: dict[Path, str] = {}
    for file in files:
        key = file_key(file)
        if key not in cache:
            todo[file] = key
    if not todo:
        return {}
    from tqdm import tqdm

    workers = max(1, min(workers or default_workers(), len(todo)))
    # tqdm's disable=None: shown on a terminal only.
    disable = not progress if progress is not None else (True if len(todo) < 100 else None)
    problems: dict[Path, str] = {}
    verified: list[str] = []
    with tqdm(total=len(todo), desc="decoding images", unit="image", disable=disable, leave=False) as bar:
        for file, problem in _in_order(image_problem, todo, workers):
            if problem is None:
                verified.append(todo[file])
                if len(verified) >= CACHE_FLUSH_EVERY:
                    cache.add(verified)
                    verified = []
            else:
                problems[file] = problem
            bar.update()
    cache.add(verified)
    return problems
