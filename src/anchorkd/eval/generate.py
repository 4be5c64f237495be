"""Greedy captions for evaluation records, produced exactly the way the model was trained to read them.

A fine-tuned Qwen3-VL only behaves as trained when its prompts are rendered by the same chat template
(system prompt, image placeholders, pixel budget) that ms-swift used for training. So we do not build
prompts ourselves: generation goes through ms-swift's own ``TransformersEngine``, which picks the
template of the model type and, when the checkpoint or adapter folder holds ms-swift's ``args.json``,
the template settings of that training run.

Outputs of :func:`generate_captions` in ``out_dir``:

* ``generations.jsonl`` -- one line per sample: ``id, source, line, scene, style, prompt, images,
  caption, reference, objects, finish_reason, generated_tokens``. Lines are written to a hidden
  temporary file (``.generations.jsonl.<random>.tmp``) as batches finish and the file is renamed into
  place only at the end (:func:`anchorkd.io.write_jsonl`), so ``generations.jsonl`` is never
  half-written.
* ``generation_settings.json`` -- model, adapter, data files with SHA-256, decoding settings, speed,
  library versions and git revision (:mod:`anchorkd.eval.provenance`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anchorkd.data.validate import read_jsonl_records
from anchorkd.errors import ConfigError, DataError
from anchorkd.eval.model import (
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_INFER_BACKEND,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL_TYPE,
    LoadedModel,
    as_loaded_model,
)
from anchorkd.eval.provenance import describe_file, run_provenance
from anchorkd.eval.score import GENERATION_SETTINGS_FILE
from anchorkd.io import atomic_write_json, write_jsonl

logger = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FILE = GENERATION_SETTINGS_FILE


# --------------------------------------------------------------------------------------------------
# Inputs: evaluation records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSample:
    """One evaluation record split into what the model sees (prompt) and what it should say."""

    id: str
    source: str
    line: int
    scene: str | None
    style: str | None
    prompt_messages: list[dict[str, Any]]
    images: list[Any]
    reference: str
    objects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def prompt(self) -> Any:
        """The last user turn's content: the instruction that the caption answers."""
        return next(m["content"] for m in reversed(self.prompt_messages) if m["role"] == "user")

    def generation_record(self, caption: str, finish_reason: str | None, generated_tokens: int) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "line": self.line,
            "scene": self.scene,
            "style": self.style,
            "prompt": self.prompt,
            "images": self.images,
            "caption": caption,
            "reference": self.reference,
            "objects": self.objects,
            "finish_reason": finish_reason,
            "generated_tokens": generated_tokens,
        }


def sample_from_record(record: dict[str, Any], path: Path, line_no: int) -> EvalSample:
    """Prompt = every turn before the final assistant turn; reference = that turn ("" if none)."""
    messages = record["messages"]
    reference = ""
    if messages[-1]["role"] == "assistant":
        reference = messages[-1]["content"]
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise DataError(str(path), "record has no user turn to answer", line_no)
    meta = record.get("meta") or {}
    images = record.get("images") or []
    return EvalSample(
        id=str(meta.get("id", f"{path.stem}:{line_no}")),
        source=str(path),
        line=line_no,
        scene=meta.get("scene"),
        style=meta.get("style"),
        prompt_messages=messages,
        images=[images] if isinstance(images, str) else list(images),
        reference=reference if isinstance(reference, str) else json.dumps(reference),
        objects=list(meta.get("objects") or []),
    )


def read_eval_samples(path: str | Path, limit: int | None = None) -> list[EvalSample]:
    """The first ``limit`` (default: all) samples of an evaluation JSONL file."""
    path = Path(path).expanduser().resolve()
    samples = []
    for line_no, record in read_jsonl_records(path):
        if limit is not None and len(samples) >= limit:
            break
        samples.append(sample_from_record(record, path, line_no))
    return samples


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _batches(items: Sequence[EvalSample], size: int) -> Iterator[Sequence[EvalSample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class Response:
    """One generated answer."""

    text: str
    finish_reason: str | None  # "stop", or "length" when max_new_tokens cut it short
    generated_tokens: int


def decoding_config(max_new_tokens: int, temperature: float = 0.0) -> Any:
    """ms-swift's request settings: greedy when ``temperature`` is 0 whatever the checkpoint's
    ``generation_config`` suggests, and no repetition penalty, so that runs differ only by their weights."""
    from swift.infer_engine import RequestConfig

    return RequestConfig(max_tokens=max_new_tokens, temperature=temperature, repetition_penalty=1.0)


def generate_responses(
    loaded: LoadedModel, batch: Sequence[EvalSample], request_config: Any
) -> list[Response]:
    """The model's answer to each sample's prompt (its messages before the final assistant turn, its
    images), rendered by ms-swift's template; a failed sample raises DataError naming its ``file:line``."""
    from swift.infer_engine import InferRequest

    requests = [InferRequest(messages=s.prompt_messages, images=s.images) for s in batch]
    responses = loaded.engine.infer(requests, request_config, use_tqdm=False)
    answers = []
    for sample, response in zip(batch, responses, strict=True):
        if isinstance(response, Exception):
            raise DataError(sample.source, f"generation failed: {response}", sample.line)
        choice = response.choices[0]
        answers.append(
            Response(choice.message.content or "", choice.finish_reason, response.usage.completion_tokens)
        )
    return answers


def _generate_batch(loaded: LoadedModel, batch: Sequence[EvalSample], request_config: Any) -> list[dict]:
    return [
        sample.generation_record(
            caption=answer.text, finish_reason=answer.finish_reason, generated_tokens=answer.generated_tokens
        )
        for sample, answer in zip(batch, generate_responses(loaded, batch, request_config), strict=True)
    ]


def generate_captions(
    model: str | Path | LoadedModel,
    adapter: str | Path | None,
    data_files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limit: int | None = None,
    model_type: str = DEFAULT_MODEL_TYPE,
    torch_dtype: str | None = None,
    infer_backend: str = DEFAULT_INFER_BACKEND,
    show_progress: bool = True,
    adapter_scale: float | None = None,
) -> Path:
    """Greedy-decode a caption for every record of ``data_files``; return ``out_dir/generations.jsonl``.

    ``model`` is a checkpoint folder or a :class:`LoadedModel` (to reuse one engine across calls).
    ``limit`` caps the samples taken from *each* file (the first N), so a quick run still covers every
    scene kind. Decoding is greedy with no repetition penalty, whatever the checkpoint's
    ``generation_config`` suggests, so runs differ only by their weights. ``adapter_scale`` multiplies
    the LoRA adapter's contribution (:func:`anchorkd.eval.model.scale_lora_adapter`).
    """
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be at least 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise ConfigError("--limit", f"must be at least 1, got {limit}")
    if not data_files:
        raise ConfigError("--data", "no evaluation data file given")
    samples_by_file = {Path(f).expanduser().resolve(): read_eval_samples(f, limit) for f in data_files}
    loaded = as_loaded_model(
        model,
        adapter,
        model_type=model_type,
        torch_dtype=torch_dtype,
        infer_backend=infer_backend,
        adapter_scale=adapter_scale,
    )

    from tqdm import tqdm

    request_config = decoding_config(max_new_tokens)
    out_dir = Path(out_dir)
    final_path = out_dir / GENERATIONS_FILE
    total = sum(len(samples) for samples in samples_by_file.values())
    started = time.perf_counter()
    with tqdm(total=total, desc="generate", unit="sample", disable=not show_progress) as progress:

        def records() -> Iterator[dict[str, Any]]:
            for samples in samples_by_file.values():
                for batch in _batches(samples, batch_size):
                    yield from _generate_batch(loaded, batch, request_config)
                    progress.update(len(batch))

        write_jsonl(final_path, records())
    elapsed = time.perf_counter() - started

    settings = {
        **loaded.describe(),
        "data_files": [describe_file(path) | {"samples": len(s)} for path, s in samples_by_file.items()],
        "limit_per_file": limit,
        "samples": total,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "greedy": True,
        "repetition_penalty": 1.0,
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(total / elapsed, 4) if elapsed > 0 else None,
        **run_provenance(),
    }
    atomic_write_json(out_dir / SETTINGS_FILE, settings)
    logger.info("%d captions in %.1f s (%.2f samples/s) -> %s", total, elapsed, total / elapsed, final_path)
    return final_path
