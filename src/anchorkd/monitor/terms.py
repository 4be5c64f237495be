"""The telemetry terms anchorkd logs, and how their values are written so a person can trust them.

Keys are logged bare by the trainer (``sft_loss``) and appear as ``train/sft_loss`` / ``eval/sft_loss``
in TensorBoard-style sinks; evaluation values carry HF's ``eval_`` prefix in ``logging.jsonl``.
"""

from __future__ import annotations

# Terms the GKD trainer computes; "loss" itself is logged by the HF Trainer from the returned loss.
# ``llm_kd_loss`` covers the domain rows; ``anchor_kd_loss`` the KD-only anchor rows (``custom.anchor``).
METRIC_NAMES = (
    "sft_loss",
    "llm_kd_loss",
    "anchor_kd_loss",
    "vision_kd_loss",
    "token_accuracy",
    "token_count",
)
# Divergences and distances: never negative in exact arithmetic, so rounding noise is not shown as such.
NON_NEGATIVE_TERMS = frozenset({"llm_kd_loss", "anchor_kd_loss", "vision_kd_loss"})
# anchorkd's terms keep significant digits in logging.jsonl: ms-swift rounds every float to 8 decimals,
# which prints an active 1e-9 KD term as 0.0. (``loss`` keeps ms-swift's rounding: it holds the CE.)
PRECISE_TERMS = frozenset(METRIC_NAMES)
SIGNIFICANT_DIGITS = 8
EVAL_PREFIX = "eval_"


def bare_name(key: str) -> str:
    return key.removeprefix(EVAL_PREFIX)


def is_precise_term(key: str) -> bool:
    return bare_name(key) in PRECISE_TERMS


def logged_value(key: str, value: float) -> float:
    """``value`` as written to the logs: ``SIGNIFICANT_DIGITS`` significant digits, and a divergence
    clamped at 0 (its tiny negative values are float rounding, never a real negative divergence)."""
    if bare_name(key) in NON_NEGATIVE_TERMS and value < 0:
        value = 0.0
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
