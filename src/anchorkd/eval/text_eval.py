"""Text fluency: per-token perplexity of the assistant turns of text-only chat, and its change vs base.

Fine-tuning on captions can erode the language model underneath; the validation plan allows at most a
5 % perplexity regression on a text-only sanity set. Perplexity is measured on exactly the tokens that
training puts a loss on: records are encoded by ms-swift's template in training mode, whose labels
mask the system prompt, the user turns and the chat scaffolding, and keep the assistant tokens
(including their end-of-turn token). Then

    nll = sum of -log p(token) over every assistant token of the file / number of those tokens
    ppl = exp(nll)

i.e. one micro-average over the file, so long answers weigh by their length, as in training. The
change vs a base model is ``100 * (ppl - base_ppl) / base_ppl`` (positive = worse; judged and written
to ``text_eval.json`` by :mod:`anchorkd.eval.score`); the ``eval text`` command exits with
:data:`EXIT_TEXT_REGRESSION` when it exceeds the allowed percentage, so it can gate a pipeline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anchorkd import swift_seam as seam
from anchorkd.data.validate import read_jsonl_records
from anchorkd.errors import ConfigError, DataError
from anchorkd.eval.model import DEFAULT_EVAL_BATCH_SIZE, DEFAULT_MODEL_TYPE, LoadedModel, as_loaded_model
from anchorkd.eval.score import (
    DEFAULT_MAX_REGRESSION_PCT,
    base_from_text_eval,
    text_eval_document,
    write_text_eval,
)

logger = logging.getLogger(__name__)

EXIT_TEXT_REGRESSION = 3
"""Exit status of ``anchorkd eval text`` when perplexity rose by more than ``--max-regression-pct``."""

IGNORE_INDEX = -100  # ms-swift's label for tokens without a loss


def _encode(template: Any, record: dict[str, Any], path: Path, line_no: int) -> dict[str, Any]:
    try:
        encoded = template.encode({"messages": record["messages"], "images": record.get("images") or []})
    except Exception as error:  # ms-swift raises plain exceptions (e.g. MaxLengthError) for bad records
        raise DataError(
            str(path), f"cannot encode the record with the model's template: {error}", line_no
        ) from None
    if not any(label != IGNORE_INDEX for label in encoded.get("labels") or []):
        raise DataError(str(path), "record has no assistant tokens to score", line_no)
    return encoded


def _batch_token_nll(loaded: LoadedModel, encoded: Sequence[dict[str, Any]]) -> tuple[list[float], list[int]]:
    """Summed NLL and token count of the assistant tokens of each encoded record of one batch."""
    import torch
    import torch.nn.functional as F

    engine = loaded.engine
    model = engine.model
    # The same collator and hook that turn encoded rows into the model's inputs during training.
    inputs, labels = seam.model_inputs(engine.template, model, encoded)
    logits = model(**inputs).logits
    # Token t is predicted from positions < t: compare logits[:, t - 1] with labels[:, t].
    targets = labels[:, 1:].to(logits.device)
    scored = targets != IGNORE_INDEX
    token_nll = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    sums = torch.zeros(len(encoded), dtype=torch.float64, device=logits.device)
    sums.index_add_(0, rows, token_nll.double())
    return sums.tolist(), scored.sum(dim=1).tolist()


def text_perplexity(
    model: str | Path | LoadedModel,
    adapter: str | Path | None,
    data_file: str | Path,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    *,
    model_type: str = DEFAULT_MODEL_TYPE,
    torch_dtype: str | None = None,
    adapter_scale: float | None = None,
) -> dict[str, Any]:
    """Per-token perplexity of ``model`` (+ ``adapter``, scaled by ``adapter_scale``) over the assistant
    turns of ``data_file``.

    Returns ``{"ppl", "nll", "tokens", "samples", "per_sample": [{"id", "tokens", "nll"}]}`` where
    ``nll`` is the mean negative log-likelihood per token (nats) and ``ppl = exp(nll)``.
    """
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1, got {batch_size}")
    path = Path(data_file).expanduser().resolve()
    records = list(read_jsonl_records(path))
    loaded = as_loaded_model(
        model, adapter, model_type=model_type, torch_dtype=torch_dtype, adapter_scale=adapter_scale
    )

    import torch

    engine = loaded.engine
    per_sample = []
    # Training-mode encoding: labels on the assistant tokens only.
    with seam.training_encoding(engine.template, engine.model) as template:
        encoded = [_encode(template, record, path, line_no) for line_no, record in records]
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                sums, counts = _batch_token_nll(loaded, encoded[start : start + batch_size])
                for (line_no, record), nll_sum, count in zip(
                    records[start : start + batch_size], sums, counts, strict=True
                ):
                    record_id = (record.get("meta") or {}).get("id", f"{path.stem}:{line_no}")
                    per_sample.append({"id": record_id, "tokens": int(count), "nll_sum": nll_sum})

    total_tokens = sum(s["tokens"] for s in per_sample)
    mean_nll = sum(s["nll_sum"] for s in per_sample) / total_tokens
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "samples": len(per_sample),
        "per_sample": [
            {"id": s["id"], "tokens": s["tokens"], "nll": s["nll_sum"] / s["tokens"]} for s in per_sample
        ],
    }


def evaluate_text(
    model: str | Path | LoadedModel,
    adapter: str | Path | None,
    data_file: str | Path,
    out_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    base_adapter: str | Path | None = None,
    base_text_eval: str | Path | None = None,
    base_ppl: float | None = None,
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    model_type: str = DEFAULT_MODEL_TYPE,
    torch_dtype: str | None = None,
    adapter_scale: float | None = None,
) -> dict[str, Any]:
    """Measure ``model``'s text perplexity, compare it with a base, write ``out_dir/text_eval.json``.

    The base is one of: a checkpoint to measure (``base_model`` [+ ``base_adapter``]), an earlier
    ``text_eval.json`` of the same data (``base_text_eval``), or a known perplexity (``base_ppl``).
    A base checkpoint identical to the evaluated one is not loaded a second time: same weights, same
    perplexity. ``adapter_scale`` scales ``adapter`` only, never the base's. Returns the written
    document; ``document["regressed"]`` is the gate's verdict.
    """
    given = [
        name
        for name, value in (
            ("--base", base_model),
            ("--base-text-eval", base_text_eval),
            ("base_ppl", base_ppl),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ConfigError(given[1], f"give only one base to compare with, not {' and '.join(given)}")
    if base_adapter is not None and base_model is None:
        raise ConfigError("--base-adapter", "needs --base (the checkpoint the adapter belongs to)")
    load_options = {"model_type": model_type, "torch_dtype": torch_dtype}
    # Read before loading any model, so a mismatched base file fails in a second, not after a load.
    earlier_base = base_from_text_eval(base_text_eval, data_file) if base_text_eval is not None else None
    loaded = as_loaded_model(model, adapter, **load_options, adapter_scale=adapter_scale)
    result = text_perplexity(loaded, None, data_file, batch_size)

    base: dict[str, Any] | None = None
    if base_model is not None:
        base_dir = Path(base_model).expanduser().resolve()
        base_adapter_dir = Path(base_adapter).expanduser().resolve() if base_adapter is not None else None
        same_weights = loaded.adapter_scale is None or loaded.adapter_scale == 1.0
        if same_weights and (base_dir, base_adapter_dir) == (loaded.model, loaded.adapter):
            logger.info("the base is the evaluated checkpoint itself: reusing its perplexity")
            base_result = result
        else:
            base_result = text_perplexity(base_model, base_adapter, data_file, batch_size, **load_options)
        base = {
            "model": str(base_dir),
            "adapter": str(base_adapter_dir) if base_adapter_dir else None,
            **{key: base_result[key] for key in ("ppl", "nll", "tokens")},
            "source": "measured",
        }
    elif earlier_base is not None:
        base = earlier_base
    elif base_ppl is not None:
        base = {"ppl": float(base_ppl), "source": "given"}

    document = text_eval_document(
        result,
        model=loaded.describe(),
        data_file=data_file,
        base=base,
        max_regression_pct=max_regression_pct,
    )
    write_text_eval(out_dir, document)
    return document
