"""Score saved captions and compare evaluated runs (base / SFT / GKD ...) in one report.

An *evaluation folder* is what one checkpoint's evaluation leaves behind::

    generations.jsonl          captions (anchorkd eval generate)
    generation_settings.json   how they were produced
    scores.json                metrics of those captions (anchorkd eval score)
    text_eval.json             optional: text perplexity (anchorkd eval text)

Scoring never loads a model, so a lexicon fix can be re-scored over old generations in seconds.
:func:`compare_runs` reads several folders and hands one flat metric dict per run to
:func:`anchorkd.eval.report.write_comparison_report`; :func:`evaluate_checkpoint` fills one folder.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from anchorkd.errors import ConfigError, DataError
from anchorkd.eval.generate import DEFAULT_MODEL_TYPE
from anchorkd.eval.provenance import describe_file, run_provenance
from anchorkd.eval.text_eval import DEFAULT_MAX_REGRESSION_PCT, TEXT_EVAL_FILE, perplexity_change_pct

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.json"
CAPTION_STYLES = ("general", "dense")
"""Styles that caption metrics apply to; other records (e.g. ``text`` chat) are counted, not scored."""

# Counts from score_captions' "overall" block that help read the rates (shown as "Other metrics").
OVERALL_COUNTS = ("captions", "mentions", "hallucinated_mentions", "ood_captions", "ood_domain_mentions")


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def read_generations(path: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    """Caption records of a ``generations.jsonl`` and a count of the skipped non-caption records by style.

    Every caption line is checked against the scorer's record schema here, so a bad line is reported
    as ``file:line`` rather than as "record 17" deep inside the metrics.
    """
    from anchorkd.data.validate import iter_jsonl
    from anchorkd.eval.metrics import EvalRecord

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(str(path), "generations file not found")
    records: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for line_no, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise DataError(str(path), "a line must be a JSON object", line_no)
        style = record.get("style")
        if isinstance(style, str) and style not in CAPTION_STYLES:
            skipped[style] += 1
            continue
        try:
            EvalRecord.model_validate(record)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, item['loc'])) or 'record'}: {item['msg']}" for item in error.errors()
            )
            raise DataError(str(path), f"not a caption record ({problems})", line_no) from None
        records.append(record)
    if not records:
        raise DataError(str(path), "holds no caption records (style 'general' or 'dense') to score")
    return records, skipped


def score_generations(
    path: str | Path,
    lexicon_path: str | Path | None = None,
    *,
    domain_scene: str = "indoor",
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Every caption metric of a ``generations.jsonl`` (see :func:`anchorkd.eval.metrics.score_captions`).

    Returns score_captions' dict (summary, overall, groups, samples) plus where it came from: the
    generations file (with SHA-256), the lexicon, the skipped non-caption records and versions.
    """
    from anchorkd.eval.lexicon import DEFAULT_LEXICON_PATH, LexiconError, load_lexicon
    from anchorkd.eval.metrics import score_captions

    records, skipped = read_generations(path)
    lexicon_file = Path(lexicon_path).expanduser() if lexicon_path is not None else DEFAULT_LEXICON_PATH
    try:
        lexicon = load_lexicon(lexicon_file)
    except LexiconError as error:
        raise ConfigError("--lexicon", str(error)) from None
    if skipped:
        logger.info("not scored (no caption metric applies): %s", dict(skipped))
    scores = score_captions(records, lexicon, domain_scene=domain_scene, iou_threshold=iou_threshold)
    return {
        **scores,
        "generations": describe_file(path),
        "lexicon": describe_file(lexicon_file),
        "skipped_records": dict(skipped),
        **run_provenance(),
    }


def write_scores(out_dir: str | Path, scores: Mapping[str, Any]) -> Path:
    from anchorkd.eval.report import atomic_write_text

    path = Path(out_dir) / SCORES_FILE
    return atomic_write_text(path, json.dumps(scores, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------------
# Comparing evaluation folders
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(str(path), f"not valid JSON ({error.msg})", error.lineno) from None
    if not isinstance(document, dict):
        raise DataError(str(path), "must hold a JSON object")
    return document


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def load_run(eval_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(scores.json, text_eval.json or None)`` of an evaluation folder."""
    folder = Path(eval_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError("--run", f"evaluation folder not found: {folder}")
    scores_path = folder / SCORES_FILE
    if not scores_path.is_file():
        raise DataError(str(scores_path), "not found; run `anchorkd eval score` for this folder first")
    scores = _read_json(scores_path)
    if not isinstance(scores.get("summary"), dict):
        raise DataError(str(scores_path), "has no 'summary' object (not written by `anchorkd eval score`?)")
    text_path = folder / TEXT_EVAL_FILE
    return scores, (_read_json(text_path) if text_path.is_file() else None)


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
        metrics["text_ppl"] = _finite(text_eval.get("ppl"))
        metrics["text_nll"] = _finite(text_eval.get("nll"))
        metrics["text_tokens"] = text_eval.get("tokens")
        metrics["text_ppl_change_pct"] = _finite(text_eval.get("ppl_change_pct"))
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


# --------------------------------------------------------------------------------------------------
# One checkpoint, end to end
# --------------------------------------------------------------------------------------------------


def evaluate_checkpoint(
    model: str | Path,
    adapter: str | Path | None,
    eval_files: Sequence[str | Path],
    text_file: str | Path | None,
    out_dir: str | Path,
    base_text_ppl: float | None = None,
    *,
    lexicon_path: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    limit: int | None = None,
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT,
    model_type: str = DEFAULT_MODEL_TYPE,
    torch_dtype: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fill one evaluation folder: generate -> score -> text perplexity, loading the model once.

    ``base_text_ppl`` (e.g. the base run's ``text_ppl``) makes the text evaluation record its change
    vs base and the regression verdict. Returns the run's flat metric dict (as used in the report).
    """
    from anchorkd.eval.generate import generate_captions, load_model
    from anchorkd.eval.text_eval import evaluate_text

    loaded = load_model(model, adapter, model_type=model_type, torch_dtype=torch_dtype)
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
    return run_metrics(scores, text_eval)
