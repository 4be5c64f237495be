"""Live training alerts: the rules of ``anchorkd.monitor.alerts`` applied to each log record as it is made.

An alert is a warning in the training log and a line in ``<output_dir>/alerts.jsonl``, so a dashboard
or a CI gate can watch the file while the run goes on (``anchorkd report`` lists the same alerts later).
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from ..io import append_jsonl
from .alerts import AlertConfig, AlertMonitor

logger = logging.getLogger("anchorkd")
ALERTS_FILE = "alerts.jsonl"


class AlertCallback(TrainerCallback):
    def __init__(self, config: AlertConfig, output_dir: str | Path):
        self.monitor = AlertMonitor(config)
        self.path = Path(output_dir) / ALERTS_FILE

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        alerts = self.monitor.update(int(state.global_step), logs)
        if not alerts:
            return
        for alert in alerts:
            logger.warning("alert at step %d: %s", alert.step, alert.message)
        append_jsonl(self.path, (alert.to_dict() for alert in alerts))
