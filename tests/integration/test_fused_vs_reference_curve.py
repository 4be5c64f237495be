"""Issue 5: a short real training run gives the same loss curve with the fused and the reference KD loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchorkd.trainers.pipeline import run_training

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "stage_2_llm_lora_gkd.yaml"


def _curve(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [r for r in records if "llm_kd_loss" in r and "global_step/max_steps" in r]


def test_fused_and_reference_paths_give_the_same_loss_curve(in_demo_workdir, quick_overrides, tmp_path):
    curves = {}
    for impl in ("reference", "fused"):
        out = tmp_path / impl
        overrides = [
            *quick_overrides(out, steps=3, batch=1),
            f"custom.kd_loss_impl={impl}",
            "training.seed=7",
        ]
        run_training(CONFIG, overrides)
        curves[impl] = _curve(out)
    reference, fused = curves["reference"], curves["fused"]
    assert [r["global_step/max_steps"] for r in fused] == ["1/3", "2/3", "3/3"]
    assert [r["global_step/max_steps"] for r in reference] == ["1/3", "2/3", "3/3"]
    for ref, fus in zip(reference, fused, strict=True):
        for key in ("loss", "sft_loss", "llm_kd_loss"):
            assert fus[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (
                ref["global_step/max_steps"],
                key,
            )
        assert fus["token_count"] == ref["token_count"]
    # the curve moved: the run trained, so equal curves are not two copies of one constant
    assert reference[0]["loss"] != reference[-1]["loss"]
