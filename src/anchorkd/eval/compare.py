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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anchorkd.errors import ConfigError, DataError
from anchorkd.eval.score import (
    GENERATION_SETTINGS_FILE,
    SCORES_FILE,
    TEXT_EVAL_FILE,
    perplexity_change_pct,
)
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


def recorded_adapter_scale(eval_dir: str | Path, text_eval: Mapping[str, Any] | None = None) -> float | None:
    """The ``--adapter-scale`` an evaluation folder was made with (its generation settings and text
    evaluation record it); None without an adapter or in folders written before the option existed.

    DataError when the two files record different scales: the folder would mix the numbers of two
    different models.
    """
    folder = Path(eval_dir).expanduser()
    settings_path = folder / GENERATION_SETTINGS_FILE
    recorded = {}
    if settings_path.is_file():
        recorded[settings_path] = finite_number(read_json_object(settings_path).get("adapter_scale"))
    if text_eval is not None:
        recorded[folder / TEXT_EVAL_FILE] = finite_number(text_eval.get("adapter_scale"))
    scales = {scale for scale in recorded.values() if scale is not None}
    if len(scales) > 1:
        described = ", ".join(f"{path.name}: {scale}" for path, scale in recorded.items())
        raise DataError(str(folder), f"the outputs were made with different adapter scales ({described})")
    return next(iter(scales), None)


def run_metrics(scores: Mapping[str, Any], text_eval: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One run's flat metric dict: caption summary, supporting counts, text perplexity.

    ``text_ppl_change_pct`` here is the change the text evaluation itself recorded (vs its own base);
    :func:`compare_runs` replaces it with the change vs the report's base run when that has a perplexity.
    """
    metrics: dict[str, Any] = dict(scores["summary"])
    overall = scores.get("overall") or {}
    metrics.update({key: overall[key] for key in OVERALL_COUNTS if key in overall})
    # The OOD rate per scene and prompt style (``ood_domain_object_rate_outdoor_dense``) and per scene,
    # both prompts pooled (``ood_domain_object_rate_outdoor``).
    groups = scores.get("groups") or {}
    for group, values in groups.items():
        if values.get("ood_captions"):
            metrics[f"ood_domain_object_rate_{group.replace('/', '_')}"] = values["ood_domain_object_rate"]
    for scene in sorted({group.split("/")[0] for group in groups}):
        rate = pooled_ood_rate(groups, [scene])
        if rate is not None:
            metrics[f"ood_domain_object_rate_{scene}"] = rate
    if text_eval is not None:
        metrics["text_ppl"] = finite_number(text_eval.get("ppl"))
        metrics["text_nll"] = finite_number(text_eval.get("nll"))
        metrics["text_tokens"] = text_eval.get("tokens")
        metrics["text_ppl_change_pct"] = finite_number(text_eval.get("ppl_change_pct"))
    return metrics


def pooled_ood_rate(groups: Mapping[str, Mapping[str, Any]], scenes: Sequence[str]) -> float | None:
    """Share of the out-of-domain captions of ``scenes`` (every prompt style) that name a domain object.

    ``groups`` is ``scores.json``'s per ``scene/style`` block. None when those scenes have no OOD caption.
    """
    if isinstance(scenes, str):
        raise TypeError("scenes must be a collection of scene names, not one string")
    wanted = frozenset(scenes)
    captions = leaked = 0
    for group, values in groups.items():
        if group.split("/")[0] in wanted and values.get("ood_captions"):
            captions += values["ood_captions"]
            leaked += values["ood_captions_with_domain_object"]
    return leaked / captions if captions else None


EXCESS_REMOVED_PREFIX = "ood_excess_removed"


def excess_removed(run: float | None, drift: float | None, base: float | None) -> float | None:
    """``(drift - run) / (drift - base)``: the share of the drifting run's excess over the base that a run
    removes (1 = back to the base, 0 = no better than the drifting run, < 0 = worse). None when a value is
    missing or the drifting run has no excess to remove."""
    if run is None or drift is None or base is None or drift <= base:
        return None
    return (drift - run) / (drift - base)


def add_scene_group_metrics(
    metrics: Mapping[str, dict[str, Any]],
    scores: Mapping[str, Mapping[str, Any]],
    scene_groups: Mapping[str, Sequence[str]],
    base_name: str,
    drift_name: str | None,
) -> None:
    """Add ``ood_domain_object_rate_<group>`` per named scene group (e.g. ``near``: the out-of-domain
    families the base learnt; ``far``: a held-out one) and, with a drifting run (vanilla SFT),
    ``ood_excess_removed_<group>`` and ``ood_excess_removed`` (all OOD captions) for every other run
    (the base and the drifting run are the reference points: 1 and 0 by definition, so left out)."""
    for name, values in metrics.items():
        groups = scores[name].get("groups") or {}
        for group, scenes in scene_groups.items():
            values[f"ood_domain_object_rate_{group}"] = pooled_ood_rate(groups, scenes)
    if drift_name is None:
        return
    for key in ("", *(f"_{group}" for group in scene_groups)):
        rate_key = f"ood_domain_object_rate{key}"
        drift, base = metrics[drift_name].get(rate_key), metrics[base_name].get(rate_key)
        for name, values in metrics.items():
            if name not in (base_name, drift_name):
                values[EXCESS_REMOVED_PREFIX + key] = excess_removed(values.get(rate_key), drift, base)


def _check_scene_groups(scene_groups: Mapping[str, Sequence[str]], scores: Mapping[str, Mapping]) -> None:
    """A group must name scenes the evaluation has, and must not be named like one (its key would overwrite
    that scene's own rate)."""
    present = {group.split("/")[0] for run in scores.values() for group in (run.get("groups") or {})}
    for name, scenes in scene_groups.items():
        if name in present:
            raise ConfigError("--scene-group", f"group name {name!r} is also a scene: choose another name")
        missing = sorted(set(scenes) - present)
        if missing:
            raise ConfigError(
                "--scene-group",
                f"group {name!r} names scenes no run was evaluated on: {', '.join(missing)} "
                f"(scenes: {', '.join(sorted(present))})",
            )


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
    scene_groups: Mapping[str, Sequence[str]] | None = None,
    drift_name: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``report.md``, ``report.json`` and charts comparing evaluation folders; return the metrics.

    ``runs`` maps a run name to its evaluation folder, in the order the report shows them.
    ``text_ppl_change_pct`` of every run is measured against ``base_name``'s ``text_ppl`` (0.0 for the
    base itself); when the base run has no text evaluation, each run keeps the change its own text
    evaluation recorded, if any. ``scene_groups`` (name -> scenes) adds the pooled OOD rate of each group;
    ``drift_name`` (the vanilla SFT run) adds each run's share of that run's excess OOD rate over the base
    that it removes (:func:`add_scene_group_metrics`), and with it the Pareto chart of domain skill
    against that share (:mod:`anchorkd.eval.pareto`).
    """
    from anchorkd.eval.report import write_comparison_report

    if not runs:
        raise ConfigError("--run", "no run to compare")
    if base_name not in runs:
        raise ConfigError("--base-name", f"{base_name!r} is not one of the runs ({', '.join(runs)})")
    if drift_name is not None and drift_name not in runs:
        raise ConfigError("--drift-run", f"{drift_name!r} is not one of the runs ({', '.join(runs)})")
    if drift_name is not None and drift_name == base_name:
        raise ConfigError(
            "--drift-run", f"{drift_name!r} is the base run: name the run that drifted (vanilla SFT)"
        )
    loaded = {name: load_run(folder) for name, folder in runs.items()}
    metrics = {name: run_metrics(scores, text_eval) for name, (scores, text_eval) in loaded.items()}
    for name, folder in runs.items():
        # A setting, not a score: listed among "Other metrics" so a scaled adapter is never mistaken.
        scale = recorded_adapter_scale(folder, loaded[name][1])
        if scale is not None:
            metrics[name]["adapter_scale"] = scale

    base_ppl = metrics[base_name].get("text_ppl")
    if base_ppl is not None and base_ppl > 0:
        for values in metrics.values():
            if values.get("text_ppl") is not None:
                values["text_ppl_change_pct"] = perplexity_change_pct(values["text_ppl"], base_ppl)
    if scene_groups or drift_name is not None:
        scores = {name: loaded_scores for name, (loaded_scores, _) in loaded.items()}
        _check_scene_groups(scene_groups or {}, scores)
        add_scene_group_metrics(metrics, scores, scene_groups or {}, base_name, drift_name)

    examples = _examples(loaded, max_examples)
    metadata = {
        "base run": base_name,
        **{f"run {name}": str(Path(folder).expanduser().resolve()) for name, folder in runs.items()},
    }
    written = write_comparison_report(
        out_dir,
        metrics,
        examples,
        title=title,
        metadata=metadata,
        base_run=base_name,
        drift_run=drift_name,
    )
    logger.info("report written: %s", ", ".join(str(path) for path in written))
    return metrics
