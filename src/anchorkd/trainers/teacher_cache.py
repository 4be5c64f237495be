"""The teacher cache: the teacher's top-k distribution at every supervised position, written once.

In forward-only KD (``lmbda: 0``) the teacher's distribution at a supervised position is the same in every
epoch, on every rank and after every resume. ``anchorkd teacher-cache`` runs the teacher once over the
training rows and the anchor rows, encoded by the run's own trainer exactly as training encodes them
(ms-swift's GKD sample encoding: template, truncation, media), and keeps per supervised position the top-k
log-probabilities at the run's KD temperature (fp16), their token ids (int32) and the log of the mass
outside them (fp32): ``6 k + 4`` bytes per supervised token. The loss that trains from it is
:func:`anchorkd.losses.topk.fused_ce_topk_jsd`.

Format: safetensors shards in one folder, each self-describing::

    cache.json                       the settings every shard was written for (CacheSettings)
    shard-r<rank>-<n>.safetensors    logprobs [P, k] fp16, ids [P, k] int32, log_tail [P] fp32,
                                     row_offsets [R + 1] int64; metadata: settings and the R row keys

safetensors (Hugging Face's tensor format, already a dependency through transformers) memory-maps a shard
and reads one row's slice without loading the rest; its header (the row keys) is read without the data,
so opening a cache costs one header per shard. Every shard is written whole to a temporary file and
renamed (:func:`anchorkd.io.atomic_write_bytes`): a killed writer leaves no file that looks complete, and
the next pass writes only the rows no shard holds. Ranks write disjoint shards (rows ``i`` with
``i % world_size == rank``, named by rank), so no file is shared between writers.

A row's key is the SHA-256 of what ms-swift encodes from it (messages, tools, objects) and of its media
files' bytes. The settings (the teacher's fingerprint, template, ``max_length``, ``max_pixels``, the KD
temperature, ``k``) are the cache's own key: a cache written for other settings is refused naming the key
that differs, and a row the cache lacks is refused naming the first such row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..io import atomic_write_bytes, atomic_write_json, read_json_object, sha256_bytes, sha256_file
from ..losses.topk import TeacherTopK, teacher_topk

logger = logging.getLogger("anchorkd")

FORMAT = "anchorkd-teacher-cache/1"
MANIFEST = "cache.json"
SHARD_GLOB = "shard-*.safetensors"
# Rows per shard: a shard is built in memory before its atomic write (k = 64, 400 supervised tokens a row:
# 256 rows ~ 40 MB).
ROWS_PER_SHARD = 256
# Teacher rows per forward when writing.
DEFAULT_BATCH_SIZE = 4
DEFAULT_K = 64


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """Everything besides a row that decides its cached distributions (the cache's key)."""

    teacher: str  # SHA-256 fingerprint of the teacher's files (teacher_targets.teacher_fingerprint)
    template: str | None
    max_length: int | None
    max_pixels: int | None
    temperature: float
    k: int
    format: str = FORMAT

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any], where: str) -> CacheSettings:
        try:
            return cls(**document)
        except TypeError as error:
            raise DataError(where, f"not a teacher cache written by this anchorkd ({error})") from None

    def first_difference(self, other: CacheSettings) -> str | None:
        """``"key: cached X, run Y"`` for the first field that differs, or None."""
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                return f"{field.name}: the cache has {mine!r}, this run {theirs!r}"
        return None


# --- row keys ------------------------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()


_MEDIA_DIGESTS: dict[tuple[str, int, int], str] = {}


def _media_digest(item: Any) -> str:
    """SHA-256 of a media file's bytes (memoised by path, size and modification time) or of inline bytes;
    a URL or anything else is keyed by its text."""
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return sha256_bytes(item["bytes"])
        item = item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return sha256_bytes(bytes(item))
    if isinstance(item, str) and not item.startswith(("http://", "https://", "data:")):
        path = Path(item).expanduser()
        if path.is_file():
            stat = path.stat()
            memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if memo not in _MEDIA_DIGESTS:
                _MEDIA_DIGESTS[memo] = sha256_file(path)
            return _MEDIA_DIGESTS[memo]
    return sha256_bytes(_canonical(item))


def row_key(sample: Any) -> str:
    """The key of one row, from ms-swift's sample of it (``GKDSample``: ``messages``, media, ``tools``,
    ``objects``), taken before encoding (which edits the messages in place)."""
    return sha256_bytes(
        _canonical(
            {
                "messages": sample.messages,
                "tools": sample.tools,
                "objects": sample.objects,
                "images": [_media_digest(item) for item in sample.images or []],
                "videos": [_media_digest(item) for item in sample.videos or []],
                "audios": [_media_digest(item) for item in sample.audios or []],
            }
        )
    )


# --- shards --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardRows:
    """Rows on their way into one shard: per row its key and its ``[n_i, ...]`` top-k tensors."""

    keys: list[str] = dataclasses.field(default_factory=list)
    parts: list[TeacherTopK] = dataclasses.field(default_factory=list)

    def add(self, key: str, top: TeacherTopK) -> None:
        self.keys.append(key)
        self.parts.append(top)

    def __len__(self) -> int:
        return len(self.keys)


def write_shard(path: Path, settings: CacheSettings, rows: ShardRows) -> int:
    """Write ``rows`` as one shard, atomically; return its size in bytes."""
    from safetensors.torch import save

    lengths = [part.ids.size(0) for part in rows.parts]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    k = settings.k
    tensors = {
        "logprobs": _cat([p.logprobs for p in rows.parts], (0, k)).to(torch.float16).contiguous(),
        "ids": _cat([p.ids for p in rows.parts], (0, k)).to(torch.int32).contiguous(),
        "log_tail": _cat([p.log_tail for p in rows.parts], (0,)).to(torch.float32).contiguous(),
        "row_offsets": offsets,
    }
    metadata = {"settings": json.dumps(settings.as_dict()), "keys": json.dumps(rows.keys)}
    data = save(tensors, metadata=metadata)
    atomic_write_bytes(path, data)
    return len(data)


def _cat(parts: list[torch.Tensor], empty_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([p.detach().cpu() for p in parts]) if parts else torch.zeros(empty_shape)


@dataclasses.dataclass(frozen=True)
class _Location:
    shard: Path
    row: int


class TeacherCache:
    """A cache folder opened for reading: the index of every shard's rows, their tensors read on demand."""

    def __init__(self, folder: Path, settings: CacheSettings, index: dict[str, _Location]):
        self.folder = folder
        self.settings = settings
        self._index = index
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(cls, folder: str | Path, expected: CacheSettings | None = None) -> TeacherCache:
        """Open ``folder``; with ``expected``, refuse a cache written for other settings (naming the key)."""
        from safetensors import safe_open

        folder = Path(folder).expanduser()
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise DataError(
                str(folder), f"no teacher cache here ({MANIFEST} missing): run `anchorkd teacher-cache`"
            )
        settings = CacheSettings.from_dict(read_json_object(manifest), str(manifest))
        if expected is not None:
            _refuse_other_settings(settings, expected, manifest)
        index: dict[str, _Location] = {}
        for shard in sorted(folder.glob(SHARD_GLOB)):
            with safe_open(str(shard), framework="pt") as handle:
                metadata = handle.metadata() or {}
            shard_settings = CacheSettings.from_dict(json.loads(metadata.get("settings", "{}")), str(shard))
            _refuse_other_settings(shard_settings, settings, shard)
            for row, key in enumerate(json.loads(metadata.get("keys", "[]"))):
                index.setdefault(key, _Location(shard, row))
        return cls(folder, settings, index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def first_missing(self, keys: Iterable[tuple[str, str]]) -> str | None:
        """The description of the first ``(key, description)`` the cache lacks, or None."""
        return next((description for key, description in keys if key not in self._index), None)

    def require(self, keys: Iterable[tuple[str, str]]) -> None:
        """Refuse (DataError naming the first one) when a row is missing."""
        missing = self.first_missing(keys)
        if missing is not None:
            raise DataError(
                str(self.folder),
                f"the teacher cache has no entry for {missing}: run `anchorkd teacher-cache` on this config",
            )

    def row(self, key: str) -> TeacherTopK:
        """The cached ``[n, k]`` top-k of one row (log-probs fp16, ids int32, tail fp32)."""
        location = self._index.get(key)
        if location is None:
            raise DataError(str(self.folder), f"the teacher cache has no entry for row {key[:12]}")
        handle = self._handle(location.shard)
        offsets = handle.get_slice("row_offsets")[location.row : location.row + 2]
        start, end = int(offsets[0]), int(offsets[1])
        return TeacherTopK(
            handle.get_slice("logprobs")[start:end],
            handle.get_slice("ids")[start:end],
            handle.get_slice("log_tail")[start:end],
        )

    def _handle(self, shard: Path):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt")
        return self._handles[shard]


def _refuse_other_settings(found: CacheSettings, expected: CacheSettings, where: Path) -> None:
    difference = found.first_difference(expected)
    if difference is not None:
        raise ConfigError(
            "custom.teacher_cache",
            f"the teacher cache {where} was written for other settings ({difference}): write a new one "
            "with `anchorkd teacher-cache`",
        )


def prepare_folder(folder: Path, settings: CacheSettings) -> None:
    """Create ``folder`` with its manifest, or check that an existing one is for ``settings``."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        _refuse_other_settings(
            CacheSettings.from_dict(read_json_object(manifest), str(manifest)), settings, manifest
        )
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, settings.as_dict())


# --- writing from a trainer ----------------------------------------------------------------------------


@dataclasses.dataclass
class CacheStats:
    rows: int = 0
    rows_written: int = 0
    rows_cached: int = 0
    supervised_tokens: int = 0
    shard_bytes: int = 0
    shards: int = 0
    seconds: float = 0.0
    teacher_tail_mass_sum: float = 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.shard_bytes / max(self.supervised_tokens, 1)

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_teacher_tail_mass(self) -> float:
        return self.teacher_tail_mass_sum / max(self.supervised_tokens, 1)


def teacher_positions(trainer, micro_batch: dict, k: int) -> list[TeacherTopK]:
    """Per row of an encoded micro-batch (the trainer's ``{model_inputs, teacher_model_inputs}``), the
    teacher's top-k at its supervised positions, in position order (those of the trainer's shifted labels)."""
    from .. import swift_seam as seam
    from .features import find_lm_head, lm_head_weight
    from .gkd_monitor import BODY, shift_labels, without_labels

    model = trainer.model
    teacher_inputs = micro_batch[seam.TEACHER_INPUTS]
    passed = trainer.run_teacher_forward(model, without_labels(teacher_inputs), need_lm=True, fused=True)
    hidden = passed.features[BODY]  # [B, T, H_t]
    if passed.lm_head is not None:
        weight, bias = passed.lm_head
    elif trainer.teacher_model is None:
        weight, bias = lm_head_weight(find_lm_head(trainer.accelerator.unwrap_model(model)), use_base=True)
    else:
        weight, bias = lm_head_weight(find_lm_head(trainer.accelerator.unwrap_model(trainer.teacher_model)))
    labels = shift_labels(micro_batch[seam.MODEL_INPUTS][seam.LABELS])
    rows = []
    with torch.no_grad():
        for b in range(labels.size(0)):
            positions = (labels[b] != -100).nonzero().squeeze(1)
            states = hidden[b].index_select(0, positions).float()
            logits = states @ weight.float().T
            if bias is not None:
                logits = logits + bias.float()
            rows.append(teacher_topk(logits, k, trainer.temperature))
    return rows


def write_from_trainer(
    trainer,
    rows: Sequence[dict],
    folder: Path,
    settings: CacheSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rows_per_shard: int = ROWS_PER_SHARD,
) -> CacheStats:
    """Cache the teacher's top-k for this rank's share of ``rows`` (ms-swift data-set rows) that the cache
    does not hold yet; shards are named by rank and written atomically."""
    from .. import swift_seam as seam

    stats = CacheStats()
    prepare_folder(folder, settings)
    existing = TeacherCache.open(folder, settings)
    mine = [row for index, row in enumerate(rows) if index % world_size == rank]
    samples = trainer.to_samples(list(mine))
    keyed = [(row_key(sample), row) for sample, row in zip(samples, mine, strict=True)]
    stats.rows = len(keyed)
    todo: dict[str, dict] = {}
    for key, row in keyed:
        if key not in existing and key not in todo:
            todo[key] = row
    stats.rows_cached = stats.rows - len(todo)
    started = time.perf_counter()
    pending = ShardRows()
    serial = _next_shard_serial(folder, rank)
    items = list(todo.items())
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            encoded = seam.encode_micro_batch(trainer, trainer.to_samples([row for _, row in batch]))
            for (key, _), top in zip(batch, teacher_positions(trainer, encoded, settings.k), strict=True):
                pending.add(key, top)
                stats.supervised_tokens += top.ids.size(0)
                stats.teacher_tail_mass_sum += float(top.log_tail.double().exp().sum())
            stats.rows_written += len(batch)
            if len(pending) >= rows_per_shard or start + batch_size >= len(items):
                stats.shard_bytes += write_shard(
                    folder / f"shard-r{rank}-{serial:05d}.safetensors", settings, pending
                )
                stats.shards += 1
                serial += 1
                pending = ShardRows()
    finally:
        trainer.model.train(was_training)
    stats.seconds = time.perf_counter() - started
    return stats


def _next_shard_serial(folder: Path, rank: int) -> int:
    serials = [int(path.stem.rsplit("-", 1)[1]) for path in folder.glob(f"shard-r{rank}-*.safetensors")]
    return max(serials, default=-1) + 1


# --- reading it while training --------------------------------------------------------------------------


def open_for_config(config) -> TeacherCache:
    """The cache of a resolved config's ``custom.teacher_cache``, refused (naming the differing key) when it
    was written for other settings. Run by ``anchorkd.checks.check_run``, before any model loads."""
    folder = Path(config.custom.teacher_cache).expanduser().resolve()
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ConfigError(
            "custom.teacher_cache",
            f"no teacher cache at {folder} ({MANIFEST} missing): write it first with `anchorkd teacher-cache`",
        )
    written = CacheSettings.from_dict(read_json_object(manifest), str(manifest))
    return TeacherCache.open(folder, cache_settings_for(config, written.k, folder))


def row_description(sample: Any, where: str = "row") -> str:
    """``where`` and the start of the row's first message, for errors (taken before encoding)."""
    messages = getattr(sample, "messages", None) or [{}]
    content = messages[0].get("content", "") if isinstance(messages[0], dict) else ""
    if not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False, default=str)
    text = " ".join(content.split())
    return f"{where} ({text[:60]!r}{'...' if len(text) > 60 else ''})"


def batch_teacher(cache: TeacherCache, rows: Sequence[tuple[str, str]], labels: torch.Tensor) -> TeacherTopK:
    """The cached teacher of a micro-batch, ``[B, T, k]`` / ``[B, T]`` on ``labels``' device, placed at the
    supervised positions of its ``[B, T]`` shifted ``labels`` (zeros elsewhere: never read).

    ``rows``: per row ``(key, description)``. A row the cache lacks, or whose cached position count differs
    from its supervised positions in this run, is refused naming it."""
    batch, length = labels.shape
    k = cache.settings.k
    logprobs = torch.zeros(batch, length, k, dtype=torch.float32)
    ids = torch.zeros(batch, length, k, dtype=torch.int64)
    log_tail = torch.zeros(batch, length, dtype=torch.float32)
    supervised = (labels != -100).cpu()
    for b, (key, description) in enumerate(rows):
        if key not in cache:
            raise DataError(
                str(cache.folder),
                f"the teacher cache has no entry for {description}: run `anchorkd teacher-cache` on this config",
            )
        positions = supervised[b].nonzero().squeeze(1)
        top = cache.row(key)
        if top.ids.size(0) != positions.numel():
            raise DataError(
                str(cache.folder),
                f"{description} has {positions.numel()} supervised positions in this run but "
                f"{top.ids.size(0)} in the teacher cache (encoded differently): write the cache again with "
                "`anchorkd teacher-cache`",
            )
        logprobs[b, positions] = top.logprobs.float()
        ids[b, positions] = top.ids.long()
        log_tail[b, positions] = top.log_tail.float()
    device = labels.device
    return TeacherTopK(logprobs.to(device), ids.to(device), log_tail.to(device))


# --- the command ---------------------------------------------------------------------------------------


def cache_settings_for(config, k: int, folder: Path) -> CacheSettings:
    """The settings a resolved KD config's cache is keyed by (the teacher's file digests are memoised in
    ``folder``, as the teacher-target cache does)."""
    from ..config.swift_keys import default_value
    from .teacher_targets import Teacher, teacher_fingerprint

    sections = config.sections
    rlhf, template = sections["rlhf"], sections["template"]
    # The trainer's temperature: ms-swift's default (0.9) where the config leaves it out.
    temperature = rlhf.get(
        "temperature", sections["training"].get("temperature", default_value("temperature"))
    )
    adapters = rlhf.get("teacher_adapters") or []
    teacher = Teacher(
        model=Path(rlhf.get("teacher_model") or sections["model"]["model"]).expanduser().resolve(),
        adapter=Path(adapters[0]).expanduser().resolve() if adapters else None,
        model_type="",
        torch_dtype=None,
    )
    folder.mkdir(parents=True, exist_ok=True)
    return CacheSettings(
        teacher=teacher_fingerprint(teacher, folder),
        template=template.get("template"),
        max_length=template.get("max_length"),
        max_pixels=template.get("max_pixels"),
        temperature=float(temperature),
        k=int(k),
    )


def write_teacher_cache(
    config, out: str | Path, k: int = DEFAULT_K, batch_size: int = DEFAULT_BATCH_SIZE
) -> CacheStats:
    """``anchorkd teacher-cache``: build the run's trainer (model, teacher, encoded data sets, as training
    builds them) and cache the teacher's top-k over its training rows and anchor rows. Under torchrun every
    rank writes its own share. Returns what this rank did."""
    import os

    from .pipeline import build_pipeline, settings_for_run

    folder = Path(out).expanduser().resolve()
    # The cache is written with the live teacher, also from a config that trains from it.
    config = dataclasses.replace(config, custom=config.custom.model_copy(update={"teacher_cache": None}))
    settings = cache_settings_for(config, k, folder)
    run_settings = settings_for_run(
        config
    )  # seq_kd answers and answered anchor prompts, as training sees them
    trainer = build_pipeline(run_settings).build_trainer()
    rows = [*trainer.train_dataset, *(trainer.anchor_rows or []), *(trainer.eval_dataset or [])]
    stats = write_from_trainer(
        trainer,
        rows,
        folder,
        settings,
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        batch_size=batch_size,
    )
    logger.info(
        "teacher cache: %d rows (%d written in %.1f s, %.2f rows/s; %d already cached), %d supervised tokens, "
        "%.1f bytes per token, mean teacher tail mass outside the top %d: %.4f; %s",
        stats.rows,
        stats.rows_written,
        stats.seconds,
        stats.rows_per_second,
        stats.rows_cached,
        stats.supervised_tokens,
        stats.bytes_per_token,
        k,
        stats.mean_teacher_tail_mass,
        folder,
    )
    return stats
