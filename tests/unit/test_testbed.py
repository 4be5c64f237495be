"""Testbed bookkeeping: the base cache key and the aggregation over seeds (no training here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anchorkd.demo import testbed as tb


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def testbed(tmp_path) -> tb.TestbedPaths:
    """A fake testbed folder: model files, a two-record base set with one image, the base recipe."""
    paths = tb.TestbedPaths(tmp_path / "tb", tmp_path / "configs")
    paths.model.mkdir(parents=True)
    (paths.model / "anchorkd_tiny.json").write_text('{"seed": 0}')
    (paths.model / "model.safetensors").write_bytes(b"weights")
    (paths.data / "images").mkdir(parents=True)
    (paths.data / "images" / "a.png").write_bytes(b"pixels")
    paths.configs.mkdir()
    (paths.configs / "base.yaml").write_text("training: {max_steps: 3}\n")
    _write_jsonl(paths.data / "base_train.jsonl", _records(paths.data / "images" / "a.png"))
    return paths


def _records(image: Path, caption: str = "A rack.", meta_id: str = "base-00000") -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": "<image>Describe."},
                {"role": "assistant", "content": caption},
            ],
            "images": [str(image)],
            "meta": {"id": meta_id, "objects": []},
        },
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ]


def test_base_cache_key_ignores_meta_and_image_location(testbed):
    key = tb.base_cache_key(testbed, tb.TestbedSizes(), seed=0)
    moved = testbed.data / "moved.png"
    shutil.copy(testbed.data / "images" / "a.png", moved)
    _write_jsonl(testbed.data / "base_train.jsonl", _records(moved, meta_id="renamed"))
    assert tb.base_cache_key(testbed, tb.TestbedSizes(), seed=0) == key
    # Nor does a comment in the recipe.
    recipe = testbed.configs / "base.yaml"
    recipe.write_text("# the base recipe\n" + recipe.read_text())
    assert tb.base_cache_key(testbed, tb.TestbedSizes(), seed=0) == key


@pytest.mark.parametrize(
    "change",
    ["caption", "image bytes", "recipe", "steps", "seed", "model weights"],
)
def test_base_cache_key_changes_with_what_training_sees(testbed, change):
    key = tb.base_cache_key(testbed, tb.TestbedSizes(), seed=0)
    sizes, seed = tb.TestbedSizes(), 0
    if change == "caption":
        _write_jsonl(
            testbed.data / "base_train.jsonl", _records(testbed.data / "images" / "a.png", "Two racks.")
        )
    elif change == "image bytes":
        (testbed.data / "images" / "a.png").write_bytes(b"other pixels")
    elif change == "recipe":
        (testbed.configs / "base.yaml").write_text("training: {max_steps: 4}\n")
    elif change == "steps":
        sizes = tb.TestbedSizes(base_steps=301)
    elif change == "seed":
        seed = 1
    else:
        (testbed.model / "model.safetensors").write_bytes(b"other weights")
    assert tb.base_cache_key(testbed, sizes, seed=seed) != key


def test_aggregate_seeds_gives_mean_and_sample_std():
    per_seed = {
        0: {"base": {"text_ppl": 9.0, "note": "x"}, "sft": {"text_ppl": 20.0, "ok": True}},
        1: {"base": {"text_ppl": 9.0, "note": "y"}, "sft": {"text_ppl": 30.0, "ok": True}},
        2: {"base": {"text_ppl": 9.0, "note": "z"}, "sft": {"text_ppl": 40.0, "ok": True}},
    }
    runs = tb.aggregate_seeds(per_seed)
    assert list(runs) == ["base", "sft"]
    assert runs["sft"] == {"seeds": 3, "text_ppl": 30.0, "text_ppl_std": 10.0}
    assert runs["base"] == {"seeds": 3, "text_ppl": 9.0, "text_ppl_std": 0.0}
    single = tb.aggregate_seeds({0: per_seed[0]})
    assert single["sft"]["text_ppl_std"] == 0.0 and single["sft"]["seeds"] == 1


def test_demo_command_offers_every_testbed_run():
    from anchorkd.cli import DEFAULT_DEMO_RUNS, DEMO_RUNS

    assert tuple(tb.DOMAIN_RUNS) == DEMO_RUNS
    assert tb.DEFAULT_RUNS == DEFAULT_DEMO_RUNS and set(DEFAULT_DEMO_RUNS) < set(DEMO_RUNS)
    assert all((tb.testbed_paths("unused").configs / run.config).is_file() for run in tb.DOMAIN_RUNS.values())


def test_demo_runs_the_default_selection_unless_told():
    from anchorkd import cli

    parser = cli.build_parser()
    assert tuple(parser.parse_args(["demo"]).runs) == tb.DEFAULT_RUNS
    assert parser.parse_args(["demo", "--runs", "all"]).runs == ["all"]
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--runs", "gkd_nothing"])
