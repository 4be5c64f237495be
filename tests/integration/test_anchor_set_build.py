"""``anchorkd anchors build`` on the synthetic demo data, then the anchor recipe on the set it wrote: the
two-command flow of ``configs/recipes/anchor_prompts.yaml`` (build, then validate and train)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import gkd_harness as h
import pytest

from anchorkd.cli import main
from anchorkd.data.anchor_set import summary_path_for

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_ANCHOR = REPO_ROOT / "configs" / "demo" / "anchor_prompts.yaml"
ROWS = 8  # 4 training-prompt rows, 2 general, 2 text


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_hashes(files: list[Path]) -> set[str]:
    return {sha(image) for path in files for row in h.read_jsonl(path) for image in row.get("images", [])}


def eval_files(data: Path) -> list[Path]:
    return sorted(data.glob("eval_*.jsonl"))


@pytest.fixture(scope="module")
def anchors(synthetic_data_dir, tmp_path_factory) -> Path:
    """The demo's dense-caption prompt and the shipped general prompts on the data's own image folder (every
    image it drew), with the training set and every eval set left out; the shipped text questions."""
    out = tmp_path_factory.mktemp("anchor-set") / "anchors.jsonl"
    data = Path(synthetic_data_dir)
    args = ["anchors", "build", "--train", str(data / "train.jsonl"), "--images", str(data / "images")]
    args += ["--eval", *map(str, eval_files(data)), "--out", str(out), "--rows", str(ROWS)]
    assert main(args) == 0
    return out


def test_the_set_asks_the_domain_prompt_about_images_of_no_training_or_eval_set(anchors, synthetic_data_dir):
    data = Path(synthetic_data_dir)
    rows = h.read_jsonl(anchors)
    assert Counter(row["meta"]["kind"] for row in rows) == {"training_prompts": 4, "general": 2, "text": 2}
    dense_prompt = h.read_jsonl(data / "train.jsonl")[0]["messages"][0]["content"]
    assert {row["messages"][0]["content"] for row in rows if row["meta"]["kind"] == "training_prompts"} == {
        dense_prompt
    }
    used = {sha(image) for row in rows for image in row.get("images", [])}
    training, evals = image_hashes([data / "train.jsonl"]), image_hashes(eval_files(data))
    assert used and not used & (training | evals)
    summary = json.loads(summary_path_for(anchors).read_text())
    excluded = summary["excluded_images"]
    # Every image of those sets lies in the folder, so each is left out exactly once.
    assert excluded["in_training"]["count"] == len(training)
    assert excluded["in_eval"]["count"] == len(evals - training)
    assert summary["images"]["candidates"] == len(list((data / "images").glob("*.png")))


def test_validate_and_a_two_step_run_take_the_built_set(anchors, in_demo_workdir, quick_overrides, capsys):
    cache = in_demo_workdir / "anchor-set-cache"
    overrides = [
        f"custom.anchor.dataset=[{anchors}]",
        f"custom.teacher_targets.cache_dir={cache}",
        "rlhf.max_completion_length=6",
    ]
    assert main(["validate", str(DEMO_ANCHOR), *overrides]) == 0, capsys.readouterr().err
    assert f"{DEMO_ANCHOR}: OK (gkd" in capsys.readouterr().out

    output_dir = in_demo_workdir / "runs" / "anchor-set"
    result = h.run_training(DEMO_ANCHOR, [*overrides, *quick_overrides(output_dir, steps=2, batch=2)])
    records = h.step_records(Path(result["logging_jsonl"]))
    assert len(records) == 2
    assert any(record["anchor_kd_loss"] > 0 for record in records)
    # The base answered every prompt-only row once, before training.
    (answered,) = (cache / "datasets").glob("anchors-*.jsonl")
    answered_rows = h.read_jsonl(answered)
    assert len(answered_rows) == ROWS
    assert all(row["messages"][-1]["role"] == "assistant" for row in answered_rows)
