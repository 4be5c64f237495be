"""Per-family OOD rates, scene groups (near / far OOD) and the share of SFT's excess removed in compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchorkd import cli
from anchorkd.eval.compare import compare_runs, excess_removed, pooled_ood_rate
from anchorkd.eval.lexicon import load_lexicon
from anchorkd.eval.metrics import score_captions

TOWER = [{"name": "tower", "box": [0, 0, 5, 9]}]


def record(scene: str, style: str, caption: str, index: int) -> dict:
    return {
        "id": f"{scene}-{style}-{index}",
        "scene": scene,
        "style": style,
        "caption": caption,
        "reference": "An outdoor view of a tower.",
        "objects": TOWER,
    }


def captions(leaks: dict[tuple[str, str], int], per_group: int = 4) -> list[dict]:
    """``per_group`` captions per (scene, style); the first ``leaks[(scene, style)]`` name a rack."""
    records = []
    for scene in ("outdoor", "kitchen", "field"):
        for style in ("general", "dense"):
            for i in range(per_group):
                leaked = i < leaks.get((scene, style), 0)
                text = "A tower and a rack." if leaked else "A tower."
                records.append(record(scene, style, text if style == "general" else f"- {text}", i))
    return records


RUNS = {
    "base": {("field", "general"): 1},
    "sft": {
        ("outdoor", "dense"): 4,
        ("kitchen", "dense"): 4,
        ("outdoor", "general"): 2,
        ("field", "dense"): 4,
        ("field", "general"): 3,
    },
    "gkd": {("outdoor", "dense"): 1, ("field", "dense"): 2},
}


@pytest.fixture
def eval_folders(tmp_path) -> dict[str, Path]:
    lexicon = load_lexicon()
    folders = {}
    for name, leaks in RUNS.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "scores.json").write_text(json.dumps(score_captions(captions(leaks), lexicon)))
        folders[name] = folder
    return folders


def test_pooled_rate_and_excess_removed_by_hand():
    groups = {
        "a/general": {"ood_captions": 4, "ood_captions_with_domain_object": 1},
        "a/dense": {"ood_captions": 6, "ood_captions_with_domain_object": 3},
        "b/dense": {"ood_captions": 10, "ood_captions_with_domain_object": 10},
        "indoor/dense": {"ood_captions": 0, "ood_captions_with_domain_object": 0},
    }
    assert pooled_ood_rate(groups, ["a"]) == pytest.approx(4 / 10)
    assert pooled_ood_rate(groups, ["a", "b"]) == pytest.approx(14 / 20)
    assert pooled_ood_rate(groups, ["indoor"]) is None
    with pytest.raises(TypeError):
        pooled_ood_rate(groups, "a")  # one string would match its letters
    assert excess_removed(0.1, 0.9, 0.1) == pytest.approx(1.0)
    assert excess_removed(0.5, 0.9, 0.1) == pytest.approx(0.5)
    assert excess_removed(1.0, 0.9, 0.1) == pytest.approx(-0.125)
    assert excess_removed(0.2, 0.1, 0.1) is None  # no excess to remove
    assert excess_removed(None, 0.9, 0.1) is None


def test_compare_reports_per_family_groups_and_excess_removed(tmp_path, eval_folders):
    metrics = compare_runs(
        eval_folders,
        tmp_path / "report",
        scene_groups={"near": ["outdoor", "kitchen"], "far": ["field"]},
        drift_name="sft",
    )

    sft, gkd, base = metrics["sft"], metrics["gkd"], metrics["base"]
    assert sft["ood_domain_object_rate_outdoor"] == pytest.approx(6 / 8)
    assert sft["ood_domain_object_rate_kitchen"] == pytest.approx(4 / 8)
    assert sft["ood_domain_object_rate_field"] == pytest.approx(7 / 8)
    assert sft["ood_domain_object_rate_near"] == pytest.approx(10 / 16)
    assert sft["ood_domain_object_rate_far"] == pytest.approx(7 / 8)
    assert gkd["ood_domain_object_rate_near"] == pytest.approx(1 / 16)
    assert base["ood_domain_object_rate_far"] == pytest.approx(1 / 8)
    assert "ood_domain_object_rate_indoor" not in sft
    # (sft - run) / (sft - base), per group and over every OOD caption.
    assert gkd["ood_excess_removed_near"] == pytest.approx((10 / 16 - 1 / 16) / (10 / 16 - 0))
    assert gkd["ood_excess_removed_far"] == pytest.approx((7 / 8 - 2 / 8) / (7 / 8 - 1 / 8))
    assert gkd["ood_excess_removed"] == pytest.approx((17 / 24 - 3 / 24) / (17 / 24 - 1 / 24))
    # The base and the drifting run are the reference points (1 and 0 by definition): not reported.
    assert "ood_excess_removed_far" not in base and "ood_excess_removed" not in sft

    document = json.loads((tmp_path / "report" / "report.json").read_text())
    assert document["runs"]["gkd"]["ood_excess_removed_far"] == pytest.approx(5 / 6)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Excess removed: held-out family" in markdown and "OOD rate: near-OOD families" in markdown


def test_compare_command_takes_scene_groups_and_a_drift_run(tmp_path, eval_folders, capsys):
    runs = [arg for name, folder in eval_folders.items() for arg in ("--run", f"{name}={folder}")]
    out = tmp_path / "report"
    args = [
        "eval",
        "compare",
        *runs,
        "--out",
        str(out),
        "--scene-group",
        "near=outdoor,kitchen",
        "--scene-group",
        "far=field",
        "--drift-run",
        "sft",
    ]
    assert cli.main(args) == 0
    runs_document = json.loads((out / "report.json").read_text())["runs"]
    assert runs_document["gkd"]["ood_excess_removed_near"] == pytest.approx(0.9)

    assert cli.main([*args[:-1], "teacher"]) == 2
    assert "'teacher' is not one of the runs" in capsys.readouterr().err
    assert cli.main([*args[:-1], "base"]) == 2
    assert "'base' is the base run" in capsys.readouterr().err
    assert cli.main([*args, "--scene-group", "far=kitchen"]) == 2
    assert "group name 'far' is given twice" in capsys.readouterr().err
    assert cli.main([*args[:-4], "--scene-group", "far=fields"]) == 2
    assert "group 'far' names scenes no run was evaluated on: fields" in capsys.readouterr().err
    assert cli.main([*args[:-4], "--scene-group", "outdoor=kitchen"]) == 2
    assert "group name 'outdoor' is also a scene" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--scene-group", "near="])
    assert exit_info.value.code == 2
