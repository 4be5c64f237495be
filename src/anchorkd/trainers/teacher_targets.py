"""Teacher targets for sequence-level KD (``rlhf.seq_kd: true``): the teacher's own answer to each training prompt.

Greedy decoding gives the same answer to the same prompt every time, so the teacher's sequences are made
once, on the data side, before training: for each row of each ``data.dataset`` file, the prompt (the
row's messages without its final assistant turn, with its images) goes through the same inference path
as ``anchorkd eval generate`` (:func:`anchorkd.eval.model.load_model`, ms-swift's engine, the run's
template settings), and the answer replaces the row's final assistant turn in a new ms-swift JSONL that
the run trains on. CE and the JSD positions then come from the teacher's sequence; with ``lmbda > 0``
ms-swift's GKD still trains on student samples with probability ``lmbda`` (TRL's precedence).

The anchor prompts of ``custom.anchor`` go through the same machinery and cache with ``keep_answers``:
a row that ends with an assistant turn keeps it, and only the others get the teacher's answer, so that
every anchor row has a target sequence before training (``TargetJob.for_anchor_prompts``).

The cache (``custom.teacher_targets.cache_dir``, default ``teacher_targets`` in the parent of the
output dir as written: ``config.schema.default_teacher_targets_dir``) keeps every answer, so none is generated twice across epochs, ranks, resumed runs or runs that
share prompts::

    rows/ab/<key>.json          one answer: text, finish_reason, generated_tokens
    datasets/<stem>-<id>.jsonl  a data file with the teacher's answers, each row with its provenance
    file_digests.json           SHA-256 of the teacher's files, by path, size and modification time

``<key>`` is the SHA-256 of the prompt's messages, its images' SHA-256, the teacher's fingerprint and the
generation settings; ``<id>`` covers the source file's SHA-256, the fingerprint and the settings. Every
file is written atomically, so a file that exists is complete. Under torchrun rank 0 generates and the
other ranks wait for the data files (the process group does not exist yet), as long as rank 0's heartbeat
(``writers/<id>.json``, rewritten every few seconds while it works) shows it alive, and within the limits
of :mod:`anchorkd.waits` (``ANCHORKD_WRITER_SILENCE_S``, ``ANCHORKD_WAIT_LIMIT_S``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config.loader import ResolvedConfig
from ..config.schema import default_teacher_targets_dir
from ..errors import DataError
from ..eval.generate import EvalSample, decoding_config, generate_responses, sample_from_record
from ..eval.model import DEFAULT_MODEL_TYPE, TORCH_DTYPES, PromptSettings, load_model
from ..io import atomic_write_json, iter_jsonl, read_json_object, sha256_bytes, sha256_file, write_jsonl
from ..waits import WriterHeartbeat, check_limits
from ..waits import wait_for_files as wait_for_writer

logger = logging.getLogger("anchorkd")

PROVENANCE_KEY = "teacher_target"
ROWS_DIR = "rows"
DATASETS_DIR = "datasets"
DIGESTS_FILE = "file_digests.json"
WRITERS_DIR = "writers"
# Bumped when the key or the row format changes, so old cache entries are never read as new ones.
CACHE_VERSION = 1
# Files of a checkpoint or adapter folder that decide what it generates: weights, configs, tokenizer,
# chat template, ms-swift's args.json. Optimizer and RNG states (.pt, .pth) and READMEs are left out.
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".txt", ".model", ".tiktoken")
# Row keys whose content the teacher's prompt would need but that generation here does not pass on.
UNSUPPORTED_ROW_KEYS = ("videos", "audios", "tools", "objects")
AWAITED = "rank 0's teacher answers"
_WAIT_HINT = (
    "The answers finished so far stay in the cache (custom.teacher_targets.cache_dir): a new run goes on from "
    "them, and `anchorkd teacher-targets` makes a seq_kd run's answers in one process beforehand."
)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The checkpoint (and optional LoRA adapter) that writes the targets, and how it is loaded."""

    model: Path
    adapter: Path | None
    model_type: str
    torch_dtype: str | None


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the prompt and the weights that decides the teacher's answer."""

    max_new_tokens: int
    temperature: float
    infer_backend: str
    prompt: PromptSettings

    def describe(self, teacher: Teacher) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "decoding": "greedy" if self.temperature == 0 else "sampled",
            "infer_backend": self.infer_backend,
            "model_type": teacher.model_type,
            "torch_dtype": teacher.torch_dtype,
            **dataclasses.asdict(self.prompt),
        }


@dataclasses.dataclass(frozen=True)
class TargetJob:
    """Which files to rewrite, with which teacher and settings, into which cache.

    ``keep_answers``: rows that already end with an assistant turn keep it, and only the others are
    answered by the teacher (the anchor prompts of ``custom.anchor``); otherwise every row's answer is
    replaced (``seq_kd``).
    """

    teacher: Teacher
    settings: GenerationSettings
    batch_size: int
    cache_dir: Path
    sources: tuple[Path, ...]
    keep_answers: bool = False

    @classmethod
    def for_anchor_prompts(cls, config: ResolvedConfig) -> TargetJob:
        """The job that gives every anchor prompt of ``custom.anchor.dataset`` an answer: its own, or the
        teacher's."""
        sources = tuple(Path(entry).expanduser().resolve() for entry in config.custom.anchor.dataset)
        return dataclasses.replace(cls.from_config(config), sources=sources, keep_answers=True)

    @classmethod
    def from_config(cls, config: ResolvedConfig) -> TargetJob:
        """The job of a resolved seq_kd config (its rules have checked every value used here)."""
        sections = config.sections
        model, rlhf, template = sections["model"], sections["rlhf"], sections["template"]
        training = sections["training"]
        options = config.custom.teacher_targets
        adapters = rlhf.get("teacher_adapters") or []
        dtype = model.get("torch_dtype")
        teacher = Teacher(
            model=Path(rlhf["teacher_model"]).expanduser().resolve(),
            adapter=Path(adapters[0]).expanduser().resolve() if adapters else None,
            model_type=rlhf.get("teacher_model_type") or model.get("model_type") or DEFAULT_MODEL_TYPE,
            torch_dtype=dtype if dtype in TORCH_DTYPES else None,
        )
        settings = GenerationSettings(
            max_new_tokens=rlhf.get("max_completion_length") or _swift_default_max_completion_length(),
            temperature=options.temperature,
            infer_backend=options.infer_backend,
            prompt=PromptSettings(
                template_type=template.get("template"),
                max_pixels=template.get("max_pixels"),
                system=template.get("system"),
            ),
        )
        return cls(
            teacher=teacher,
            settings=settings,
            batch_size=options.batch_size,
            cache_dir=Path(options.cache_dir or default_teacher_targets_dir(training.get("output_dir")))
            .expanduser()
            .resolve(),
            sources=tuple(Path(entry).expanduser().resolve() for entry in sections["data"]["dataset"]),
        )


@dataclasses.dataclass
class TargetStats:
    """What one pass did: rows the teacher answers, rows that keep their own answer (anchor prompts), answers
    generated, answers taken from the cache, data files reused."""

    rows: int = 0
    kept: int = 0
    generated: int = 0
    cached: int = 0
    truncated: int = 0
    files_reused: int = 0
    seconds_generating: float = 0.0


def _swift_default_max_completion_length() -> int:
    from ..swift_seam import arguments_classes

    _, rlhf_cls = arguments_classes()
    return next(f.default for f in dataclasses.fields(rlhf_cls) if f.name == "max_completion_length")


# --- keys and fingerprints --------------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _fingerprint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES)


def teacher_fingerprint(teacher: Teacher, cache_dir: Path) -> str:
    """SHA-256 over the SHA-256 of every file that decides what the teacher generates.

    Hashing a multi-GB checkpoint takes a while (about 1 s per GB), so each file's digest is kept in
    ``file_digests.json`` under its path, size and modification time and reused while those match.
    """
    memo_path = cache_dir / DIGESTS_FILE
    memo = read_json_object(memo_path) if memo_path.is_file() else {}
    parts, changed = [], False
    for role, folder in (("model", teacher.model), ("adapter", teacher.adapter)):
        if folder is None:
            continue
        for path in _fingerprint_files(folder):
            stat = path.stat()
            entry = memo.get(str(path))
            if not (
                isinstance(entry, dict)
                and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns
            ):
                entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
                memo[str(path)] = entry
                changed = True
            parts.append([role, path.name, entry["sha256"]])
    if changed:
        atomic_write_json(memo_path, memo)
    return sha256_bytes(_canonical(parts))


def _image_digest(image: Any) -> str:
    """SHA-256 of a local image's bytes (relative paths are read from the working directory, as ms-swift
    does); a URL or data URI is keyed by its text."""
    reference = image.get("path") if isinstance(image, dict) else image
    if isinstance(reference, str) and not reference.startswith(("http://", "https://", "data:")):
        return sha256_file(Path(reference).expanduser())
    return sha256_bytes(_canonical(reference))


def prompt_key(sample: EvalSample, fingerprint: str, settings: dict[str, Any]) -> str:
    """The cache key of one teacher answer: what the teacher is shown, the teacher, and how it decodes."""
    return sha256_bytes(
        _canonical(
            {
                "version": CACHE_VERSION,
                "messages": sample.prompt_messages,
                "images": [_image_digest(image) for image in sample.images],
                "teacher": fingerprint,
                "settings": settings,
            }
        )
    )


def _row_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / ROWS_DIR / key[:2] / f"{key}.json"


def target_file(job: TargetJob, source: Path, fingerprint: str) -> Path:
    """Where the teacher-target version of ``source`` lives in the cache (a content address)."""
    identity = {
        "version": CACHE_VERSION,
        "source_sha256": sha256_file(source),
        "teacher": fingerprint,
        "settings": job.settings.describe(job.teacher),
    }
    if job.keep_answers:  # only then: seq_kd's content addresses stay as they were
        identity["keep_answers"] = True
    return job.cache_dir / DATASETS_DIR / f"{source.stem}-{sha256_bytes(_canonical(identity))[:16]}.jsonl"


# --- generation -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
    """One data row; ``key`` None for a row that keeps its own answer (nothing to generate)."""

    record: dict[str, Any]
    sample: EvalSample | None
    key: str | None


def has_answer(record: dict[str, Any]) -> bool:
    """Whether a row ends with an assistant turn (the answer a KD-only anchor row trains on)."""
    messages = record.get("messages") or []
    return bool(messages) and messages[-1].get("role") in ("assistant", "gpt", "bot")


def _read_rows(
    source: Path, fingerprint: str, settings: dict[str, Any], keep_answers: bool = False
) -> list[_Row]:
    from ..data.validate import read_jsonl_records

    rows = []
    for line_no, record in read_jsonl_records(source):
        if keep_answers and has_answer(record):
            rows.append(_Row(record, None, None))
            continue
        unsupported = [key for key in UNSUPPORTED_ROW_KEYS if record.get(key)]
        if unsupported:
            raise DataError(
                str(source),
                f"seq_kd prompts the teacher with messages and images only; this row also has {unsupported[0]!r}",
                line_no,
            )
        sample = sample_from_record(record, source, line_no)
        rows.append(_Row(record, sample, prompt_key(sample, fingerprint, settings)))
    return rows


def _batches(items: Sequence[_Row], size: int) -> Iterator[Sequence[_Row]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _generate_missing(job: TargetJob, missing: list[_Row], stats: TargetStats) -> None:
    """Generate the answers no cache entry holds, writing each batch's entries as soon as it is done."""
    started = time.perf_counter()
    loaded = load_model(
        job.teacher.model,
        job.teacher.adapter,
        model_type=job.teacher.model_type,
        torch_dtype=job.teacher.torch_dtype,
        infer_backend=job.settings.infer_backend,
        prompt_settings=job.settings.prompt,
    )
    request_config = decoding_config(job.settings.max_new_tokens, job.settings.temperature)
    try:
        for batch in _batches(missing, job.batch_size):
            answers = generate_responses(loaded, [row.sample for row in batch], request_config)
            for row, answer in zip(batch, answers, strict=True):
                atomic_write_json(
                    _row_path(job.cache_dir, row.key),
                    {
                        "key": row.key,
                        "text": answer.text,
                        "finish_reason": answer.finish_reason,
                        "generated_tokens": answer.generated_tokens,
                    },
                )
            stats.generated += len(batch)
            logger.info("teacher targets: %d / %d generated", stats.generated, len(missing))
    finally:
        del loaded
        _release_accelerator_memory()
    stats.seconds_generating += time.perf_counter() - started


def _release_accelerator_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _target_record(row: _Row, answer: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    record = dict(row.record)
    record["messages"] = [*row.sample.prompt_messages, {"role": "assistant", "content": answer["text"]}]
    record[PROVENANCE_KEY] = {
        **provenance,
        "source": row.sample.source,
        "line": row.sample.line,
        "key": row.key,
        "finish_reason": answer["finish_reason"],
        "generated_tokens": answer["generated_tokens"],
    }
    return record


def write_teacher_targets(job: TargetJob) -> tuple[dict[Path, Path], TargetStats]:
    """Make the teacher-target file of every source in the cache, generating only the answers the cache
    does not hold; return ``{source: target file}`` and what was done."""
    stats = TargetStats()
    fingerprint = teacher_fingerprint(job.teacher, job.cache_dir)
    settings = job.settings.describe(job.teacher)
    destinations = {source: target_file(job, source, fingerprint) for source in job.sources}
    pending: dict[Path, list[_Row]] = {}
    for source, destination in destinations.items():
        if destination.is_file():
            stats.files_reused += 1
            continue
        pending[source] = _read_rows(source, fingerprint, settings, job.keep_answers)
    unique: dict[str, _Row] = {}
    for rows in pending.values():
        answered = [row for row in rows if row.key is not None]
        stats.rows += len(answered)
        stats.kept += len(rows) - len(answered)
        for row in answered:
            if row.key not in unique and not _row_path(job.cache_dir, row.key).is_file():
                unique[row.key] = row
    stats.cached = stats.rows - len(unique)
    if unique:
        _generate_missing(job, list(unique.values()), stats)

    provenance = {
        "teacher": {
            "model": str(job.teacher.model),
            "adapter": str(job.teacher.adapter) if job.teacher.adapter else None,
            "fingerprint": fingerprint,
        },
        "generation": settings,
    }
    for source, rows in pending.items():
        answers = [
            None if row.key is None else read_json_object(_row_path(job.cache_dir, row.key)) for row in rows
        ]
        stats.truncated += sum(
            answer is not None and answer["finish_reason"] == "length" for answer in answers
        )
        write_jsonl(
            destinations[source],
            (
                row.record if answer is None else _target_record(row, answer, provenance)
                for row, answer in zip(rows, answers, strict=True)
            ),
        )
    _log_stats(stats, job)
    return destinations, stats


def _log_stats(stats: TargetStats, job: TargetJob) -> None:
    logger.info(
        "teacher targets: %d rows to answer (%d keep their own answer), %d answers generated (%.1f s), "
        "%d from the cache, %d data files reused; cache %s",
        stats.rows,
        stats.kept,
        stats.generated,
        stats.seconds_generating,
        stats.cached,
        stats.files_reused,
        job.cache_dir,
    )
    if stats.truncated:
        logger.warning(
            "teacher targets: %d of %d answers stopped at rlhf.max_completion_length (%d tokens); they train "
            "as complete answers (the end-of-turn token follows): raise the limit if that is not intended",
            stats.truncated,
            stats.rows,
            job.settings.max_new_tokens,
        )


def heartbeat_path(job: TargetJob) -> Path:
    """Where the writer of ``job`` shows that it is alive: known to every rank before the teacher's files are
    fingerprinted (which takes a while on the first run), so the writer beats through that too."""
    identity = {
        "version": CACHE_VERSION,
        "sources": [str(source) for source in job.sources],
        "teacher": [str(job.teacher.model), str(job.teacher.adapter)],
        "settings": job.settings.describe(job.teacher),
        "keep_answers": job.keep_answers,
    }
    return job.cache_dir / WRITERS_DIR / f"{sha256_bytes(_canonical(identity))[:16]}.json"


def wait_for_files(paths: Sequence[Path], heartbeat: Path | None = None, **limits: float) -> None:
    """Block until rank 0 has written every path (atomically, so existing means complete); raises
    :class:`anchorkd.waits.WaitLimitExceeded`, naming the files and rank 0's log, when rank 0 stops beating
    ``heartbeat`` or the wait runs past its limit (``limits``: ``poll_s``, ``limit_s``, ``silence_s``)."""
    wait_for_writer(paths, what=AWAITED, heartbeat=heartbeat, hint=_WAIT_HINT, **limits)


def with_teacher_targets(
    config: ResolvedConfig, *, writer: bool, wait: Callable[[Sequence[Path], Path], None] = wait_for_files
) -> ResolvedConfig:
    """``config`` training on the teacher's answers instead of its data set's (``seq_kd``), and with anchor
    prompts that all have an answer (``custom.anchor``: rows without one get the teacher's); unchanged
    without either.

    The writer rank makes (or reuses) the files; every other rank waits for the same content-addressed
    paths, which it computes itself (the fingerprint memo makes that cheap after the first run).
    """
    check_limits()  # a bad wait limit is refused on every rank before anything loads
    if config.seq_kd:
        files = _target_files(TargetJob.from_config(config), writer, wait)
        data = {**config.sections["data"], "dataset": [str(path) for path in files]}
        logger.info("seq_kd: training on the teacher's answers in %s", [str(path) for path in files])
        config = dataclasses.replace(config, sections={**config.sections, "data": data})
    if config.anchor_prompts_active:
        files = _target_files(TargetJob.for_anchor_prompts(config), writer, wait)
        anchor = config.custom.anchor.model_copy(update={"dataset": [str(path) for path in files]})
        logger.info(
            "anchor prompts: every row answered (its own answer or the teacher's) in %s", anchor.dataset
        )
        config = dataclasses.replace(config, custom=config.custom.model_copy(update={"anchor": anchor}))
    return config


def _target_files(job: TargetJob, writer: bool, wait: Callable[[Sequence[Path], Path], None]) -> list[Path]:
    heartbeat = heartbeat_path(job)
    if writer:
        with WriterHeartbeat(heartbeat, "the teacher's answers"):
            destinations, _ = write_teacher_targets(job)
        return [destinations[source] for source in job.sources]
    fingerprint = teacher_fingerprint(job.teacher, job.cache_dir)
    files = [target_file(job, source, fingerprint) for source in job.sources]
    wait(files, heartbeat)
    return files


def export_teacher_targets(config: ResolvedConfig, out: str | Path) -> tuple[int, TargetStats]:
    """``anchorkd teacher-targets``: the teacher's answers for every row of the config's ``data.dataset``
    files, in order, in one ms-swift JSONL at ``out`` (each row with its provenance). The cache is the
    training run's, so a later ``seq_kd`` run of the same config generates nothing. Returns the number of
    rows written and what was done."""
    job = TargetJob.from_config(config)
    destinations, stats = write_teacher_targets(job)
    rows = (record for source in job.sources for _, record in iter_jsonl(destinations[source]))
    return write_jsonl(out, rows), stats
