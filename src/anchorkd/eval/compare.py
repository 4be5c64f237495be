"""Compare evaluated runs (base / SFT / GKD ...) in one report; never imports or runs a model.

An *evaluation folder* is what one checkpoint's evaluation leaves behind::

    generations.jsonl          captions (anchorkd eval generate, :mod:`anchorkd.eval.generate`)
    generation_settings.json   how they were produced
    scores.json                metrics of those captions (anchorkd eval score, :mod:`anchorkd.eval.score`)
    text_eval.json             optional: text perplexity (anchorkd eval text, :mod:`anchorkd.eval.text_eval`)

:func:`compare_runs` reads the scores of several folders and hands one flat metric dict per run to
:func:`anchorkd.eval.report.write_comparison_report`; :func:`anchorkd.eval.evaluate.evaluate_checkpoint`
fills one folder.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anchorkd.errors import ConfigError, DataError
from anchorkd.eval.score import SCORES_FILE, TEXT_EVAL_FILE, perplexity_change_pct
from anchorkd.io import finite_number, read_json_object

logger = logging.getLogger(__name__)

# Counts from score_captions' "overall" block that help read the rates (shown as "Other metrics").
OVERALL_COUNTS = ("captions", "mentions", "hallucinated_mentions", "ood_captions", "ood_domain_mentions")


def load_run(eval_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(scores.json, text_eval.json or None)`` of an evaluation folder."""
    folder = Path(eval_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError("--run", f"evaluation folder not found: {folder}")
    scores_path = folder / SCORES_FILE
    if not scores_path.is_file():
        raise DataError(str(scores_path), "not found; run `anchorkd eval score` for this folder first")
    scores = read_json_object(scores_path)
    if not isinstance(scores.get("summary"), dict):
        raise DataError(str(scores_path), "has no 'summary' object (not written by `anchorkd eval score`?)")
    text_path = folder / TEXT_EVAL_FILE
    return scores, (read_json_object(text_path) if text_path.is_file() else None)


def run_metrics(scores: Mapping[str, Any], text_eval: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One run's flat metric dict: caption summary, supporting counts, text perplexity.

    ``text_ppl_change_pct`` here is the change the text evaluation itself recorded (vs its own base);
    :func:`compare_runs` replaces it with the change vs the report's base run when that has a perplexity.
    """
    metrics: dict[str, Any] = dict(scores["summary"])
    overall = scores.get("overall") or {}
    metrics.update({key: overall[key] for key in OVERALL_COUNTS if key in overall})
    # The OOD rate per prompt style as well, e.g. ``ood_domain_object_rate_outdoor_dense``.
    for group, values in (scores.get("groups") or {}).items():
        if values.get("ood_captions"):
            metrics[f"ood_domain_object_rate_{group.replace('/', '_')}"] = values["ood_domain_object_rate"]
    if text_eval is not None:
        metrics["text_ppl"] = finite_number(text_eval.get("ppl"))
        metrics["text_nll"] = finite_number(text_eval.get("nll"))
        metrics["text_tokens"] = text_eval.get("tokens")
        metrics["text_ppl_change_pct"] = finite_number(text_eval.get("ppl_change_pct"))
    return metrics


def _examples_with_unique_ids(scores_by_run: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Scores whose sample ids are unique within each run, for examples_from_scores' join by id.

    One image is often asked for twice (a dense list and a general description share the record id),
    which would make the two captions overwrite each other in the side-by-side examples; such ids get
    their style appended.
    """
    unique: dict[str, dict[str, Any]] = {}
    for run_name, scores in scores_by_run.items():
        samples = scores.get("samples", [])
        repeated = {i for i, n in Counter(s["id"] for s in samples).items() if n > 1}
        unique[run_name] = {
            "samples": [
                s | {"id": f"{s['id']} ({s.get('style')})"} if s["id"] in repeated else s for s in samples
            ]
        }
    return unique


def _examples(loaded: Mapping[str, tuple[dict, dict | None]], max_examples: int) -> list[dict]:
    from anchorkd.eval.report import examples_from_scores

    return examples_from_scores(
        _examples_with_unique_ids({name: scores for name, (scores, _) in loaded.items()}), max_examples
    )


def example_captions(runs: Mapping[str, str | Path], max_examples: int = 6) -> list[dict]:
    """Side-by-side example captions of evaluation folders, as ``compare_runs`` puts in its report."""
    return _examples({name: load_run(folder) for name, folder in runs.items()}, max_examples)


def compare_runs(
    runs: Mapping[str, str | Path],
    out_dir: str | Path,
    base_name: str = "base",
    *,
    title: str = "anchorkd evaluation report",
    max_examples: int = 6,
) -> dict[str, dict[str, Any]]:
    """Write ``report.md``, ``report.json`` and charts comparing evaluation folders; return the metrics.

    ``runs`` maps a run name to its evaluation folder, in the order the report shows them.
    ``text_ppl_change_pct`` of every run is measured against ``base_name``'s ``text_ppl`` (0.0 for the
    base itself); when the base run has no text evaluation, each run keeps the change its own text
    evaluation recorded, if any.
    """
    from anchorkd.eval.report import write_comparison_report

    if not runs:
        raise ConfigError("--run", "no run to compare")
    if base_name not in runs:
        raise ConfigError("--base-name", f"{base_name!r} is not one of the runs ({', '.join(runs)})")
    loaded = {name: load_run(folder) for name, folder in runs.items()}
    metrics = {name: run_metrics(scores, text_eval) for name, (scores, text_eval) in loaded.items()}

    base_ppl = metrics[base_name].get("text_ppl")
    if base_ppl is not None and base_ppl > 0:
        for values in metrics.values():
            if values.get("text_ppl") is not None:
                values["text_ppl_change_pct"] = perplexity_change_pct(values["text_ppl"], base_ppl)

    examples = _examples(loaded, max_examples)
    metadata = {
        "base run": base_name,
        **{f"run {name}": str(Path(folder).expanduser().resolve()) for name, folder in runs.items()},
    }
    written = write_comparison_report(out_dir, metrics, examples, title=title, metadata=metadata)
    logger.info("report written: %s", ", ".join(str(path) for path in written))
    return metrics
