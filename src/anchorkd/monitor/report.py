"""Telemetry report of a finished (or running) training run, from ms-swift's ``logging.jsonl``.

The report answers "did the loss terms behave?" after the fact: it plots every loss term and token
accuracy against the step (train and eval series in one subplot per term), replays the same
:class:`~anchorkd.monitor.alerts.AlertMonitor` rules the live trainer callback uses, and writes
``telemetry.png`` and ``telemetry_report.md`` listing the alerts.

``logging.jsonl`` holds one JSON object per logged step. Keys understood:

* training terms: ``loss``, ``sft_loss``, ``llm_kd_loss``, ``vision_kd_loss``, ``token_acc`` /
  ``token_accuracy`` (the same term; ms-swift writes ``token_acc``), ``grad_norm``, ``learning_rate``,
  ``token_count``, ... -- any numeric value is kept; a ``train/`` prefix is dropped;
* evaluation terms: ``eval_loss`` (HF style) or ``eval/loss`` -- the prefix marks the eval series;
* the step: ``global_step/max_steps`` (a string such as ``"3/10"``), else ``global_step`` or ``step``;
  a record with none of them gets the previous training step + 1 (an eval record: the previous step);
* ``epoch``, ``percentage``, timings and other strings are bookkeeping, not series;
* the end-of-training record (with ``train_runtime``) is a run summary, not a step, because its
  ``train_loss`` is the run average and would plot as a bogus last point;
* ms-swift's end-of-run message (with ``last_model_checkpoint`` and a copy of ``log_history``) is skipped:
  its numbers repeat the steps' records.

A line that is not a JSON object raises :class:`~anchorkd.errors.TelemetryFormatError` naming
``file:line``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure

from anchorkd.errors import TelemetryFormatError
from anchorkd.io import atomic_write_text, finite_number, iter_jsonl, real_number, save_figure
from anchorkd.monitor.alerts import Alert, AlertConfig, normalize_metric_name, replay_alerts

LOGGING_FILE = "logging.jsonl"
EVAL_PREFIXES = ("eval_", "eval/")
STEP_KEY = "global_step/max_steps"
BOOKKEEPING_KEYS = frozenset({STEP_KEY, "global_step", "step", "epoch"})
SUMMARY_MARKER = "train_runtime"
RUN_MESSAGE_MARKER = "last_model_checkpoint"
# Records that end a training call rather than log a step.
RUN_END_MARKERS = (SUMMARY_MARKER, RUN_MESSAGE_MARKER)
METRIC_ALIASES = {"token_acc": "token_accuracy"}
# Plot order: the terms that make up the KL-anchored objective first, then any other loss, then accuracy.
PREFERRED_TERM_ORDER = ("loss", "sft_loss", "llm_kd_loss", "anchor_kd_loss", "vision_kd_loss")
ACCURACY_TERM = "token_accuracy"
ALERT_COLORS = {
    "llm_kd_loss_spike": "#C44E52",
    "anchor_kd_loss_spike": "#DD8452",
    "sft_loss_regression": "#8172B3",
    "nonfinite": "#000000",
}

Split = Literal["train", "eval", "summary"]


@dataclass(frozen=True)
class TelemetryRecord:
    """The numeric values one log line holds for one split, at one step."""

    step: int
    split: Split
    metrics: dict[str, float]
    line: int
    max_steps: int | None = None


def parse_step(raw: Mapping[str, Any], path: Path, line: int) -> tuple[int | None, int | None]:
    """(step, max_steps) from a raw ``logging.jsonl`` record, or (None, None) when it carries no step;
    :class:`TelemetryFormatError` (``path:line``) for a step that cannot be read."""
    if STEP_KEY in raw:
        text = str(raw[STEP_KEY])
        current, _, total = text.partition("/")
        try:
            return int(current), int(total) if total else None
        except ValueError:
            raise TelemetryFormatError(str(path), f"cannot read {STEP_KEY}={text!r}", line) from None
    for key in ("global_step", "step"):
        value = finite_number(raw.get(key))
        if value is not None:
            return int(value), None
    return None, None


def _metric_name(key: str) -> tuple[Literal["train", "eval"], str]:
    for prefix in EVAL_PREFIXES:
        if key.startswith(prefix):
            name = key[len(prefix) :]
            return "eval", METRIC_ALIASES.get(name, name)
    name = normalize_metric_name(key)
    return "train", METRIC_ALIASES.get(name, name)


def _split_record(raw: Mapping[str, Any]) -> dict[Split, dict[str, float]]:
    """Numeric values of a raw record by split (a line may hold train and eval values)."""
    if SUMMARY_MARKER in raw:
        return {
            "summary": {k: float(v) for k, v in raw.items() if _is_number(v) and k not in BOOKKEEPING_KEYS}
        }
    by_split: dict[Split, dict[str, float]] = {}
    for key, value in raw.items():
        if key in BOOKKEEPING_KEYS or not _is_number(value):
            continue
        split, name = _metric_name(key)
        by_split.setdefault(split, {})[name] = float(value)
    return by_split


def _is_number(value: Any) -> bool:
    return real_number(value) is not None


def read_logging_jsonl(path: str | Path) -> list[TelemetryRecord]:
    """Parse an ms-swift ``logging.jsonl`` into per-split records, in file order.

    Blank lines are skipped; NaN/Infinity literals (which Python's json writes) are kept as floats so
    that the non-finite alert can report them.
    """
    path = Path(path)
    records: list[TelemetryRecord] = []
    last_step = 0
    for line_number, raw in iter_jsonl(path, error=TelemetryFormatError):
        if not isinstance(raw, dict):
            raise TelemetryFormatError(
                str(path), f"expected a JSON object, got {type(raw).__name__}", line_number
            )
        if RUN_MESSAGE_MARKER in raw:
            continue
        step, max_steps = parse_step(raw, path, line_number)
        for split, metrics in _split_record(raw).items():
            implied_step = last_step + 1 if split == "train" else last_step
            record_step = step if step is not None else implied_step
            records.append(TelemetryRecord(record_step, split, metrics, line_number, max_steps))
            if split != "summary":
                last_step = record_step
    return records


def find_logging_jsonl(run_dir: str | Path) -> Path:
    """``run_dir/logging.jsonl``, or the newest one below it (ms-swift nests runs in ``v0-<date>/``)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    direct = run_dir / LOGGING_FILE
    if direct.is_file():
        return direct
    candidates = sorted(run_dir.rglob(LOGGING_FILE), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no {LOGGING_FILE} in {run_dir}")
    return candidates[-1]


def other_logging_jsonl(run_dir: str | Path, shown: Path) -> list[Path]:
    """The ``logging.jsonl`` files under ``run_dir`` other than ``shown``: other runs (or parts of a run that
    ms-swift's ``add_version`` put in a new ``v<N>-<time>`` folder when it was resumed), which a report of
    ``shown`` does not include."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.rglob(LOGGING_FILE) if p.resolve() != shown.resolve())


def _is_plotted_term(name: str) -> bool:
    return name.endswith("loss") or name == ACCURACY_TERM


def _plotted_terms(records: Sequence[TelemetryRecord]) -> list[str]:
    names = {name for r in records if r.split != "summary" for name in r.metrics if _is_plotted_term(name)}
    preferred = [name for name in PREFERRED_TERM_ORDER if name in names]
    others = sorted(names - set(preferred) - {ACCURACY_TERM})
    return preferred + others + ([ACCURACY_TERM] if ACCURACY_TERM in names else [])


def _series(records: Sequence[TelemetryRecord], split: Split, term: str) -> list[tuple[int, float]]:
    return [(r.step, r.metrics[term]) for r in records if r.split == split and term in r.metrics]


def _alert_steps(records: Sequence[TelemetryRecord]) -> Iterator[tuple[int, dict[str, float]]]:
    """The log as the live monitor saw it; eval values as ``eval/<name>``, so only the non-finite
    rule looks at them."""
    for record in records:
        if record.split == "train":
            yield record.step, record.metrics
        elif record.split == "eval":
            yield record.step, {f"eval/{k}": v for k, v in record.metrics.items()}


def _alert_term(alert: Alert) -> tuple[str, str]:
    """(split, term) an alert belongs to, for drawing it on the right subplot."""
    if alert.metric.startswith("eval/"):
        return "eval", alert.metric.removeprefix("eval/")
    return "train", alert.metric


def _telemetry_figure(
    records: Sequence[TelemetryRecord], terms: Sequence[str], alerts: Sequence[Alert], title: str
) -> Figure:
    columns = 1 if len(terms) == 1 else 2
    rows = math.ceil(len(terms) / columns)
    figure = Figure(figsize=(6.2 * columns, 3.3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, term in zip(axes[: len(terms)], terms, strict=True):
        train, evaluation = _series(records, "train", term), _series(records, "eval", term)
        if train:
            steps, values = zip(*train, strict=True)
            ax.plot(
                steps,
                values,
                color="#4C72B0",
                linewidth=1.4,
                marker="o" if len(train) <= 30 else None,
                markersize=3,
                label="train",
            )
        if evaluation:
            steps, values = zip(*evaluation, strict=True)
            ax.plot(steps, values, color="#DD8452", linewidth=1.4, marker="s", markersize=4, label="eval")
        labelled_rules: set[str] = set()
        for alert in sorted((a for a in alerts if _alert_term(a)[1] == term), key=lambda a: a.step):
            label = None if alert.rule in labelled_rules else f"alert: {alert.rule}"
            labelled_rules.add(alert.rule)
            ax.axvline(alert.step, color=ALERT_COLORS[alert.rule], linestyle=":", linewidth=1.3, label=label)
        ax.set_title(term, fontsize=11, fontweight="bold")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy" if term == ACCURACY_TERM else "loss")
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=8, framealpha=0.85, edgecolor="none")
    for ax in axes[len(terms) :]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=13, fontweight="bold")
    return figure


def _progress(records: Sequence[TelemetryRecord]) -> tuple[int | None, int | None]:
    """(last logged step, max_steps as last reported)."""
    last_step = max((r.step for r in records if r.split != "summary"), default=None)
    max_steps = next((r.max_steps for r in reversed(records) if r.max_steps), None)
    return last_step, max_steps


def _format_number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _term_rows(records: Sequence[TelemetryRecord], terms: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for term in terms:
        train = [(s, v) for s, v in _series(records, "train", term) if math.isfinite(v)]
        evaluation = [(s, v) for s, v in _series(records, "eval", term) if math.isfinite(v)]
        lowest = min(train, key=lambda step_value: step_value[1]) if train else (None, None)
        highest = max(train, key=lambda step_value: step_value[1]) if train else (None, None)
        rows.append(
            {
                "term": term,
                "first": train[0][1] if train else None,
                "last": train[-1][1] if train else None,
                "min": lowest[1],
                "min_step": lowest[0],
                "max": highest[1],
                "max_step": highest[0],
                "last_eval": evaluation[-1][1] if evaluation else None,
            }
        )
    return rows


def _render_markdown(
    title: str,
    source: Path,
    records: Sequence[TelemetryRecord],
    term_rows: Sequence[Mapping[str, Any]],
    alerts: Sequence[Alert],
    figure_path: Path | None,
    others: Sequence[Path] = (),
) -> str:
    train_records = [r for r in records if r.split == "train"]
    eval_records = [r for r in records if r.split == "eval"]
    last_step, max_steps = _progress(records)
    progress = f"{last_step}/{max_steps}" if max_steps else str(last_step)
    lines = [
        f"# {title}",
        "",
        f"- source: `{source}`",
        f"- records: {len(train_records)} train, {len(eval_records)} eval; last step {progress}",
    ]
    if others:
        listed = ", ".join(f"`{path}`" for path in others)
        lines.append(f"- shows the source log only; not included ({len(others)} other run log(s)): {listed}")
    lines += [
        "",
        "## Loss terms and token accuracy",
        "",
    ]
    if term_rows:
        lines += [
            "| term | first | last | min (step) | max (step) | last eval |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in term_rows:
            cells = [_format_number(row["first"]), _format_number(row["last"])]
            for extreme in ("min", "max"):
                value = row[extreme]
                cells.append("–" if value is None else f"{_format_number(value)} ({row[extreme + '_step']})")
            cells.append(_format_number(row["last_eval"]))
            lines.append(f"| {row['term']} | " + " | ".join(cells) + " |")
    else:
        lines.append("No loss or accuracy values were logged.")
    lines += ["", f"## Alerts ({len(alerts)})", ""]
    if alerts:
        lines += ["| step | rule | metric | value | threshold | message |", "|---:|---|---|---:|---:|---|"]
        for alert in alerts:
            lines.append(
                f"| {alert.step} | {alert.rule} | {alert.metric} | {_format_number(alert.value)} | "
                f"{_format_number(alert.threshold)} | {alert.message.replace('|', '/')} |"
            )
    else:
        lines.append("No alerts.")
    if figure_path is not None:
        lines += ["", "## Curves", "", f"![training telemetry]({figure_path.name})"]
    summary = next((r for r in records if r.split == "summary"), None)
    if summary is not None:
        lines += ["", "## Run summary", "", "| key | value |", "|---|---:|"]
        lines += [f"| {key} | {_format_number(value)} |" for key, value in summary.metrics.items()]
    return "\n".join(lines) + "\n"


def make_telemetry_report(
    run_dir: str | Path, out_dir: str | Path | None = None, alert_config: AlertConfig | None = None
) -> dict[str, Any]:
    """Plot the run's loss terms, replay the alert rules, write telemetry.png and telemetry_report.md.

    ``run_dir`` is an ms-swift output directory (or the ``logging.jsonl`` itself); files go to
    ``out_dir`` (default: the directory holding ``logging.jsonl``). Returns a plain-data summary:
    ``{source, other_logs, records, last_step, max_steps, terms: [per-term first/last/min/max/last_eval],
    alerts: [Alert.to_dict()], files: [paths written]}`` (a non-finite alert's value is NaN/inf).
    """
    source = find_logging_jsonl(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else source.parent
    records = read_logging_jsonl(source)
    terms = _plotted_terms(records)
    alerts = replay_alerts(_alert_steps(records), alert_config)
    title = f"Training telemetry: {source.parent.name}"

    files: list[Path] = []
    figure_path = None
    if terms:
        figure_path = save_figure(_telemetry_figure(records, terms, alerts, title), out_dir / "telemetry.png")
        files.append(figure_path)
    term_rows = _term_rows(records, terms)
    others = other_logging_jsonl(run_dir, source)
    markdown = _render_markdown(title, source, records, term_rows, alerts, figure_path, others)
    files.insert(0, atomic_write_text(out_dir / "telemetry_report.md", markdown))
    last_step, max_steps = _progress(records)
    return {
        "source": str(source),
        "other_logs": [str(path) for path in others],
        "records": len(records),
        "last_step": last_step,
        "max_steps": max_steps,
        "terms": term_rows,
        "alerts": [alert.to_dict() for alert in alerts],
        "files": [str(path) for path in files],
    }
