"""`anchorkd demo --quick`: base -> the domain runs -> evaluation -> report, on the tiny model.

Every kind of run is exercised: ms-swift's SFT trainer (`sft`, and `replay` on the domain rows plus the
base's answers to anchor prompts), anchorkd's GKD trainer with each of its terms (`gkd`, `gkd_visual`,
`gkd_seqkd`, `gkd_anchor`, and `anchor_only` without the domain rows' KD), `gkd_anchor` trained from the
teacher's top-k cache instead of a live teacher (`gkd_anchor_cached`), and an evaluation of a scaled
adapter (`sft_wise0.5`). `gkd_anchor_w1`/`_w2` differ from `gkd_anchor` by one override, and the other
WiSE scales by the scale (tests/unit/test_testbed.py), so they are left out to keep this test short.

Quick sizes only check that the chain works and writes what it promises; the numbers are not meaningful
at 2-3 steps (the real testbed results are in docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from anchorkd.cli import main
from anchorkd.demo.testbed import HEADLINE_METRICS

pytestmark = pytest.mark.integration
TESTBED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "testbed"


KD_TERMS = ("sft_loss", "llm_kd_loss", "token_accuracy", "token_count")
QUICK_RUNS = (
    "sft",
    "gkd",
    "gkd_visual",
    "gkd_seqkd",
    "gkd_anchor",
    "gkd_anchor_cached",
    "anchor_only",
    "replay",
    "sft_wise0.5",
)
TRAINED = tuple(name for name in QUICK_RUNS if not name.startswith("sft_wise"))


def step_records(log: Path) -> list[dict]:
    """The per-step records of a run's logging.jsonl; quick domain runs train 2 steps."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if "global_step/max_steps" in r]
    assert [r["global_step/max_steps"] for r in steps] == ["1/2", "2/2"], log
    return steps


def finite(record: dict, key: str) -> float:
    value = record[key]
    assert isinstance(value, float | int) and math.isfinite(value), (key, value)
    return float(value)


def check_telemetry(name: str, steps: list[dict]) -> None:
    """What each run kind logs at every step, and what the values must be."""
    first, last = steps
    if name in ("sft", "replay"):  # ms-swift's own trainer: CE only (loss and token_acc), no KD term at all
        assert finite(first, "loss") > 0
        assert finite(last, "train_loss") > 0
        for record in steps:
            assert 0.0 <= finite(record, "token_acc") <= 1.0
            assert not set(KD_TERMS[:2]) & set(record), record
        return
    for record in steps:
        assert finite(record, "sft_loss") > 0
        # anchor_only has no KD on the domain rows (llm_kd_weight 0): the term is not computed, not logged.
        assert ("llm_kd_loss" in record) == (name != "anchor_only"), record
        assert ("anchor_kd_loss" in record) == (name.startswith("gkd_anchor") or name == "anchor_only"), (
            record
        )
        assert ("vision_kd_loss" in record) == (name == "gkd_visual"), record
        for term in ("llm_kd_loss", "anchor_kd_loss", "vision_kd_loss"):
            if term in record:  # a divergence: never below zero beyond the logged rounding
                assert finite(record, term) > -1e-6
        assert 0.0 <= finite(record, "token_accuracy") <= 1.0
        assert finite(record, "token_count") > 0 and record["token_count"] == int(record["token_count"])
    # Step 1: the student is still the base (LoRA B starts at zero), so it matches the teacher and the
    # loss is the CE term alone; after one update the KD term is active.
    kd = "anchor_kd_loss" if name == "anchor_only" else "llm_kd_loss"
    assert abs(first[kd]) < 1e-6
    assert math.isclose(first["loss"], first["sft_loss"], rel_tol=1e-6)
    if name.endswith("_cached"):
        # The quick base is nearly uniform over 151,936 tokens, so the top-64 + tail JSD is ~1e-3 of the
        # full one (docs/teacher_cache.md): the step-2 value is rounding-sized, and its accuracy is tested
        # in tests/integration/test_teacher_cache_training.py.
        return
    assert last[kd] > 0
    if name == "gkd_visual":
        assert last["vision_kd_loss"] > 0


def sft_excess(report: dict, excess_key: str) -> float:
    rate_key = excess_key.replace("ood_excess_removed", "ood_domain_object_rate")
    return report["runs"]["sft"][rate_key] - report["runs"]["base"][rate_key]


def test_demo_quick_writes_report_for_every_run(tmp_path, tiny_model_dir, synthetic_data_dir, capsys):
    root = tmp_path / "testbed"
    root.mkdir()
    (root / "tiny-qwen3-vl").symlink_to(tiny_model_dir, target_is_directory=True)
    (root / "data").symlink_to(synthetic_data_dir, target_is_directory=True)

    args = ["demo", "--quick", "--root", str(root), "--configs", str(TESTBED_CONFIGS)]
    assert main([*args, "--runs", *QUICK_RUNS]) == 0

    report = json.loads((root / "report" / "report.json").read_text())
    assert list(report["runs"]) == ["base", *QUICK_RUNS]
    for name, metrics in report["runs"].items():
        for key in HEADLINE_METRICS:
            if key.startswith("ood_excess_removed") and metrics.get(key) is None:
                # Undefined when the 2-step SFT run names no more domain objects than the base.
                assert sft_excess(report, key) <= 0
                continue
            assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (name, key)
    assert report["runs"]["base"]["text_ppl_change_pct"] == 0.0
    assert report["metadata"]["base_cached"] is False
    for png in ("hallucination.png", "quality.png", "text_ppl_change.png"):
        assert (root / "report" / png).stat().st_size > 1000
    markdown = (root / "report" / "report.md").read_text()
    assert all(f"`{name}`" in markdown for name in report["runs"])
    for name in TRAINED:
        check_telemetry(name, step_records(root / "seed-0" / "runs" / name / "logging.jsonl"))
    out = capsys.readouterr().out
    assert "report in" in out and all(name in out for name in QUICK_RUNS)
    # The WiSE run is sft's adapter of the same seed, scaled; nothing was trained for it.
    wise = json.loads((root / "seed-0" / "eval" / "sft_wise0.5" / "generation_settings.json").read_text())
    sft = json.loads((root / "seed-0" / "eval" / "sft" / "generation_settings.json").read_text())
    assert (wise["adapter_scale"], sft["adapter_scale"]) == (0.5, 1.0)
    assert wise["adapter"] == sft["adapter"] and not (root / "seed-0" / "runs" / "sft_wise0.5").exists()
    # The replay run trained on the domain rows plus anchor rows answered by the base.
    domain_rows = (root / "data" / "train.jsonl").read_text().splitlines()
    replay_rows = [
        json.loads(line) for line in (root / "anchor_set" / "replay_train.jsonl").read_text().splitlines()
    ]
    assert replay_rows[: len(domain_rows)] == [json.loads(line) for line in domain_rows]
    assert len(replay_rows) > len(domain_rows)
    assert all(row["messages"][-1]["role"] == "assistant" for row in replay_rows[len(domain_rows) :])
    # Per family and pooled near / far OOD, with SFT's excess removed (1 for the base, 0 for SFT itself).
    base, sft = report["runs"]["base"], report["runs"]["sft"]
    for family in ("outdoor", "kitchen", "street", "field"):
        assert 0.0 <= sft[f"ood_domain_object_rate_{family}"] <= 1.0
    assert "ood_excess_removed_far" not in base and "ood_excess_removed_far" not in sft
    # The teacher answered every seq_kd (domain) and anchor prompt once, into the testbed's shared cache; the
    # anchor set's dense prompt on off-domain images is not a domain row, so every answer has its own key.
    answers = sorted((root / "cache" / "teacher_targets" / "rows").glob("*/*.json"))
    prompts = len((root / "data" / "train.jsonl").read_text().splitlines())
    prompts += len((root / "anchor_set" / "anchors.jsonl").read_text().splitlines())
    assert len(answers) == prompts
    # The cached run read the teacher's top-k of every domain and anchor row from the testbed's cache, written
    # once before the seeds: its first step is the live run's, CE alone.
    # One cache per base (a cache refuses another teacher), next to that base.
    topk = root / "cache" / f"teacher_topk-{Path(report['metadata']['base_checkpoint']).name}"
    assert sorted((root / "cache").glob("*teacher_topk*")) == [topk]
    cache = json.loads((topk / "cache.json").read_text())
    assert (cache["k"], cache["temperature"], cache["max_length"]) == (64, 1.0, 768)
    assert list(topk.glob("*.safetensors"))
    live, cached = (
        step_records(root / "seed-0" / "runs" / name / "logging.jsonl")[0]
        for name in ("gkd_anchor", "gkd_anchor_cached")
    )
    assert math.isclose(live["sft_loss"], cached["sft_loss"], rel_tol=1e-6)

    # A second run reuses the cached base (content hash unchanged).
    assert (
        main(["demo", "--quick", "--root", str(root), "--configs", str(TESTBED_CONFIGS), "--runs", "sft"])
        == 0
    )
    again = json.loads((root / "report" / "report.json").read_text())
    assert again["metadata"]["base_cached"] is True
    assert list(again["runs"]) == ["base", "sft"]
    assert sorted((root / "cache" / "teacher_targets" / "rows").glob("*/*.json")) == answers
