"""Alert rules on hand-made metric sequences whose alert steps are known."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from anchorkd.monitor.alerts import AlertConfig, AlertMonitor, normalize_metric_name, replay_alerts


def feed(monitor: AlertMonitor, metric: str, values: list[float], first_step: int = 1):
    """Feed ``values`` as consecutive steps; return all alerts."""
    return [
        alert
        for step, value in enumerate(values, start=first_step)
        for alert in monitor.update(step, {metric: value})
    ]


def test_config_defaults_and_validation():
    config = AlertConfig()
    assert (config.kd_spike_factor, config.kd_spike_window, config.kd_spike_min_history) == (3.0, 20, 5)
    assert (config.sft_regression_window, config.sft_regression_tolerance, config.nonfinite) == (
        20,
        0.10,
        True,
    )
    with pytest.raises(ValidationError, match="extra"):
        AlertConfig(kd_spike_factr=2.0)
    with pytest.raises(ValidationError, match="must not exceed kd_spike_window"):
        AlertConfig(kd_spike_window=3, kd_spike_min_history=4)
    with pytest.raises(ValidationError):
        AlertConfig(kd_spike_factor=0.5)


def test_kd_spike_against_running_median():
    monitor = AlertMonitor(AlertConfig(kd_spike_window=5, kd_spike_min_history=3, kd_spike_min_threshold=0.0))
    # step 4: 2.9 <= 3 x median(1, 1, 1); step 5: 3.5 > 3 x median(1, 1, 1, 2.9) = 3.0
    alerts = feed(monitor, "llm_kd_loss", [1.0, 1.0, 1.0, 2.9, 3.5, 1.0])
    assert [(a.step, a.rule, a.metric) for a in alerts] == [(5, "llm_kd_loss_spike", "llm_kd_loss")]
    assert alerts[0].value == 3.5
    assert alerts[0].threshold == pytest.approx(3.0)
    assert "running median" in alerts[0].message


def test_anchor_kd_spike_has_its_own_rule_and_history():
    """``anchor_kd_loss`` spikes against its own running median; the domain term's history is apart."""
    monitor = AlertMonitor(AlertConfig(kd_spike_window=5, kd_spike_min_history=3, kd_spike_min_threshold=0.0))
    steps = [
        {"llm_kd_loss": 1.0, "anchor_kd_loss": 0.1},
        {"llm_kd_loss": 1.0, "train/anchor_kd_loss": 0.1},
        {"llm_kd_loss": 1.0, "anchor_kd_loss": 0.1},
        # 0.5 > 3 x 0.1 fires on the anchor term only; 1.2 < 3 x 1.0 leaves the domain term quiet
        {"llm_kd_loss": 1.2, "anchor_kd_loss": 0.5},
    ]
    alerts = [alert for step, metrics in enumerate(steps, start=1) for alert in monitor.update(step, metrics)]
    assert [(a.step, a.rule, a.metric, a.value) for a in alerts] == [
        (4, "anchor_kd_loss_spike", "anchor_kd_loss", 0.5)
    ]
    assert alerts[0].threshold == pytest.approx(0.3) and "anchor_kd_loss 0.5" in alerts[0].message


def test_kd_spike_needs_min_history():
    monitor = AlertMonitor(AlertConfig(kd_spike_window=5, kd_spike_min_history=3, kd_spike_min_threshold=0.0))
    assert feed(monitor, "llm_kd_loss", [1.0, 100.0, 1.0]) == []  # steps 1-3: never 3 earlier values


def test_kd_spike_window_forgets_old_values():
    monitor = AlertMonitor(AlertConfig(kd_spike_window=3, kd_spike_min_history=3, kd_spike_min_threshold=0.0))
    # step 4: median(1, 1, 1) = 1; step 5: median(1, 1, 10) = 1; step 6: median(1, 10, 10) = 10 -> quiet
    alerts = feed(monitor, "train/llm_kd_loss", [1, 1, 1, 10, 10, 10, 10])
    assert [a.step for a in alerts] == [4, 5]


def test_kd_spike_threshold_floor_ignores_growth_from_zero():
    monitor = AlertMonitor(AlertConfig())  # min history 5, floor 0.05
    # The KL starts at exactly 0 (student == anchor): 1e-4 is 'infinitely' above a median of 0 but harmless.
    alerts = feed(monitor, "llm_kd_loss", [0.0, 0.0, 0.0, 0.0, 0.0, 1e-4, 0.2])
    assert [(a.step, a.threshold) for a in alerts] == [(7, 0.05)]


def test_sft_regression_fires_once_per_episode():
    monitor = AlertMonitor(AlertConfig(sft_regression_window=3, sft_regression_tolerance=0.10))
    values = [1.0] * 6 + [1.2] * 6 + [2.0] * 3  # steps 1-6, 7-12, 13-15
    alerts = feed(monitor, "sft_loss", values)
    # step 7:  mean(1, 1, 1.2) = 1.067 <= 1.1           -> quiet
    # step 8:  mean(1, 1.2, 1.2) = 1.133 > 1.1          -> alert
    # step 9, 10: still above the threshold             -> no repeat
    # step 11: prev mean(1, 1.2, 1.2) = 1.133, threshold 1.247 > 1.2 -> cleared
    # step 13: prev mean 1.2, last mean(1.2, 1.2, 2.0) = 1.467 > 1.32 -> new alert
    assert [a.step for a in alerts] == [8, 13]
    assert alerts[0].rule == "sft_loss_regression"
    assert alerts[0].value == pytest.approx(3.4 / 3)
    assert alerts[0].threshold == pytest.approx(1.1)
    assert alerts[1].value == pytest.approx(4.4 / 3)
    assert alerts[1].threshold == pytest.approx(1.32)


def test_sft_regression_tolerates_noise_within_tolerance():
    monitor = AlertMonitor(AlertConfig(sft_regression_window=2, sft_regression_tolerance=0.10))
    assert feed(monitor, "sft_loss", [1.0, 1.0, 1.05, 1.09, 1.0]) == []


def test_nonfinite_names_term_and_step():
    monitor = AlertMonitor()
    metrics = {
        "loss": float("nan"),
        "train/grad_norm": float("inf"),
        "global_step/max_steps": "3/10",
        "ok": 1.0,
    }
    alerts = monitor.update(3, metrics)
    assert [(a.step, a.rule, a.metric) for a in alerts] == [
        (3, "nonfinite", "loss"),
        (3, "nonfinite", "grad_norm"),
    ]
    assert math.isnan(alerts[0].value) and alerts[0].threshold is None
    assert "step 3: loss is nan" in alerts[0].message


def test_nonfinite_values_stay_out_of_histories():
    monitor = AlertMonitor(AlertConfig(kd_spike_window=3, kd_spike_min_history=3, kd_spike_min_threshold=0.0))
    alerts = feed(monitor, "llm_kd_loss", [1.0, 1.0, 1.0, float("nan"), 3.5])
    # The NaN at step 4 is reported and skipped, so step 5 compares with median(1, 1, 1) = 1.
    assert [(a.step, a.rule) for a in alerts] == [(4, "nonfinite"), (5, "llm_kd_loss_spike")]
    assert alerts[1].threshold == pytest.approx(3.0)


def test_nonfinite_rule_can_be_disabled_and_non_numbers_are_ignored():
    monitor = AlertMonitor(AlertConfig(nonfinite=False))
    assert monitor.update(1, {"loss": float("nan"), "flag": True, "note": "nan"}) == []


def test_eval_metrics_do_not_feed_training_rules():
    monitor = AlertMonitor(AlertConfig(kd_spike_window=3, kd_spike_min_history=3, kd_spike_min_threshold=0.0))
    assert feed(monitor, "eval/llm_kd_loss", [1, 1, 1, 100]) == []
    assert normalize_metric_name("train/sft_loss") == "sft_loss"
    assert normalize_metric_name("eval/sft_loss") == "eval/sft_loss"


def test_replay_alerts_and_to_dict():
    steps = [(10, {"llm_kd_loss": 0.1}), (20, {"llm_kd_loss": float("inf")})]
    alerts = replay_alerts(steps)
    assert [alert.to_dict()["step"] for alert in alerts] == [20]
    assert set(alerts[0].to_dict()) == {"step", "rule", "metric", "value", "threshold", "message"}
