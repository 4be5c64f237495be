"""Training alert rules: notice early when a KL-anchored run goes wrong.

The same :class:`AlertMonitor` runs live (a trainer callback feeds it each logged step) and offline
(``telemetry_report`` replays a finished run's ``logging.jsonl``), so an alert seen in a report is
exactly the alert that would have fired during training.

Rules:

``llm_kd_loss_spike``
    The language-model KD (KL-to-anchor) loss exceeds ``kd_spike_factor`` x the running median of its
    previous ``kd_spike_window`` values (once ``kd_spike_min_history`` values exist). A sudden jump
    means the student has moved far from the anchor in one step, usually a learning-rate or data
    problem. The median, unlike the mean, is not dragged up by the spike itself. The threshold never
    goes below ``kd_spike_min_threshold``: the KL starts at ~0 (the student *is* the anchor at step 0)
    and its early, harmless growth from 1e-5 to 1e-3 would otherwise look like a series of spikes.
    Fires on every logged step that is above the threshold.
``anchor_kd_loss_spike``
    The same rule, with the same thresholds and its own history, on the KD term of the anchor prompts
    (``custom.anchor``): the student leaving the teacher on the prompts it should keep answering as before.
``sft_loss_regression``
    The mean ``sft_loss`` of the last ``sft_regression_window`` logged values exceeds the mean of the
    window before it by more than ``sft_regression_tolerance`` (relative): the task loss is going up,
    e.g. because the anchor is pulling too hard. Fires when the condition starts to hold and again
    only after it has cleared, so one sustained regression is one alert, not one per step.
``nonfinite``
    Any numeric term is NaN or infinite; named with its step. Non-finite values are not added to the
    rule histories, so they cannot poison the medians and means used afterwards.

The thresholds are :class:`AlertConfig`, declared with the rest of the settings in
:mod:`anchorkd.config.schema` (``custom.monitor`` of a run config). Windows count logged values, not
optimizer steps (the logging interval sets the time scale).
Metric names may arrive bare (``llm_kd_loss``) or with a ``train/`` prefix (``train/llm_kd_loss``,
TensorBoard-style); both are the same term. Other prefixes (``eval/``, ``eval_``) are kept, so
evaluation values never mix into the training-loss histories.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from anchorkd.config.schema import AlertConfig
from anchorkd.io import real_number

KD_METRIC = "llm_kd_loss"
ANCHOR_KD_METRIC = "anchor_kd_loss"
SFT_METRIC = "sft_loss"
TRAIN_PREFIX = "train/"
# Each KD term watched for spikes, with the rule that fires on it.
SPIKE_RULES = {KD_METRIC: "llm_kd_loss_spike", ANCHOR_KD_METRIC: "anchor_kd_loss_spike"}

AlertRule = Literal["llm_kd_loss_spike", "anchor_kd_loss_spike", "sft_loss_regression", "nonfinite"]


@dataclass(frozen=True)
class Alert:
    """One fired rule: where (step, metric), what was seen (value) against which limit (threshold)."""

    step: int
    rule: AlertRule
    metric: str
    value: float
    threshold: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_metric_name(name: str) -> str:
    """``train/llm_kd_loss`` -> ``llm_kd_loss``; every other name unchanged."""
    return name.removeprefix(TRAIN_PREFIX)


class AlertMonitor:
    """Stateful rule checker: call :meth:`update` with each logged step, in step order."""

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()
        self._kd_history: dict[str, deque[float]] = {
            metric: deque(maxlen=self.config.kd_spike_window) for metric in SPIKE_RULES
        }
        self._sft_history: deque[float] = deque(maxlen=2 * self.config.sft_regression_window)
        self._sft_regressing = False

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Alert]:
        """Feed one logged step; return the alerts it fires (often none)."""
        alerts: list[Alert] = []
        finite: dict[str, float] = {}
        for raw_name, raw_value in metrics.items():
            value = real_number(raw_value)
            if value is None:
                continue
            name = normalize_metric_name(raw_name)
            if math.isfinite(value):
                finite[name] = value
            elif self.config.nonfinite:
                alerts.append(
                    Alert(
                        step, "nonfinite", name, value, None, f"step {step}: {name} is {value} (not finite)"
                    )
                )
        for metric in SPIKE_RULES:
            if metric in finite:
                alerts.extend(self._check_kd_spike(step, metric, finite[metric]))
        if SFT_METRIC in finite:
            alerts.extend(self._check_sft_regression(step, finite[SFT_METRIC]))
        return alerts

    def _check_kd_spike(self, step: int, metric: str, value: float) -> list[Alert]:
        alerts = []
        history = self._kd_history[metric]
        if len(history) >= self.config.kd_spike_min_history:
            median = statistics.median(history)
            threshold = max(self.config.kd_spike_factor * median, self.config.kd_spike_min_threshold)
            if value > threshold:
                message = (
                    f"step {step}: {metric} {value:.4g} > {self.config.kd_spike_factor:g} x running median "
                    f"{median:.4g} of the last {len(history)} values (threshold {threshold:.4g})"
                )
                alerts.append(Alert(step, SPIKE_RULES[metric], metric, value, threshold, message))
        history.append(value)
        return alerts

    def _check_sft_regression(self, step: int, value: float) -> list[Alert]:
        self._sft_history.append(value)
        window = self.config.sft_regression_window
        if len(self._sft_history) < 2 * window:
            return []
        values = list(self._sft_history)
        previous_mean = statistics.fmean(values[:window])
        last_mean = statistics.fmean(values[window:])
        threshold = previous_mean + self.config.sft_regression_tolerance * abs(previous_mean)
        regressing = last_mean > threshold
        newly_regressing = regressing and not self._sft_regressing
        self._sft_regressing = regressing
        if not newly_regressing:
            return []
        message = (
            f"step {step}: mean {SFT_METRIC} of the last {window} values ({last_mean:.4g}) exceeds the mean of "
            f"the {window} before ({previous_mean:.4g}) by more than "
            f"{self.config.sft_regression_tolerance:.0%} (threshold {threshold:.4g})"
        )
        return [Alert(step, "sft_loss_regression", SFT_METRIC, last_mean, threshold, message)]


def replay_alerts(
    steps: Iterable[tuple[int, Mapping[str, Any]]], config: AlertConfig | None = None
) -> list[Alert]:
    """Run a fresh monitor over ``(step, metrics)`` pairs in order; return every alert fired."""
    monitor = AlertMonitor(config)
    return [alert for step, metrics in steps for alert in monitor.update(step, metrics)]
