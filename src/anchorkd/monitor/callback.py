"""Live training alerts: the rules of ``anchorkd.monitor.alerts`` applied to each log record as it is made.

An alert is a warning in the training log and a line in ``<output_dir>/alerts.jsonl``, so a dashboard
or a CI gate can watch the file while the run goes on (``anchorkd report`` lists the same alerts later).

A resumed run continues the alert state of the run it resumes: at the start of training the monitor is
fed the checkpoint's ``log_history`` (every log dict the callbacks received up to the checkpoint's step,
unrounded), so a spike median or a regression window spans the restart exactly as in a straight run.
Those replayed steps fire no alerts again: theirs are already in ``alerts.jsonl``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..io import append_jsonl
from .alerts import AlertConfig, AlertMonitor

logger = logging.getLogger("anchorkd")
ALERTS_FILE = "alerts.jsonl"


def log_history_steps(log_history: list[Mapping[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(step, logs)`` for each entry of a ``TrainerState.log_history`` (HF stores ``{**logs, "step"}``)."""
    for entry in log_history:
        step = entry.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            yield step, {key: value for key, value in entry.items() if key != "step"}


class AlertCallback(TrainerCallback):
    def __init__(self, config: AlertConfig, output_dir: str | Path):
        self.config = config
        self.monitor = AlertMonitor(config)
        self.path = Path(output_dir) / ALERTS_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor = AlertMonitor(self.config)
        for step, logs in log_history_steps(state.log_history):
            self.monitor.update(step, logs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        alerts = self.monitor.update(int(state.global_step), logs)
        if not alerts:
            return
        for alert in alerts:
            logger.warning("alert at step %d: %s", alert.step, alert.message)
        append_jsonl(self.path, (alert.to_dict() for alert in alerts))
