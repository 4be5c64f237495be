"""anchorkd's telemetry terms keep significant digits in logging.jsonl, and a divergence is never written
below zero; ms-swift's other keys keep its 8-decimal rounding."""

from __future__ import annotations

import json
import types

import pytest
from transformers import TrainerControl, TrainerState

from anchorkd import swift_seam as seam
from anchorkd.monitor.terms import is_precise_term, logged_value


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("vision_kd_loss", 3.27171234567e-09, 3.2717123e-09),
        ("llm_kd_loss", -1.2e-08, 0.0),
        ("eval_llm_kd_loss", -3e-10, 0.0),
        ("sft_loss", 11.924123456789, 11.924123),
        ("token_count", 480.0, 480.0),
        ("sft_loss", -0.5, -0.5),  # only divergences are clamped
    ],
)
def test_logged_value(key, value, expected):
    assert logged_value(key, value) == expected


def test_precise_terms_are_anchorkds_own():
    assert all(is_precise_term(k) for k in ("sft_loss", "eval_llm_kd_loss", "vision_kd_loss", "token_count"))
    assert not any(is_precise_term(k) for k in ("loss", "grad_norm", "learning_rate", "eval_loss"))


def test_the_progress_callback_writes_precise_terms_to_logging_jsonl(tmp_path):
    precise_cls, _ = seam.precise_progress_callback(is_precise_term, logged_value)
    callback = precise_cls()
    args = types.SimpleNamespace(output_dir=str(tmp_path), disable_tqdm=True)
    state = TrainerState(is_world_process_zero=True, max_steps=3, global_step=1)
    control = TrainerControl()
    callback.on_train_begin(args, state, control)
    logs = {
        "loss": 11.123456789123,
        "grad_norm": 0.123456789123,
        "llm_kd_loss": -1e-08,
        "vision_kd_loss": 3.27171234567e-09,
        "sft_loss": 11.12345678912,
    }
    callback.on_log(args, state, control, logs=logs)
    records = [json.loads(line) for line in (tmp_path / "logging.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record["vision_kd_loss"] == 3.2717123e-09  # ms-swift's rounding would write 0.0
    assert record["llm_kd_loss"] == 0.0
    assert record["sft_loss"] == 11.123457
    assert record["loss"] == 11.12345679 and record["grad_norm"] == 0.12345679  # ms-swift's own rounding
    assert record["global_step/max_steps"] == "1/3"
