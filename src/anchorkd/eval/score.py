"""Scores of saved evaluation outputs; nothing here loads or runs a model.

* captions: :func:`score_generations` reads a ``generations.jsonl`` (from :mod:`anchorkd.eval.generate`)
  and computes every caption metric (:mod:`anchorkd.eval.metrics`); :func:`write_scores` stores them
  as ``scores.json``. A lexicon fix can so be re-scored over old generations in seconds.
* text fluency: the perplexity that :mod:`anchorkd.eval.text_eval` measured is judged against a base
  (:func:`perplexity_change_pct`, :func:`text_eval_document`) and stored as ``text_eval.json``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from anchorkd.errors import ConfigError, DataError, LexiconError
from anchorkd.eval.provenance import describe_file, run_provenance
from anchorkd.io import atomic_write_json, finite_number, iter_jsonl, read_json_object

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.json"
TEXT_EVAL_FILE = "text_eval.json"
GENERATION_SETTINGS_FILE = "generation_settings.json"  # written by `eval generate`
DEFAULT_MAX_REGRESSION_PCT = 5.0
CAPTION_STYLES = ("general", "dense")
"""Styles that caption metrics apply to; other records (e.g. ``text`` chat) are counted, not scored."""


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def read_generations(path: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    """Caption records of a ``generations.jsonl`` and a count of the skipped non-caption records by style.

    Every caption line is checked against the scorer's record schema here, so a bad line is reported
    as ``file:line`` rather than as "record 17" deep inside the metrics.
    """
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
    from anchorkd.eval.lexicon import DEFAULT_LEXICON_PATH, load_lexicon
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
    """Store ``scores`` as ``out_dir/scores.json``."""
    return atomic_write_json(Path(out_dir) / SCORES_FILE, scores)


# --------------------------------------------------------------------------------------------------
# Text perplexity against a base
# --------------------------------------------------------------------------------------------------


def perplexity_change_pct(ppl: float, base_ppl: float) -> float:
    """Relative perplexity change in percent; positive means the model got worse than the base."""
    if not base_ppl > 0:
        raise ValueError(f"base perplexity must be positive, got {base_ppl}")
    return 100.0 * (ppl - base_ppl) / base_ppl


def text_eval_document(
    result: dict[str, Any],
    *,
    model: dict[str, Any],
    data_file: str | Path,
    base: dict[str, Any] | None = None,
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT,
) -> dict[str, Any]:
    """The ``text_eval.json`` content: the measurement, the base it is compared with, and the verdict.

    ``base`` holds at least ``ppl`` (plus where it came from); without one there is no verdict
    (``regressed`` is None) and the gate passes.
    """
    change = perplexity_change_pct(result["ppl"], base["ppl"]) if base is not None else None
    return {
        **model,
        "data": describe_file(data_file),
        **{key: result[key] for key in ("ppl", "nll", "tokens", "samples")},
        "base": base,
        "ppl_change_pct": change,
        "max_regression_pct": max_regression_pct,
        "regressed": None if change is None else change > max_regression_pct,
        "per_sample": result.get("per_sample", []),
        **run_provenance(),
    }


def read_text_eval(path: str | Path) -> dict[str, Any]:
    """Load a ``text_eval.json`` written earlier (e.g. the base model's, to compare against)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(str(path), "text evaluation file not found")
    document = read_json_object(path)
    ppl = finite_number(document.get("ppl"))
    if ppl is None or ppl <= 0:
        raise DataError(str(path), f"'ppl' must be a positive number, got {document.get('ppl')!r}")
    return document


def base_from_text_eval(path: str | Path, data_file: str | Path) -> dict[str, Any]:
    """The base entry of a comparison taken from an earlier ``text_eval.json``.

    The earlier run must have scored the very same data file (same SHA-256): perplexities of different
    text are not comparable.
    """
    document = read_text_eval(path)
    expected = describe_file(data_file)["sha256"]
    measured_on = (document.get("data") or {}).get("sha256")
    if measured_on is not None and measured_on != expected:
        raise DataError(
            str(path), f"was measured on different data (sha256 {measured_on[:12]}…, not {expected[:12]}…)"
        )
    return {
        "model": document.get("model"),
        "adapter": document.get("adapter"),
        "ppl": document["ppl"],
        "nll": document.get("nll"),
        "tokens": document.get("tokens"),
        "source": str(Path(path).expanduser().resolve()),
    }


def write_text_eval(out_dir: str | Path, document: dict[str, Any]) -> Path:
    """Store a :func:`text_eval_document` as ``out_dir/text_eval.json``."""
    # A diverged model's NaN perplexity is still a measurement worth keeping.
    return atomic_write_json(Path(out_dir) / TEXT_EVAL_FILE, document, allow_nan=True)
