"""Comparison report and telemetry report: the files they write and what is in them."""

from __future__ import annotations

import json
import math
import os

import pytest

from anchorkd.errors import TelemetryFormatError
from anchorkd.eval.lexicon import lexicon_from_mapping
from anchorkd.eval.metrics import score_captions
from anchorkd.eval.report import (
    METRIC_SPECS,
    best_runs,
    examples_from_scores,
    mark_spans,
    write_comparison_report,
)
from anchorkd.monitor.alerts import AlertConfig
from anchorkd.monitor.report import make_telemetry_report, read_logging_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RUNS = {
    "base": {
        "ood_domain_object_rate": 0.04,
        "chair_i": 0.21,
        "chair_i_std": 0.02,
        "chair_s": 0.48,
        "object_recall": 0.52,
        "indomain_f1": 0.18,
        "text_ppl": 12.4,
        "text_ppl_change_pct": 0.0,
    },
    "sft": {
        "ood_domain_object_rate": 0.37,
        "chair_i": 0.16,
        "chair_i_std": 0.03,
        "chair_s": 0.35,
        "object_recall": 0.81,
        "indomain_f1": 0.74,
        "text_ppl": 15.9,
        "text_ppl_change_pct": 28.2,
        "eval_samples": 400,
    },
    "gkd": {
        "ood_domain_object_rate": 0.06,
        "chair_i": 0.07,
        "chair_i_std": 0.01,
        "chair_s": 0.17,
        "object_recall": 0.79,
        "indomain_f1": 0.72,
        "text_ppl": 12.9,
        "text_ppl_change_pct": 4.0,
        "text_ppl_change_pct_std": 1.2,
    },
}


def is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


# ------------------------------------------------------------------------------------------ comparison


def test_writes_json_markdown_and_charts(tmp_path):
    written = write_comparison_report(tmp_path, RUNS, title="Demo", metadata={"seeds": 3})
    names = [path.name for path in written]
    assert names == ["report.json", "report.md", "hallucination.png", "quality.png", "text_ppl_change.png"]
    assert all(path.parent == tmp_path for path in written)
    assert all(is_png(path) for path in written if path.suffix == ".png")
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # no temporary files left behind

    document = json.loads((tmp_path / "report.json").read_text())
    assert document == {"title": "Demo", "metadata": {"seeds": 3}, "runs": RUNS}

    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# Demo\n")
    assert "- **seeds**: 3" in markdown
    assert "| metric | base | sft | gkd | best |" in markdown
    # CHAIR-i: gkd is lowest; shown as a percentage with its spread
    assert "| CHAIR-i ↓ | 21.0% ± 2.0 | 16.0% ± 3.0 | **7.0% ± 1.0** | gkd |" in markdown
    assert "| OOD domain-object rate ↓ | **4.0%** | 37.0% | 6.0% | base |" in markdown
    assert "| In-domain field F1 ↑ | 18.0% | **74.0%** | 72.0% | sft |" in markdown
    assert "| Perplexity change vs base ↓ | **+0.0%** | +28.2% | +4.0% ± 1.2 | base |" in markdown
    assert "| `eval_samples` | n/a | 400 | n/a |" in markdown  # unknown numeric keys still shown
    assert "![Object hallucination](hallucination.png)" in markdown


def test_long_metadata_stays_in_the_json(tmp_path):
    per_seed = {str(seed): {"sft": {"chair_i": 0.1 * seed, "note": "x" * 40}} for seed in range(10)}
    write_comparison_report(tmp_path, RUNS, metadata={"seeds": [0, 1], "per_seed": per_seed})
    markdown = (tmp_path / "report.md").read_text()
    assert "- **seeds**: [0, 1]" in markdown
    assert "- **per_seed**: (long; see `report.json`)" in markdown
    assert json.loads((tmp_path / "report.json").read_text())["metadata"]["per_seed"] == per_seed


def test_charts_only_for_metrics_present_and_nan_becomes_null(tmp_path):
    runs = {"a": {"chair_i": 0.2}, "b": {"chair_i": float("nan"), "chair_s": 0.1}}
    written = write_comparison_report(tmp_path, runs)
    assert [path.name for path in written] == ["report.json", "report.md", "hallucination.png"]
    assert json.loads((tmp_path / "report.json").read_text())["runs"]["b"]["chair_i"] is None
    assert "| CHAIR-i ↓ | **20.0%** | n/a | a |" in (tmp_path / "report.md").read_text()


def test_needs_a_run(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        write_comparison_report(tmp_path, {})


def test_best_runs_direction_and_ties():
    chair_i = METRIC_SPECS["chair_i"]
    assert best_runs({"a": {"chair_i": 0.1}, "b": {"chair_i": 0.1}, "c": {"chair_i": 0.3}}, chair_i) == [
        "a",
        "b",
    ]
    assert best_runs({"a": {"x": 1}}, chair_i) == []


def test_mark_spans_strikes_hallucinations_and_escapes_cells():
    text = "a rack | a bbu\nnext line"
    assert mark_spans(text, [[2, 6], [11, 14]]) == "a ~~**rack**~~ \\| a ~~**bbu**~~<br>next line"
    assert mark_spans("abc", [[0, 2], [1, 3], [5, 9]]) == "~~**ab**~~c"  # overlap / out of range ignored


def test_examples_from_scores_in_markdown(tmp_path):
    lexicon = lexicon_from_mapping(
        {
            "objects": {
                "rack": {"synonyms": ["rack", "racks"], "domain": True},
                "tower": {"synonyms": ["tower"], "domain": False},
                "tree": {"synonyms": ["tree"], "domain": False},
            }
        }
    )
    objects = [{"name": "tower", "box": [0, 0, 10, 10]}, {"name": "tree", "box": [0, 0, 5, 5]}]

    def record(caption):
        reference = "A tower and a tree."
        return [
            {
                "id": "s1",
                "scene": "outdoor",
                "style": "general",
                "caption": caption,
                "reference": reference,
                "objects": objects,
            }
        ]

    scores = {
        "base": score_captions(record("A tower and a tree."), lexicon),
        "sft": score_captions(record("A tower | two racks."), lexicon),
    }
    examples = examples_from_scores(scores)
    assert len(examples) == 1
    assert examples[0]["captions"]["sft"]["hallucinated"] == ["rack"]

    write_comparison_report(tmp_path, {"base": {"chair_i": 0.0}, "sft": {"chair_i": 0.5}}, examples)
    markdown = (tmp_path / "report.md").read_text()
    assert "### Example 1: `s1` (outdoor, general)" in markdown
    assert "Ground-truth objects: tower, tree" in markdown
    assert "| reference | A tower and a tree. | |" in markdown
    assert "| base | A tower and a tree. | – |" in markdown
    assert "| sft | A tower \\| two ~~**racks**~~. | rack |" in markdown


def test_examples_accept_plain_caption_strings(tmp_path):
    examples = [{"id": 7, "reference": "ref", "captions": {"base": "a caption"}}]
    write_comparison_report(tmp_path, {"base": {"chair_s": 0.1}}, examples)
    assert "| base | a caption | – |" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------------------ telemetry


def write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def synthetic_log():
    """12 training steps; llm_kd_loss spikes at step 9, vision_kd_loss is NaN at step 4."""
    records = []
    for step in range(1, 13):
        kd = 1.0 if step == 9 else 0.1
        records.append(
            {
                "loss": 2.0 - 0.1 * step,
                "sft_loss": 1.9 - 0.1 * step,
                "llm_kd_loss": kd,
                "vision_kd_loss": float("nan") if step == 4 else 0.01,
                "token_acc": 0.5 + 0.02 * step,
                "learning_rate": 1e-5,
                "grad_norm": 1.5,
                "epoch": step / 12,
                "global_step/max_steps": f"{step}/12",
                "elapsed_time": "10s",
            }
        )
        if step % 6 == 0:
            records.append(
                {
                    "eval_loss": 1.5,
                    "eval_token_acc": 0.6,
                    "epoch": step / 12,
                    "global_step/max_steps": f"{step}/12",
                }
            )
    records.append({"train_runtime": 99.0, "train_loss": 1.4, "epoch": 1.0, "global_step/max_steps": "12/12"})
    return records


def test_read_logging_jsonl_normalises_records(tmp_path):
    path = write_log(
        tmp_path / "logging.jsonl",
        [
            {"loss": 1.0, "token_acc": 0.5, "global_step/max_steps": "3/10", "percentage": "30%"},
            {"eval_loss": 0.9, "eval_token_acc": 0.55, "global_step/max_steps": "3/10"},
            {"eval/loss": 0.8, "train/loss": 0.7, "step": 5},
            {"loss": 0.6},
            {"train_runtime": 12.0, "train_loss": 0.8},
        ],
    )
    records = read_logging_jsonl(path)
    assert [(r.step, r.split, r.metrics) for r in records] == [
        (3, "train", {"loss": 1.0, "token_accuracy": 0.5}),
        (3, "eval", {"loss": 0.9, "token_accuracy": 0.55}),
        (5, "eval", {"loss": 0.8}),
        (5, "train", {"loss": 0.7}),
        (6, "train", {"loss": 0.6}),  # no step: previous training step + 1
        (6, "summary", {"train_runtime": 12.0, "train_loss": 0.8}),
    ]
    assert records[0].max_steps == 10 and records[0].line == 1


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"global_step/max_steps": "x/10"}', "cannot read"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "logging.jsonl"
    path.write_text('{"loss": 1.0}\n\n' + bad_line + "\n")
    with pytest.raises(TelemetryFormatError, match=f"logging.jsonl:3: {message}"):
        read_logging_jsonl(path)


def test_make_telemetry_report(tmp_path):
    run_dir = tmp_path / "output" / "v0-20250101-000000"  # ms-swift nests the run directory
    write_log(run_dir / "logging.jsonl", synthetic_log())
    config = AlertConfig(kd_spike_min_history=3, kd_spike_min_threshold=0.0)
    result = make_telemetry_report(tmp_path / "output", alert_config=config)

    assert result["source"] == str(run_dir / "logging.jsonl")
    assert (result["last_step"], result["max_steps"]) == (12, 12)
    assert [(a["step"], a["rule"], a["metric"]) for a in result["alerts"]] == [
        (4, "nonfinite", "vision_kd_loss"),
        (9, "llm_kd_loss_spike", "llm_kd_loss"),
    ]
    assert result["files"] == [str(run_dir / "telemetry_report.md"), str(run_dir / "telemetry.png")]
    assert is_png(run_dir / "telemetry.png")

    terms = {row["term"]: row for row in result["terms"]}
    assert list(terms) == ["loss", "sft_loss", "llm_kd_loss", "vision_kd_loss", "token_accuracy"]
    assert terms["loss"]["first"] == pytest.approx(1.9) and terms["loss"]["last"] == pytest.approx(0.8)
    assert terms["loss"]["last_eval"] == 1.5
    assert (terms["llm_kd_loss"]["max"], terms["llm_kd_loss"]["max_step"]) == (1.0, 9)
    assert terms["vision_kd_loss"]["min"] == 0.01  # the NaN is skipped in the summary

    markdown = (run_dir / "telemetry_report.md").read_text()
    assert "- records: 12 train, 2 eval; last step 12/12" in markdown
    assert "## Alerts (2)" in markdown
    assert "| 9 | llm_kd_loss_spike | llm_kd_loss | 1 | 0.3 |" in markdown
    assert "| 4 | nonfinite | vision_kd_loss | nan | – |" in markdown
    assert "![training telemetry](telemetry.png)" in markdown
    assert "| train_runtime | 99 |" in markdown


def test_telemetry_report_to_other_dir_without_alerts(tmp_path):
    log = write_log(
        tmp_path / "run" / "logging.jsonl",
        [{"loss": 1.0, "global_step/max_steps": f"{s}/3"} for s in (1, 2, 3)],
    )
    result = make_telemetry_report(log, out_dir=tmp_path / "out")
    assert result["alerts"] == []
    assert sorted(os.listdir(tmp_path / "out")) == ["telemetry.png", "telemetry_report.md"]
    assert "No alerts." in (tmp_path / "out" / "telemetry_report.md").read_text()
    assert not math.isnan(result["terms"][0]["last"])


def test_telemetry_report_missing_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="no logging.jsonl"):
        make_telemetry_report(tmp_path)


def test_telemetry_report_says_which_log_it_shows(tmp_path):
    """A run resumed by plain ms-swift (add_version) left its first part in an older folder."""
    older = write_log(
        tmp_path / "output" / "v0-20250101-000000" / "logging.jsonl",
        [{"loss": 1.0, "global_step/max_steps": f"{s}/4"} for s in (1, 2)],
    )
    newer = write_log(
        tmp_path / "output" / "v1-20250102-000000" / "logging.jsonl",
        [{"loss": 0.5, "global_step/max_steps": f"{s}/4"} for s in (3, 4)],
    )
    os.utime(older, (1, 1))
    result = make_telemetry_report(tmp_path / "output")
    assert result["source"] == str(newer)
    assert result["other_logs"] == [str(older)]
    markdown = (newer.parent / "telemetry_report.md").read_text()
    assert f"- shows the source log only; not included (1 other run log(s)): `{older}`" in markdown
    assert make_telemetry_report(newer)["other_logs"] == []


def test_swifts_end_of_run_message_is_not_a_step(tmp_path):
    records = [{"loss": 1.0, "global_step/max_steps": f"{s}/2"} for s in (1, 2)]
    records.append({"train_runtime": 3.0, "train_loss": 1.0, "global_step/max_steps": "2/2"})
    records.append(
        {"last_model_checkpoint": "x/checkpoint-2", "global_step": 2, "memory": 0, "log_history": []}
    )
    parsed = read_logging_jsonl(write_log(tmp_path / "logging.jsonl", records))
    assert [(r.step, r.split) for r in parsed] == [(1, "train"), (2, "train"), (2, "summary")]
