"""Comparison report across runs: did hallucination drop, did quality and fluency hold?

``write_comparison_report`` turns one flat metric dict per run (``base``, ``sft``, ``gkd``, ...) into

* ``report.json`` -- the runs dict as given (non-finite numbers become null, to stay valid JSON), with
  the title and caller metadata, for machines;
* ``report.md``   -- one table per metric group with the best run marked, and side-by-side example
  captions with hallucinated objects struck through, for people;
* ``hallucination.png``, ``quality.png``, ``text_ppl_change.png`` -- bar charts (error bars where the
  runs carry ``<metric>_std``, e.g. the spread across seeds), each only when some run has its metrics;
* ``pareto.png`` -- domain skill (field F1, name F1) against the share of the drifting run's excess
  OOD rate removed, per scene group, with the runs no other run beats on both axes ringed and listed
  in a markdown table (:mod:`anchorkd.eval.pareto`); only when some run has both.

Figures are drawn with matplotlib's object API on the Agg canvas (never pyplot), so reports can be made
on headless machines and from threads without touching global backend state. Every file is written to a
temporary file first and moved into place, so a crash never leaves a half-written report behind.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from anchorkd.eval.compare import EXCESS_REMOVED_PREFIX
from anchorkd.eval.pareto import ParetoSeries, pareto_series
from anchorkd.io import atomic_write_json, atomic_write_text, finite_number, save_figure

STD_SUFFIX = "_std"
RUN_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


# --------------------------------------------------------------------------------------------------
# Which metrics exist and how to read them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """How to show one metric: label, which direction is better, and its scale."""

    key: str
    label: str
    better: Literal["lower", "higher"]
    scale: Literal["fraction", "percent", "number"]  # fraction: stored 0-1, shown as %


@dataclass(frozen=True)
class MetricGroup:
    """Metrics shown together: one markdown table, and (for the first two groups) one chart."""

    title: str
    metrics: tuple[MetricSpec, ...]


HALLUCINATION = MetricGroup(
    "Object hallucination (lower is better)",
    (
        MetricSpec("ood_domain_object_rate", "OOD domain-object rate", "lower", "fraction"),
        # Per scene group (`eval compare --scene-group`; the testbed: near = families the base learnt,
        # far = the family held out of every training set).
        MetricSpec("ood_domain_object_rate_near", "OOD rate: near-OOD families", "lower", "fraction"),
        MetricSpec("ood_domain_object_rate_far", "OOD rate: held-out family", "lower", "fraction"),
        # Per prompt style, when the eval has outdoor images under both prompts.
        MetricSpec(
            "ood_domain_object_rate_outdoor_dense", "OOD rate: outdoor, dense prompt", "lower", "fraction"
        ),
        MetricSpec(
            "ood_domain_object_rate_outdoor_general",
            "OOD rate: outdoor, general prompt",
            "lower",
            "fraction",
        ),
        MetricSpec("chair_i", "CHAIR-i", "lower", "fraction"),
        MetricSpec("chair_s", "CHAIR-s", "lower", "fraction"),
    ),
)
QUALITY = MetricGroup(
    "Caption quality (higher is better)",
    (
        MetricSpec("indomain_f1", "In-domain field F1", "higher", "fraction"),
        MetricSpec("indomain_name_f1", "In-domain name F1", "higher", "fraction"),
        MetricSpec("object_recall", "Object recall", "higher", "fraction"),
        MetricSpec("rouge_l", "ROUGE-L F", "higher", "fraction"),
        MetricSpec("bleu", "BLEU", "higher", "number"),
    ),
)
# `eval compare --drift-run`: (drift - run) / (drift - base) of the OOD rate, per scene group.
EXCESS_REMOVED = MetricGroup(
    "Share of the drifting run's excess OOD rate over the base removed (higher is better)",
    (
        MetricSpec("ood_excess_removed", "Excess removed: all OOD captions", "higher", "fraction"),
        MetricSpec("ood_excess_removed_near", "Excess removed: near-OOD families", "higher", "fraction"),
        MetricSpec("ood_excess_removed_far", "Excess removed: held-out family", "higher", "fraction"),
    ),
)
FLUENCY = MetricGroup(
    "Text fluency (lower perplexity is better)",
    (
        MetricSpec("text_ppl", "Text perplexity", "lower", "number"),
        MetricSpec("text_ppl_change_pct", "Perplexity change vs base", "lower", "percent"),
    ),
)
METRIC_GROUPS = (HALLUCINATION, QUALITY, EXCESS_REMOVED, FLUENCY)
METRIC_SPECS = {spec.key: spec for group in METRIC_GROUPS for spec in group.metrics}


def _metric_value(metrics: Mapping[str, Any], key: str) -> tuple[float | None, float | None]:
    return finite_number(metrics.get(key)), finite_number(metrics.get(key + STD_SUFFIX))


def _format_value(spec: MetricSpec, value: float | None, std: float | None = None) -> str:
    if value is None:
        return "n/a"
    if spec.scale == "fraction":
        text = f"{100 * value:.1f}%"
        spread = f" ± {100 * std:.1f}" if std is not None else ""
    elif spec.scale == "percent":
        text = f"{value:+.1f}%"
        spread = f" ± {std:.1f}" if std is not None else ""
    else:
        text = f"{value:.2f}"
        spread = f" ± {std:.2f}" if std is not None else ""
    return text + spread


def best_runs(runs: Mapping[str, Mapping[str, Any]], spec: MetricSpec) -> list[str]:
    """Runs with the best value of ``spec`` (several on a tie; none when no run has the metric)."""
    values = {name: _metric_value(metrics, spec.key)[0] for name, metrics in runs.items()}
    present = {name: value for name, value in values.items() if value is not None}
    if not present:
        return []
    best = min(present.values()) if spec.better == "lower" else max(present.values())
    return [name for name, value in present.items() if value == best]


def _present_specs(runs: Mapping[str, Mapping[str, Any]], specs: Sequence[MetricSpec]) -> list[MetricSpec]:
    """The metrics of ``specs`` that at least one run has a value for."""
    return [
        spec
        for spec in specs
        if any(_metric_value(metrics, spec.key)[0] is not None for metrics in runs.values())
    ]


def _other_metric_keys(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for metrics in runs.values():
        for key, value in metrics.items():
            if key.endswith(STD_SUFFIX) or key in METRIC_SPECS or finite_number(value) is None:
                continue
            keys[key] = None
    return list(keys)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    """Make text safe inside a markdown table cell (pipes, HTML, line breaks)."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return escaped.replace("\r\n", "\n").replace("\n", "<br>")


def _metric_table(runs: Mapping[str, Mapping[str, Any]], specs: Sequence[MetricSpec]) -> list[str]:
    run_names = list(runs)
    lines = [
        "| metric | " + " | ".join(map(_md_cell, run_names)) + " | best |",
        "|---|" + "---:|" * len(run_names) + "---|",
    ]
    for spec in specs:
        winners = best_runs(runs, spec)
        cells = []
        for name in run_names:
            text = _format_value(spec, *_metric_value(runs[name], spec.key))
            cells.append(f"**{text}**" if name in winners else text)
        arrow = "↓" if spec.better == "lower" else "↑"
        lines.append(f"| {spec.label} {arrow} | " + " | ".join(cells) + f" | {', '.join(winners) or '–'} |")
    return lines


def _other_metrics_table(runs: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    run_names = list(runs)
    lines = ["| metric | " + " | ".join(map(_md_cell, run_names)) + " |", "|---|" + "---:|" * len(run_names)]
    for key in keys:
        cells = []
        for name in run_names:
            value, std = _metric_value(runs[name], key)
            cells.append(
                "n/a" if value is None else f"{value:.4g}" + (f" ± {std:.2g}" if std is not None else "")
            )
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return lines


def mark_spans(text: str, spans: Sequence[Sequence[int]]) -> str:
    """Markdown-cell text with each ``text[start:end]`` span struck through in bold."""
    pieces = []
    cursor = 0
    for start, end in sorted((int(s), int(e)) for s, e in spans):
        if start < cursor or end > len(text) or start >= end:
            continue  # overlapping or out-of-range spans would garble the caption
        pieces.append(_md_cell(text[cursor:start]))
        pieces.append(f"~~**{_md_cell(text[start:end])}**~~")
        cursor = end
    pieces.append(_md_cell(text[cursor:]))
    return "".join(pieces)


def _example_caption(entry: Any) -> tuple[str, list[str], list[Sequence[int]]]:
    """Normalise an example's per-run entry: a caption string or ``{caption, hallucinated, spans}``."""
    if isinstance(entry, str):
        return entry, [], []
    if isinstance(entry, Mapping):
        return (
            str(entry.get("caption", "")),
            list(entry.get("hallucinated", [])),
            list(entry.get("hallucinated_spans", [])),
        )
    raise TypeError(f"example caption must be a string or a mapping, not {type(entry).__name__}")


def _example_section(number: int, example: Mapping[str, Any]) -> list[str]:
    context = ", ".join(str(example[key]) for key in ("scene", "style") if example.get(key))
    heading = f"### Example {number}: `{example.get('id', number)}`" + (f" ({context})" if context else "")
    lines = [heading, ""]
    if example.get("ground_truth"):
        lines += [f"Ground-truth objects: {', '.join(map(str, example['ground_truth']))}", ""]
    lines += ["| source | caption | hallucinated |", "|---|---|---|"]
    if example.get("reference"):
        lines.append(f"| reference | {_md_cell(str(example['reference']))} | |")
    for run_name, entry in example.get("captions", {}).items():
        caption, hallucinated, spans = _example_caption(entry)
        lines.append(f"| {run_name} | {mark_spans(caption, spans)} | {', '.join(hallucinated) or '–'} |")
    return [*lines, ""]


def _metadata_cell(value: Any, max_chars: int = 300) -> str:
    """A metadata value for the markdown header; long structures (per-seed tables) stay in report.json."""
    text = str(value)
    return _md_cell(text) if len(text) <= max_chars else "(long; see `report.json`)"


def _excess_label(excess_key: str) -> str:
    """What an ``ood_excess_removed[_GROUP]`` key is measured on: "held-out family", or the group's name."""
    spec = METRIC_SPECS.get(excess_key)
    if spec is not None:
        return spec.label.removeprefix("Excess removed: ")
    return excess_key.removeprefix(EXCESS_REMOVED_PREFIX + "_")


def _pareto_section(series: Sequence[ParetoSeries], drift_run: str | None) -> list[str]:
    drifting = f"`{_md_cell(drift_run)}`" if drift_run else "the drifting run"
    lines = [
        "## Domain skill against hallucination removed (Pareto frontier)",
        "",
        f"Each run's domain skill (x) against the share of {drifting}'s excess OOD rate over the base that "
        "it removes (y: 100% = the base's rate, 0% = no better than the drifting run). A run is on the "
        "frontier when no other run is at least as good on both axes and better on one; the reference "
        "runs sit at 100% (base) and 0% by definition. `± x` is the spread across seeds. Frontier runs "
        "(ringed in the chart), best skill first:",
        "",
        "| domain skill (x) | excess removed on (y) | frontier: run (x, y) |",
        "|---|---|---|",
    ]
    generic = MetricSpec("", "", "higher", "fraction")
    for entry in series:
        skill_spec = METRIC_SPECS[entry.skill_key]
        excess_spec = METRIC_SPECS.get(entry.excess_key, generic)
        cells = [
            f"`{_md_cell(point.run)}`{' (reference)' if point.reference else ''} "
            f"({_format_value(skill_spec, point.x, point.x_std)}, "
            f"{_format_value(excess_spec, point.y, point.y_std)})"
            for point in entry.frontier
        ]
        lines.append(
            f"| {skill_spec.label} | {_md_cell(_excess_label(entry.excess_key))} | {', '.join(cells)} |"
        )
    return lines


def _render_markdown(
    title: str,
    runs: Mapping[str, Mapping[str, Any]],
    metadata: Mapping[str, Any],
    examples: Sequence[Mapping[str, Any]] | None,
    charts: Mapping[str, Path],
    pareto: Sequence[ParetoSeries] = (),
    drift_run: str | None = None,
) -> str:
    lines = [f"# {title}", ""]
    if metadata:
        lines += [f"- **{key}**: {_metadata_cell(value)}" for key, value in metadata.items()] + [""]
    lines += [
        f"Runs: {', '.join(f'`{name}`' for name in runs)}. Best value per metric in **bold**; "
        "`± x` is the spread across seeds where given. Rates are % of captions (CHAIR-s, OOD rate) "
        "or of object mentions (CHAIR-i).",
        "",
    ]
    for group in METRIC_GROUPS:
        specs = _present_specs(runs, group.metrics)
        if specs:
            lines += [f"## {group.title}", "", *_metric_table(runs, specs), ""]
    if pareto:
        lines += [*_pareto_section(pareto, drift_run), ""]
    other_keys = _other_metric_keys(runs)
    if other_keys:
        lines += ["## Other metrics", "", *_other_metrics_table(runs, other_keys), ""]
    if charts:
        lines += ["## Charts", ""]
        lines += [f"![{label}]({path.name})" for label, path in charts.items()] + [""]
    if examples:
        lines += [
            "## Example captions",
            "",
            "Hallucinated objects (named but not in the image) are ~~**struck through**~~.",
            "",
        ]
        for number, example in enumerate(examples, start=1):
            lines += _example_section(number, example)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------------


def _display(spec: MetricSpec, value: float | None) -> float | None:
    """Value on the chart's axis: fractions are drawn as percentages."""
    if value is None:
        return None
    return 100 * value if spec.scale == "fraction" else value


def _draw_bar(
    ax: Axes, x: float, width: float, spec: MetricSpec, value: float | None, std: float | None, color: str
) -> tuple[float, float]:
    """One bar with optional error bar and its value written above (or below, if negative).

    Returns the vertical extent (bottom, top) it occupies, error bar included, for axis padding.
    """
    if value is None:
        ax.annotate(
            "n/a",
            (x, 0),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color="#666666",
        )
        return 0.0, 0.0
    height, error = _display(spec, value), _display(spec, std)
    ax.bar(x, height, width, color=color, yerr=error, capsize=4 if error else 0, ecolor="#333333")
    reach = height + (error or 0) if height >= 0 else height - (error or 0)
    ax.annotate(
        _format_value(spec, value),
        (x, reach),
        xytext=(0, 3 if height >= 0 else -3),
        textcoords="offset points",
        ha="center",
        va="bottom" if height >= 0 else "top",
        fontsize=8,
    )
    return height - (error or 0), height + (error or 0)


def _finish_bar_axes(
    ax: Axes,
    title: str,
    xlabel: str,
    ylabel: str,
    categories: Sequence[str],
    extents: list[tuple[float, float]],
) -> None:
    """Shared look of the bar charts; leaves room above/below the bars for their value labels."""
    # Wrapped, so that long metric names do not run into each other.
    ax.set_xticks(range(len(categories)), [textwrap.fill(c, 18) for c in categories])
    ax.set_xlim(-0.6, len(categories) - 0.4)
    top = max([0.0, *(high for _, high in extents)])
    bottom = min([0.0, *(low for low, _ in extents)])
    span = (top - bottom) or 1.0
    ax.set_ylim(bottom - (0.15 * span if bottom < 0 else 0), top + 0.15 * span)
    ax.axhline(0, color="#333333", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _grouped_bar_chart(
    runs: Mapping[str, Mapping[str, Any]], specs: Sequence[MetricSpec], title: str, ylabel: str
) -> Figure:
    """Metrics along x, one coloured bar per run within each metric."""
    run_names = list(runs)
    width = 0.8 / len(run_names)
    figure = Figure(figsize=(max(6.0, 1.0 + len(specs) * (0.5 + 0.55 * len(run_names))), 4.6))
    ax = figure.subplots()
    extents = []
    legend_handles = []
    for run_index, name in enumerate(run_names):
        color = RUN_COLORS[run_index % len(RUN_COLORS)]
        legend_handles.append(Patch(color=color, label=name))  # explicit: a run may lack some bars
        for metric_index, spec in enumerate(specs):
            x = metric_index - 0.4 + width * (run_index + 0.5)
            extents.append(_draw_bar(ax, x, width, spec, *_metric_value(runs[name], spec.key), color))
    _finish_bar_axes(ax, title, "metric", ylabel, [spec.label for spec in specs], extents)
    ax.legend(handles=legend_handles, title="run", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return figure


def _per_run_bar_chart(
    runs: Mapping[str, Mapping[str, Any]], spec: MetricSpec, title: str, ylabel: str
) -> Figure:
    """One bar per run for a single metric, with a zero line (for signed changes)."""
    run_names = list(runs)
    figure = Figure(figsize=(max(5.0, 1.5 + 1.1 * len(run_names)), 4.2))
    ax = figure.subplots()
    extents = [
        _draw_bar(
            ax, index, 0.6, spec, *_metric_value(runs[name], spec.key), RUN_COLORS[index % len(RUN_COLORS)]
        )
        for index, name in enumerate(run_names)
    ]
    _finish_bar_axes(ax, title, "run", ylabel, run_names, extents)
    return figure


PARETO_MARKERS = ("o", "^", "s", "D", "v", "P", "X")
PARETO_POINTS_GID = "pareto-points"  # matplotlib group ids: the tests count the points they hold
PARETO_FRONTIER_GID = "pareto-frontier"


def _run_colors(run_names: Sequence[str]) -> dict[str, Any]:
    """The bar charts' colour per run; a 20-colour map when there are more runs than those colours."""
    if len(run_names) <= len(RUN_COLORS):
        return dict(zip(run_names, RUN_COLORS, strict=False))
    palette = colormaps["tab20"]
    return {name: palette(index % palette.N) for index, name in enumerate(run_names)}


def pareto_figure(
    series: Sequence[ParetoSeries], run_names: Sequence[str], drift_run: str | None = None
) -> Figure:
    """One panel per skill metric: a point per run and scene group (colour = run, marker = group),
    seed spreads as error bars, the frontier of each group ringed, joined and labelled."""
    skills = list(dict.fromkeys(entry.skill_key for entry in series))
    excess_keys = list(dict.fromkeys(entry.excess_key for entry in series))
    markers = {key: PARETO_MARKERS[index % len(PARETO_MARKERS)] for index, key in enumerate(excess_keys)}
    colors = _run_colors(run_names)
    figure = Figure(figsize=(2.8 + 5.0 * len(skills), 4.8))
    axes = figure.subplots(1, len(skills), sharey=True, squeeze=False)[0]
    for ax, skill in zip(axes, skills, strict=True):
        labelled: set[tuple[str, float, float]] = set()  # the reference runs sit at one spot per group
        for entry in (entry for entry in series if entry.skill_key == skill):
            marker = markers[entry.excess_key]
            for point in entry.points:
                if point.x_std or point.y_std:
                    ax.errorbar(
                        100 * point.x,
                        100 * point.y,
                        xerr=100 * point.x_std if point.x_std else None,
                        yerr=100 * point.y_std if point.y_std else None,
                        fmt="none",
                        ecolor=colors[point.run],
                        elinewidth=1,
                        capsize=3,
                        alpha=0.7,
                        zorder=1,
                    )
            ax.scatter(
                [100 * point.x for point in entry.points],
                [100 * point.y for point in entry.points],
                c=[colors[point.run] for point in entry.points],
                marker=marker,
                s=46,
                edgecolors="white",
                linewidths=0.6,
                zorder=3,
                gid=PARETO_POINTS_GID,
            )
            frontier = sorted(entry.frontier, key=lambda point: (point.x, -point.y))
            ax.plot(
                [100 * point.x for point in frontier],
                [100 * point.y for point in frontier],
                linestyle=":",
                color="#333333",
                linewidth=1,
                zorder=2,
            )
            ax.scatter(
                [100 * point.x for point in frontier],
                [100 * point.y for point in frontier],
                marker=marker,
                s=140,
                facecolors="none",
                edgecolors="#111111",
                linewidths=1.3,
                zorder=4,
                gid=PARETO_FRONTIER_GID,
            )
            for point in frontier:
                if (point.run, point.x, point.y) in labelled:
                    continue
                labelled.add((point.run, point.x, point.y))
                ax.annotate(
                    point.run,
                    (100 * point.x, 100 * point.y),
                    xytext=(6, 4),
                    textcoords="offset points",
                    fontsize=7,
                )
        for level in (0, 100):  # the drifting run's level and the base's
            ax.axhline(level, color="#999999", linewidth=0.8, linestyle="--", zorder=0)
        ax.set_xlabel(f"{METRIC_SPECS[skill].label}, % (higher is better)")
        ax.set_title(f"{METRIC_SPECS[skill].label} vs excess removed", fontsize=11, fontweight="bold")
        ax.grid(alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    drifting = drift_run or "the drifting run"
    axes[0].set_ylabel(f"share of {drifting}'s excess OOD rate removed, %\n(higher is better)")
    plotted = dict.fromkeys(point.run for entry in series for point in entry.points)
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[name], label=name) for name in plotted]
    handles += [
        Line2D([], [], marker=markers[key], linestyle="", color="#555555", label=_excess_label(key))
        for key in excess_keys
    ]
    handles.append(
        Line2D(
            [],
            [],
            marker="o",
            linestyle=":",
            color="#111111",
            markerfacecolor="none",
            markersize=10,
            label="Pareto frontier",
        )
    )
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    return figure


def _write_charts(
    out_dir: Path,
    runs: Mapping[str, Mapping[str, Any]],
    pareto: Sequence[ParetoSeries] = (),
    drift_run: str | None = None,
) -> dict[str, Path]:
    charts: dict[str, Path] = {}
    hallucination_specs = _present_specs(runs, HALLUCINATION.metrics)
    if hallucination_specs:
        figure = _grouped_bar_chart(
            runs,
            hallucination_specs,
            "Object hallucination by run",
            "% of captions / mentions (lower is better)",
        )
        charts["Object hallucination"] = save_figure(figure, out_dir / "hallucination.png")
    quality_specs = [spec for spec in _present_specs(runs, QUALITY.metrics) if spec.scale == "fraction"]
    if quality_specs:
        figure = _grouped_bar_chart(
            runs, quality_specs, "Caption quality by run", "score, % (higher is better)"
        )
        charts["Caption quality"] = save_figure(figure, out_dir / "quality.png")
    ppl_change = METRIC_SPECS["text_ppl_change_pct"]
    if _present_specs(runs, [ppl_change]):
        figure = _per_run_bar_chart(
            runs, ppl_change, "Text perplexity change vs base model", "perplexity change, % (lower is better)"
        )
        charts["Text perplexity change"] = save_figure(figure, out_dir / "text_ppl_change.png")
    if pareto:
        figure = pareto_figure(pareto, list(runs), drift_run)
        charts["Domain skill vs excess removed"] = save_figure(figure, out_dir / "pareto.png")
    return charts


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (not representable in JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def write_comparison_report(
    out_dir: str | Path,
    runs: Mapping[str, Mapping[str, Any]],
    examples: Sequence[Mapping[str, Any]] | None = None,
    title: str = "anchorkd evaluation report",
    metadata: Mapping[str, Any] | None = None,
    *,
    base_run: str | None = None,
    drift_run: str | None = None,
    seed_metrics: Mapping[Any, Mapping[str, Mapping[str, Any]]] | None = None,
) -> list[Path]:
    """Write report.json, report.md and chart PNGs comparing ``runs``; return the paths written.

    ``runs`` maps a run name to a flat metric dict (``chair_i``, ``ood_domain_object_rate``,
    ``indomain_f1``, ``text_ppl_change_pct``, ... and optional ``<metric>_std``); see METRIC_GROUPS for
    the metrics with a known meaning, other numeric keys are listed in an "Other metrics" table.
    ``examples`` (see :func:`examples_from_scores`) are ``{id, scene, style, reference, ground_truth,
    captions: {run: caption | {caption, hallucinated, hallucinated_spans}}}``.

    When runs carry ``ood_excess_removed[_GROUP]`` and in-domain F1, the report adds the Pareto chart
    and its frontier table (:mod:`anchorkd.eval.pareto`), also stored under ``"pareto"`` in
    report.json: ``base_run`` and ``drift_run`` join it as reference points (y = 1 and 0), and
    ``seed_metrics`` (``{seed: {run: metrics}}``) gives the seed spread of metrics the runs carry no
    ``<metric>_std`` for.
    """
    if not runs:
        raise ValueError("write_comparison_report needs at least one run")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata or {})
    pareto = pareto_series(runs, base_run=base_run, drift_run=drift_run, per_seed=seed_metrics)
    document: dict[str, Any] = {"title": title, "metadata": metadata, "runs": runs}
    if pareto:
        document["pareto"] = [entry.as_dict() for entry in pareto]
    written = [atomic_write_json(out_dir / "report.json", _json_safe(document))]
    charts = _write_charts(out_dir, runs, pareto, drift_run)
    markdown = _render_markdown(title, runs, metadata, examples, charts, pareto, drift_run)
    written.append(atomic_write_text(out_dir / "report.md", markdown))
    written.extend(charts.values())
    return written


def examples_from_scores(scores_by_run: Mapping[str, Mapping[str, Any]], max_examples: int = 6) -> list[dict]:
    """Pick example samples for the report from each run's ``score_captions`` output.

    Samples are joined by id; those where the runs disagree most about hallucinations come first
    (they show what changed), taken round-robin over (scene, style) so every kind of caption appears.
    """
    by_id: dict[Any, dict] = {}
    for run_name, scores in scores_by_run.items():
        for sample in scores.get("samples", []):
            example = by_id.setdefault(
                sample["id"],
                {key: sample.get(key) for key in ("id", "scene", "style", "reference", "ground_truth")}
                | {"captions": {}},
            )
            example["captions"][run_name] = {
                key: sample.get(key, []) for key in ("caption", "hallucinated", "hallucinated_spans")
            }

    def informativeness(example: dict) -> tuple[int, int]:
        counts = [len(entry["hallucinated"]) for entry in example["captions"].values()]
        return (max(counts) - min(counts), sum(counts))

    queues: dict[tuple, list[dict]] = {}
    for example in sorted(by_id.values(), key=informativeness, reverse=True):
        queues.setdefault((example["scene"], example["style"]), []).append(example)
    chosen: list[dict] = []
    while len(chosen) < max_examples and any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) < max_examples:
                chosen.append(queue.pop(0))
    return chosen
