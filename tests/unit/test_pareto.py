"""The Pareto report: domain skill against the share of SFT's excess OOD hallucination removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anchorkd import cli
from anchorkd.eval.pareto import (
    ParetoPoint,
    dominates,
    excess_removed_keys,
    pareto_frontier,
    pareto_points,
    pareto_series,
)
from anchorkd.eval.report import (
    PARETO_FRONTIER_GID,
    PARETO_POINTS_GID,
    pareto_figure,
    write_comparison_report,
)


def frontier_runs(points) -> list[str]:
    return [point.run for point in pareto_frontier(points)]


# ------------------------------------------------------------------------------------------- frontier


def test_frontier_keeps_ties_and_drops_dominated_runs():
    points = [
        ParetoPoint("tie_a", 0.3, 0.5),
        ParetoPoint("tie_b", 0.3, 0.5),  # identical: neither beats the other
        ParetoPoint("worse_both", 0.2, 0.4),
        ParetoPoint("equal_y_less_x", 0.2, 0.5),  # beaten by tie_a: as good on y, better on x
        ParetoPoint("cautious", 0.1, 0.9),
        ParetoPoint("skilled", 0.4, 0.1),
        ParetoPoint("equal_x_less_y", 0.4, 0.05),  # beaten by skilled
    ]
    assert frontier_runs(points) == ["skilled", "tie_a", "tie_b", "cautious"]  # best skill first
    assert not dominates(points[0], points[1]) and not dominates(points[1], points[0])
    assert dominates(points[0], points[3]) and not dominates(points[3], points[0])
    assert frontier_runs([ParetoPoint("only", 0.0, -0.5)]) == ["only"]
    assert pareto_frontier([]) == []


def test_points_from_a_table_with_references_and_seed_spread():
    runs = {
        "base": {"indomain_f1": 0.05, "indomain_f1_std": 0.01},
        "sft": {"indomain_f1": 0.40, "indomain_f1_std": 0.03},
        "multi": {"indomain_f1": 0.30, "indomain_f1_std": 0.02, "ood_excess_removed_near": 0.6},
        "single": {"indomain_f1": 0.20, "ood_excess_removed_near": 0.7},
        "no_skill": {"ood_excess_removed_near": 0.9},  # no in-domain F1: no point
    }
    # The testbed's excess removed is a ratio of seed means: its spread comes from the seeds' values.
    per_seed = {
        0: {"multi": {"ood_excess_removed_near": 0.5}, "single": {"ood_excess_removed_near": 0.7}},
        1: {"multi": {"ood_excess_removed_near": 0.7}},
    }
    points = pareto_points(
        runs, "indomain_f1", "ood_excess_removed_near", base_run="base", drift_run="sft", per_seed=per_seed
    )

    by_run = {point.run: point for point in points}
    assert list(by_run) == ["base", "sft", "multi", "single"]
    assert (by_run["base"].y, by_run["sft"].y) == (1.0, 0.0)
    assert by_run["base"].reference and by_run["sft"].reference and not by_run["multi"].reference
    assert (by_run["base"].x_std, by_run["base"].y_std) == (0.01, None)
    assert (by_run["multi"].x, by_run["multi"].y, by_run["multi"].x_std) == (0.30, 0.6, 0.02)
    assert by_run["multi"].y_std == pytest.approx(0.1414, abs=1e-4)  # sample std of 0.5 and 0.7
    assert (by_run["single"].x_std, by_run["single"].y_std) == (None, None)  # one seed: no spread
    assert frontier_runs(points) == ["sft", "multi", "single", "base"]

    # Without an excess value in any other run, the references alone make no plane.
    assert pareto_points(runs, "indomain_f1", "ood_excess_removed_far", base_run="base") == []


def test_series_cover_each_skill_and_excess_key():
    runs = {
        "a": {"indomain_f1": 0.3, "ood_excess_removed": 0.5, "ood_excess_removed_far": 0.4},
        "b": {"indomain_f1": 0.2, "indomain_name_f1": 0.6, "ood_excess_removed_far": 0.9},
        "c": {"ood_excess_removed_far_std": 0.1, "ood_excess_removed_near": float("nan")},
    }
    assert excess_removed_keys(runs) == ["ood_excess_removed", "ood_excess_removed_far"]
    planes = [(s.skill_key, s.excess_key, [p.run for p in s.frontier]) for s in pareto_series(runs)]
    assert planes == [
        ("indomain_f1", "ood_excess_removed", ["a"]),
        ("indomain_f1", "ood_excess_removed_far", ["a", "b"]),
        ("indomain_name_f1", "ood_excess_removed_far", ["b"]),
    ]


# ----------------------------------------------------------------------------------------------- chart

TABLE = {
    "base": {"indomain_f1": 0.05, "indomain_name_f1": 0.10},
    "sft": {"indomain_f1": 0.40, "indomain_name_f1": 0.60},
    "gkd": {
        "indomain_f1": 0.35,
        "indomain_f1_std": 0.02,
        "indomain_name_f1": 0.55,
        "ood_excess_removed_near": 0.75,
        "ood_excess_removed_far": 0.5,
    },
    "weak": {
        "indomain_f1": 0.30,
        "indomain_name_f1": 0.50,
        "ood_excess_removed_near": 0.5,
        "ood_excess_removed_far": 0.5,
    },
}


def count_points(figure, gid: str) -> list[int]:
    """Points drawn per panel in the scatter collections with matplotlib group id ``gid``."""
    return [
        sum(len(collection.get_offsets()) for collection in ax.collections if collection.get_gid() == gid)
        for ax in figure.axes
    ]


def test_figure_draws_one_point_per_run_and_group_and_rings_the_frontier():
    series = pareto_series(TABLE, base_run="base", drift_run="sft")
    figure = pareto_figure(series, list(TABLE), "sft")

    # Two panels (field F1, name F1) x two groups (near, far) x four runs (base and sft as references).
    assert count_points(figure, PARETO_POINTS_GID) == [8, 8]
    # field F1: near: sft, gkd, base (weak beaten by gkd); far: the same. name F1: the same.
    assert count_points(figure, PARETO_FRONTIER_GID) == [6, 6]
    # One error bar per point with a spread: gkd's field F1, in each group.
    assert [len(ax.containers) for ax in figure.axes] == [2, 0]
    assert [ax.get_xlabel() for ax in figure.axes] == [
        "In-domain field F1, % (higher is better)",
        "In-domain name F1, % (higher is better)",
    ]


def test_report_writes_the_chart_the_frontier_table_and_json(tmp_path):
    written = write_comparison_report(tmp_path, TABLE, base_run="base", drift_run="sft")

    assert tmp_path / "pareto.png" in written
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")
    markdown = (tmp_path / "report.md").read_text()
    assert "## Domain skill against hallucination removed (Pareto frontier)" in markdown
    assert (
        "| In-domain field F1 | near-OOD families | `sft` (reference) (40.0%, 0.0%), "
        "`gkd` (35.0% ± 2.0, 75.0%), `base` (reference) (5.0%, 100.0%) |"
    ) in markdown
    assert "![Domain skill vs excess removed](pareto.png)" in markdown
    document = json.loads((tmp_path / "report.json").read_text())
    assert [(s["skill"], s["excess_removed"], s["frontier"]) for s in document["pareto"]] == [
        ("indomain_f1", "ood_excess_removed_near", ["sft", "gkd", "base"]),
        ("indomain_f1", "ood_excess_removed_far", ["sft", "gkd", "base"]),
        ("indomain_name_f1", "ood_excess_removed_near", ["sft", "gkd", "base"]),
        ("indomain_name_f1", "ood_excess_removed_far", ["sft", "gkd", "base"]),
    ]


def test_report_without_excess_removed_has_no_pareto_chart(tmp_path):
    runs = {name: {k: v for k, v in m.items() if "excess" not in k} for name, m in TABLE.items()}
    write_comparison_report(tmp_path, runs, base_run="base", drift_run="sft")

    assert not (tmp_path / "pareto.png").exists()
    assert "Pareto" not in (tmp_path / "report.md").read_text()
    assert "pareto" not in json.loads((tmp_path / "report.json").read_text())


# ------------------------------------------------------------------------------ through `eval compare`

# Per run: field F1, name F1, and how many of 10 captions name a domain object per OOD scene.
FOLDERS = {
    "base": (0.05, 0.10, {"outdoor": 0, "field": 1}),
    "sft": (0.40, 0.60, {"outdoor": 8, "field": 9}),
    "gkd": (0.35, 0.55, {"outdoor": 2, "field": 5}),
    "anchor": (0.30, 0.58, {"outdoor": 1, "field": 3}),
    "weak": (0.30, 0.50, {"outdoor": 4, "field": 5}),
}


def scores_document(field_f1: float, name_f1: float, leaks: dict[str, int]) -> dict:
    groups = {
        f"{scene}/dense": {
            "ood_captions": 10,
            "ood_captions_with_domain_object": leaked,
            "ood_domain_object_rate": leaked / 10,
        }
        for scene, leaked in leaks.items()
    }
    groups["indoor/dense"] = {"ood_captions": 0, "ood_captions_with_domain_object": 0}
    return {
        "summary": {
            "indomain_f1": field_f1,
            "indomain_name_f1": name_f1,
            "ood_domain_object_rate": sum(leaks.values()) / (10 * len(leaks)),
        },
        "groups": groups,
    }


@pytest.fixture
def eval_folders(tmp_path) -> dict[str, Path]:
    folders = {}
    for name, (field_f1, name_f1, leaks) in FOLDERS.items():
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        (folder / "scores.json").write_text(json.dumps(scores_document(field_f1, name_f1, leaks)))
        folders[name] = folder
    return folders


def compare_args(folders: dict[str, Path], out: Path) -> list[str]:
    runs = [arg for name, folder in folders.items() for arg in ("--run", f"{name}={folder}")]
    groups = ["--scene-group", "near=outdoor", "--scene-group", "far=field"]
    return ["eval", "compare", *runs, "--out", str(out), *groups]


def test_compare_with_a_drift_run_reports_the_frontier(tmp_path, eval_folders):
    out = tmp_path / "report"
    assert cli.main([*compare_args(eval_folders, out), "--drift-run", "sft"]) == 0

    document = json.loads((out / "report.json").read_text())
    frontiers = {(s["skill"], s["excess_removed"]): s["frontier"] for s in document["pareto"]}
    # near: sft 80% -> gkd 20% removes 75%, anchor 10% removes 87.5%, weak 40% removes 50%.
    assert frontiers[("indomain_f1", "ood_excess_removed_near")] == ["sft", "gkd", "anchor", "base"]
    # With names only, anchor (58%) outdoes gkd (55%) and removes more: gkd drops off.
    assert frontiers[("indomain_name_f1", "ood_excess_removed_near")] == ["sft", "anchor", "base"]
    # far: gkd and weak both remove 50%, gkd with more skill.
    assert frontiers[("indomain_f1", "ood_excess_removed_far")] == ["sft", "gkd", "anchor", "base"]
    assert len(frontiers) == 6  # every OOD caption, near, far; for each skill
    points = {p["run"]: p for p in document["pareto"][0]["points"]}
    assert document["pareto"][0]["excess_removed"] == "ood_excess_removed"
    assert points["anchor"]["y"] == pytest.approx((0.85 - 0.2) / 0.8)
    assert (out / "pareto.png").is_file()
    markdown = (out / "report.md").read_text()
    assert "| In-domain name F1 | near-OOD families | `sft` (reference) (60.0%, 0.0%), `anchor`" in markdown

    # No drifting run: no excess removed, no Pareto chart.
    plain = tmp_path / "plain"
    assert cli.main(compare_args(eval_folders, plain)) == 0
    assert not (plain / "pareto.png").exists() and "pareto" not in json.loads(
        (plain / "report.json").read_text()
    )


def test_compare_with_the_pareto_chart_never_imports_model_code(tmp_path, eval_folders):
    script = textwrap.dedent(
        """
        import json, sys
        runs, out = json.loads(sys.argv[1])
        from anchorkd.eval.compare import compare_runs
        compare_runs(runs, out, scene_groups={"near": ["outdoor"]}, drift_name="sft")
        model_modules = ("anchorkd.eval.model", "anchorkd.eval.generate", "swift", "transformers", "torch")
        print(json.dumps([m for m in model_modules if m in sys.modules]))
        """
    )
    out = tmp_path / "out"
    arguments = [{name: str(folder) for name, folder in eval_folders.items()}, str(out)]
    completed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(arguments)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
    )
    assert json.loads(completed.stdout.splitlines()[-1]) == []
    assert (out / "pareto.png").is_file()  # the chart really was drawn
