"""Demo assets: one preparation path with one staleness rule (the stamp each builder leaves)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from anchorkd.demo import assets, testbed, tiny_model
from anchorkd.demo.synthetic import GENERATOR_VERSION, MANIFEST_FILE, SyntheticSizes


@pytest.fixture
def model_builds(monkeypatch) -> list[int]:
    """Replace the (slow) tiny-model build with one that writes only its stamp; record the seeds built."""
    seeds: list[int] = []

    def fake_make_tiny_model(out_dir, seed=0, sizes=None):
        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not empty")
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = {"seed": seed, "sizes": asdict(sizes or tiny_model.TinyQwen3VLSizes()), "parameters": 1}
        (out_dir / assets.TINY_MODEL_STAMP).write_text(json.dumps(stamp))
        seeds.append(seed)
        return out_dir

    monkeypatch.setattr(tiny_model, "make_tiny_model", fake_make_tiny_model)
    return seeds


def _manifest(root: Path) -> dict:
    return json.loads((root / assets.DATA_DIR / MANIFEST_FILE).read_text())


def test_assets_are_reused_while_their_stamps_match(tmp_path, model_builds):
    paths = assets.prepare_demo_assets(tmp_path, seed=0, quick=True)
    assert paths == {"model": tmp_path / "tiny-qwen3-vl", "data": tmp_path / "data"}
    assert model_builds == [0]
    manifest = _manifest(tmp_path)
    assert (manifest["generator"], manifest["seed"]) == (GENERATOR_VERSION, 0)
    assert manifest["sizes"] == asdict(SyntheticSizes.quick())
    marker = tmp_path / "data" / "marker"  # would vanish if the data set were rebuilt
    marker.write_text("kept")

    assert assets.prepare_demo_assets(tmp_path, seed=0, quick=True) == paths
    assert model_builds == [0]
    assert marker.read_text() == "kept"


@pytest.mark.parametrize("change", ["seed", "generator", "data sizes", "model sizes", "unreadable stamp"])
def test_assets_are_rebuilt_when_their_stamp_differs(tmp_path, model_builds, change):
    assets.prepare_demo_assets(tmp_path, seed=0, quick=True)
    (tmp_path / "data" / "marker").write_text("old")
    seed = 0
    manifest_path = tmp_path / "data" / MANIFEST_FILE
    model_stamp = tmp_path / "tiny-qwen3-vl" / assets.TINY_MODEL_STAMP
    if change == "seed":
        seed = 1
    elif change == "generator":
        manifest_path.write_text(json.dumps(_manifest(tmp_path) | {"generator": "anchorkd-synthetic-0"}))
    elif change == "data sizes":
        manifest = _manifest(tmp_path)
        manifest_path.write_text(json.dumps(manifest | {"sizes": manifest["sizes"] | {"domain_train": 7}}))
    elif change == "model sizes":
        stamp = json.loads(model_stamp.read_text())
        model_stamp.write_text(json.dumps(stamp | {"sizes": stamp["sizes"] | {"text_layers": 3}}))
    else:
        model_stamp.write_text("{not json")
        manifest_path.write_text("{not json")

    assets.prepare_demo_assets(tmp_path, seed=seed, quick=True)

    model_rebuilt = change in ("seed", "model sizes", "unreadable stamp")
    data_rebuilt = change in ("seed", "generator", "data sizes", "unreadable stamp")
    assert model_builds == ([0, seed] if model_rebuilt else [0])
    assert (tmp_path / "data" / "marker").exists() is not data_rebuilt
    manifest = _manifest(tmp_path)
    assert (manifest["generator"], manifest["seed"]) == (GENERATOR_VERSION, seed)
    assert manifest["sizes"] == asdict(SyntheticSizes.quick())


def test_a_folder_without_stamp_is_not_overwritten(tmp_path, model_builds):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        assets.prepare_demo_assets(tmp_path, seed=0, quick=True)
    assert (tmp_path / "data" / "mine.txt").read_text() == "user data"


def test_testbed_reads_the_assets_where_they_are_prepared(tmp_path):
    paths = testbed.TestbedPaths(tmp_path, tmp_path / "configs")
    assert (paths.model, paths.data) == (tmp_path / assets.TINY_MODEL_DIR, tmp_path / assets.DATA_DIR)
