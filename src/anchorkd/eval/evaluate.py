"""One checkpoint evaluated end to end: load -> generate captions -> score -> text perplexity.

This is the only module that chains the steps; each step is its own module (:mod:`~anchorkd.eval.model`,
:mod:`~anchorkd.eval.generate`, :mod:`~anchorkd.eval.score`, :mod:`~anchorkd.eval.text_eval`) and
:mod:`~anchorkd.eval.compare` turns several filled folders into a report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anchorkd.eval.compare import run_metrics
from anchorkd.eval.generate import generate_captions
from anchorkd.eval.model import (
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL_TYPE,
    load_model,
)
from anchorkd.eval.score import DEFAULT_MAX_REGRESSION_PCT, score_generations, write_scores
from anchorkd.eval.text_eval import evaluate_text


def evaluate_checkpoint(
    model: str | Path,
    adapter: str | Path | None,
    eval_files: Sequence[str | Path],
    text_file: str | Path | None,
    out_dir: str | Path,
    base_text_ppl: float | None = None,
    *,
    lexicon_path: str | Path | None = None,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limit: int | None = None,
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT,
    model_type: str = DEFAULT_MODEL_TYPE,
    torch_dtype: str | None = None,
    show_progress: bool = True,
    adapter_scale: float | None = None,
) -> dict[str, Any]:
    """Fill one evaluation folder: generate -> score -> text perplexity, loading the model once.

    ``base_text_ppl`` (e.g. the base run's ``text_ppl``) makes the text evaluation record its change
    vs base and the regression verdict. ``adapter_scale`` multiplies the LoRA adapter's contribution
    (WiSE-FT-style interpolation, :func:`~anchorkd.eval.model.scale_lora_adapter`). Returns the run's
    flat metric dict (as used in the report).
    """
    loaded = load_model(
        model, adapter, model_type=model_type, torch_dtype=torch_dtype, adapter_scale=adapter_scale
    )
    out_dir = Path(out_dir)
    generations = generate_captions(
        loaded,
        None,
        eval_files,
        out_dir,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
        show_progress=show_progress,
    )
    scores = score_generations(generations, lexicon_path)
    write_scores(out_dir, scores)
    text_eval = None
    if text_file is not None:
        text_eval = evaluate_text(
            loaded,
            None,
            text_file,
            out_dir,
            base_ppl=base_text_ppl,
            max_regression_pct=max_regression_pct,
            batch_size=batch_size,
        )
    metrics = run_metrics(scores, text_eval)
    if loaded.adapter_scale is not None:
        metrics["adapter_scale"] = loaded.adapter_scale  # as compare_runs reads it back from the folder
    return metrics
