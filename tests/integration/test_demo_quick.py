"""`anchorkd demo --quick`: base -> sft / gkd / gkd_visual -> evaluation -> report, on the tiny model.

Quick sizes only check that the chain works and writes what it promises; the numbers are not meaningful
at 2-3 steps (the real testbed results are in docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from anchorkd.cli import main
from anchorkd.demo.testbed import HEADLINE_METRICS, RUN_NAMES

pytestmark = pytest.mark.integration
TESTBED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "testbed"


def test_demo_quick_writes_report_for_every_run(tmp_path, tiny_model_dir, synthetic_data_dir, capsys):
    root = tmp_path / "testbed"
    root.mkdir()
    (root / "tiny-qwen3-vl").symlink_to(tiny_model_dir, target_is_directory=True)
    (root / "data").symlink_to(synthetic_data_dir, target_is_directory=True)

    assert main(["demo", "--quick", "--root", str(root), "--configs", str(TESTBED_CONFIGS)]) == 0

    report = json.loads((root / "report" / "report.json").read_text())
    assert list(report["runs"]) == list(RUN_NAMES)
    for name, metrics in report["runs"].items():
        for key in HEADLINE_METRICS:
            assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (name, key)
    assert report["runs"]["base"]["text_ppl_change_pct"] == 0.0
    assert report["metadata"]["base_cached"] is False
    for png in ("hallucination.png", "quality.png", "text_ppl_change.png"):
        assert (root / "report" / png).stat().st_size > 1000
    markdown = (root / "report" / "report.md").read_text()
    assert all(f"`{name}`" in markdown for name in RUN_NAMES)
    for name in ("sft", "gkd", "gkd_visual"):
        log = root / "seed-0" / "runs" / name / "logging.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert any("sft_loss" in r or "loss" in r for r in records)
    gkd_records = (root / "seed-0" / "runs" / "gkd_visual" / "logging.jsonl").read_text()
    assert "llm_kd_loss" in gkd_records and "vision_kd_loss" in gkd_records
    out = capsys.readouterr().out
    assert "report in" in out and "gkd_visual" in out

    # A second run reuses the cached base (content hash unchanged).
    assert (
        main(["demo", "--quick", "--root", str(root), "--configs", str(TESTBED_CONFIGS), "--runs", "sft"])
        == 0
    )
    again = json.loads((root / "report" / "report.json").read_text())
    assert again["metadata"]["base_cached"] is True
    assert list(again["runs"]) == ["base", "sft"]
