"""Evaluation commands without a model: scoring saved captions, the text-regression gate, the report.

Everything here runs on hand-written files; the model-backed steps are faked at the one seam where a
checkpoint would be loaded, so the CLI plumbing (arguments, files, exit statuses) is what is tested.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anchorkd import cli
from anchorkd.eval import text_eval
from anchorkd.eval.compare import compare_runs, run_metrics
from anchorkd.eval.provenance import git_revision, package_versions
from anchorkd.eval.score import perplexity_change_pct, read_generations, score_generations
from anchorkd.eval.text_eval import EXIT_TEXT_REGRESSION
from anchorkd.io import sha256_file

SUMMARY_KEYS = {
    "ood_domain_object_rate",
    "chair_i",
    "chair_s",
    "object_recall",
    "indomain_f1",
    "indomain_name_f1",
    "bleu",
    "rouge_l",
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ score

GENERATIONS = [
    {
        "id": "in-1",
        "scene": "indoor",
        "style": "dense",
        "caption": "rack: [0, 0, 500, 1000]\ntower: [600, 0, 700, 900]",
        "reference": "rack: [0, 0, 500, 1000]",
        "objects": [{"name": "rack", "box": [0, 0, 500, 1000]}],
    },
    {
        "id": "out-1",
        "scene": "outdoor",
        "style": "general",
        "caption": "A tower with an antenna next to a rack.",
        "reference": "An outdoor view of a tower with an antenna.",
        "objects": [{"name": "tower", "box": [0, 0, 10, 10]}, {"name": "antenna", "box": [0, 0, 5, 5]}],
    },
    {"id": "text-1", "scene": "text", "style": "text", "caption": "Paris.", "reference": "Paris."},
]


def test_score_counts_hallucinations_and_skips_text_records(tmp_path):
    generations = write_jsonl(tmp_path / "generations.jsonl", GENERATIONS)

    scores = score_generations(generations)

    summary = scores["summary"]
    assert set(summary) == SUMMARY_KEYS
    # in-1 names rack (true) and tower (hallucinated); out-1 names tower, antenna (true), rack (leaked).
    assert summary["chair_i"] == pytest.approx(2 / 5)
    assert summary["chair_s"] == 1.0
    assert summary["ood_domain_object_rate"] == 1.0
    assert summary["object_recall"] == 1.0
    assert summary["indomain_f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert scores["skipped_records"] == {"text": 1}
    # The compare step also reports the OOD rate per out-of-domain group (scene/style) and per scene.
    per_group = {k: v for k, v in run_metrics(scores).items() if k.startswith("ood_domain_object_rate_")}
    assert per_group == {"ood_domain_object_rate_outdoor_general": 1.0, "ood_domain_object_rate_outdoor": 1.0}
    assert [s["id"] for s in scores["samples"]] == ["in-1", "out-1"]
    assert scores["generations"]["sha256"] == sha256_file(generations)
    assert scores["versions"]["anchorkd"] is not None


def test_score_command_writes_scores_json(tmp_path, capsys):
    generations = write_jsonl(tmp_path / "generations.jsonl", GENERATIONS)

    assert cli.main(["eval", "score", "--generations", str(generations), "--out", str(tmp_path / "out")]) == 0

    written = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert set(written["summary"]) == SUMMARY_KEYS
    assert {"overall", "groups", "samples"} <= set(written)
    assert json.loads(capsys.readouterr().out.split("\nanchorkd:")[0]) == written["summary"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"id": "x", "scene": "indoor", "style": "dense"}), "caption"),
        (json.dumps(["a", "list"]), "JSON object"),
    ],
)
def test_score_names_file_and_line_of_a_bad_record(tmp_path, capsys, bad_line, message):
    path = tmp_path / "generations.jsonl"
    path.write_text(json.dumps(GENERATIONS[0]) + "\n\n" + bad_line + "\n", encoding="utf-8")

    assert cli.main(["eval", "score", "--generations", str(path)]) == 2

    error = capsys.readouterr().err
    assert f"{path}:3:" in error
    assert message in error


def test_score_rejects_a_file_without_captions(tmp_path):
    from anchorkd.errors import DataError

    with pytest.raises(DataError, match="no caption records"):
        read_generations(write_jsonl(tmp_path / "generations.jsonl", [GENERATIONS[2]]))


def test_score_with_an_invalid_lexicon_is_bad_input(tmp_path, capsys):
    generations = write_jsonl(tmp_path / "generations.jsonl", GENERATIONS[:1])
    lexicon = tmp_path / "lexicon.yaml"
    lexicon.write_text("objects: {Rack: {synonyms: [rack], domain: true}}\n")

    assert cli.main(["eval", "score", "--generations", str(generations), "--lexicon", str(lexicon)]) == 2
    assert "lexicon.yaml: objects.Rack" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ text gate


def test_perplexity_change_is_relative_to_the_base():
    assert perplexity_change_pct(110.0, 100.0) == pytest.approx(10.0)
    assert perplexity_change_pct(95.0, 100.0) == pytest.approx(-5.0)
    assert perplexity_change_pct(7.0, 7.0) == 0.0
    with pytest.raises(ValueError):
        perplexity_change_pct(1.0, 0.0)


@pytest.fixture
def fake_text_model(tmp_path, monkeypatch):
    """Make ``eval text`` measure a given perplexity instead of loading a checkpoint.

    Returns a setter for the perplexity, the (dummy) model folder and a text data file.
    """
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    data = write_jsonl(
        tmp_path / "text_eval.jsonl",
        [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}],
    )
    measured = {"ppl": 100.0}

    class FakeLoadedModel:
        def describe(self):
            return {"model": str(model_dir), "adapter": None}

    def fake_perplexity(model, adapter, data_file, batch_size=8, **_):
        ppl = measured["ppl"]
        return {"ppl": ppl, "nll": math.log(ppl), "tokens": 3, "samples": 1, "per_sample": []}

    monkeypatch.setattr(text_eval, "as_loaded_model", lambda model, adapter=None, **_: FakeLoadedModel())
    monkeypatch.setattr(text_eval, "text_perplexity", fake_perplexity)

    def set_ppl(value: float) -> None:
        measured["ppl"] = value

    return set_ppl, model_dir, data


def base_text_eval(tmp_path: Path, data: Path, ppl: float, sha256: str | None = None) -> Path:
    """A hand-written text_eval.json of a base model (the "fake ppl file")."""
    document = {"model": "/models/base", "ppl": ppl, "nll": math.log(ppl), "tokens": 3}
    document["data"] = {"path": str(data), "sha256": sha256 or sha256_file(data)}
    return write_json(tmp_path / "base" / "text_eval.json", document)


@pytest.mark.parametrize(
    ("ppl", "max_pct", "expected_exit", "change"),
    [
        (110.0, 5.0, EXIT_TEXT_REGRESSION, 10.0),
        (104.0, 5.0, 0, 4.0),
        (105.0, 5.0, 0, 5.0),  # the limit itself is allowed
        (90.0, 5.0, 0, -10.0),  # better than base
        (110.0, 15.0, 0, 10.0),
    ],
)
def test_text_gate_exit_status(tmp_path, fake_text_model, ppl, max_pct, expected_exit, change):
    set_ppl, model_dir, data = fake_text_model
    set_ppl(ppl)
    base_file = base_text_eval(tmp_path, data, 100.0)
    out = tmp_path / "out"

    status = cli.main(
        ["eval", "text", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
        + ["--base-text-eval", str(base_file), "--max-regression-pct", str(max_pct)]
    )

    assert status == expected_exit
    document = json.loads((out / "text_eval.json").read_text())
    assert document["ppl"] == ppl
    assert document["base"]["ppl"] == 100.0
    assert document["ppl_change_pct"] == pytest.approx(change)
    assert document["regressed"] is (expected_exit == EXIT_TEXT_REGRESSION)
    assert document["data"]["sha256"] == sha256_file(data)


def test_text_without_base_has_no_verdict(tmp_path, fake_text_model):
    _, model_dir, data = fake_text_model

    out = tmp_path / "out"
    assert cli.main(["eval", "text", "--model", str(model_dir), "--data", str(data), "--out", str(out)]) == 0

    document = json.loads((out / "text_eval.json").read_text())
    assert (document["base"], document["ppl_change_pct"], document["regressed"]) == (None, None, None)


def test_text_base_measured_on_other_data_is_rejected(tmp_path, fake_text_model, capsys):
    _, model_dir, data = fake_text_model
    base_file = base_text_eval(tmp_path, data, 100.0, sha256="0" * 64)

    status = cli.main(
        ["eval", "text", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out")]
        + ["--base-text-eval", str(base_file)]
    )

    assert status == 2
    assert f"{base_file}: was measured on different data" in capsys.readouterr().err


def test_text_base_adapter_needs_a_base(tmp_path, fake_text_model, capsys):
    _, model_dir, data = fake_text_model
    adapter = tmp_path / "adapter"

    status = cli.main(
        ["eval", "text", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out")]
        + ["--base-adapter", str(adapter)]
    )

    assert status == 2
    assert "--base-adapter" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ paths


def test_missing_checkpoint_adapter_and_data_are_named(tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Describe."},
                    {"role": "assistant", "content": "A rack."},
                ]
            }
        ],
    )
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    out = str(tmp_path / "out")

    def run(*args: str) -> tuple[int, str]:
        status = cli.main(["eval", "generate", *args, "--out", out])
        return status, capsys.readouterr().err

    status, error = run("--model", str(tmp_path / "nope"), "--data", str(data))
    assert status == 2 and f"checkpoint not found: {tmp_path / 'nope'}" in error
    status, error = run("--model", str(model_dir), "--adapter", str(tmp_path / "lora"), "--data", str(data))
    assert status == 2 and f"adapter not found: {tmp_path / 'lora'}" in error
    status, error = run("--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl"))
    assert status == 2 and f"{tmp_path / 'missing.jsonl'}: data file not found" in error
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\n')
    status, error = run("--model", str(model_dir), "--data", str(tmp_path / "broken.jsonl"))
    assert status == 2 and f"{tmp_path / 'broken.jsonl'}:1:" in error
    assert not (tmp_path / "out" / "generations.jsonl").exists()


# ------------------------------------------------------------------------------------------ compare


def scores_document(summary: dict, samples: list[dict]) -> dict:
    return {"summary": summary, "overall": {"captions": len(samples), "mentions": 4}, "samples": samples}


def sample(sample_id: str, style: str, caption: str, hallucinated: list[str]) -> dict:
    return {
        "id": sample_id,
        "scene": "indoor",
        "style": style,
        "caption": caption,
        "reference": "ref " + style,
        "ground_truth": ["rack"],
        "hallucinated": hallucinated,
        "hallucinated_spans": [],
    }


BASE_SUMMARY = dict.fromkeys(SUMMARY_KEYS, 0.5) | {"chair_i": 0.25, "bleu": None}
SFT_SUMMARY = dict.fromkeys(SUMMARY_KEYS, 0.4) | {"chair_i": 0.5, "ood_domain_object_rate": 0.75}
GKD_SUMMARY = dict.fromkeys(SUMMARY_KEYS, 0.3) | {"chair_i": 0.125}


@pytest.fixture
def eval_folders(tmp_path) -> dict[str, Path]:
    folders = {}
    for name, summary, ppl in (
        ("base", BASE_SUMMARY, 20.0),
        ("sft", SFT_SUMMARY, 25.0),
        ("gkd", GKD_SUMMARY, 20.5),
    ):
        folder = tmp_path / name
        samples = [
            # The same image asked for a dense list and a description: one id, two styles.
            sample("img-1", "dense", f"{name} dense caption", ["tower"] if name == "sft" else []),
            sample("img-1", "general", f"{name} general caption", []),
        ]
        write_json(folder / "scores.json", scores_document(summary, samples))
        write_json(folder / "text_eval.json", {"ppl": ppl, "nll": math.log(ppl), "tokens": 40})
        folders[name] = folder
    return folders


def test_compare_report_holds_the_inputs(tmp_path, eval_folders):
    out = tmp_path / "report"

    metrics = compare_runs(eval_folders, out, base_name="base")

    document = json.loads((out / "report.json").read_text())
    assert document["runs"] == metrics
    assert list(document["runs"]) == ["base", "sft", "gkd"]
    for name, summary in (("base", BASE_SUMMARY), ("sft", SFT_SUMMARY), ("gkd", GKD_SUMMARY)):
        run = document["runs"][name]
        assert {key: run[key] for key in SUMMARY_KEYS} == summary
        assert (run["captions"], run["mentions"], run["text_tokens"]) == (2, 4, 40)
    assert [document["runs"][n]["text_ppl"] for n in ("base", "sft", "gkd")] == [20.0, 25.0, 20.5]
    changes = [document["runs"][n]["text_ppl_change_pct"] for n in ("base", "sft", "gkd")]
    assert changes == pytest.approx([0.0, 25.0, 2.5])
    assert document["metadata"]["base run"] == "base"
    for name in ("report.md", "hallucination.png", "quality.png", "text_ppl_change.png"):
        assert (out / name).is_file()
    markdown = (out / "report.md").read_text()
    # Both captions of the shared id survive, side by side, for every run.
    assert "img-1 (dense)" in markdown and "img-1 (general)" in markdown
    assert "sft dense caption" in markdown and "gkd general caption" in markdown


def test_compare_without_base_perplexity_keeps_recorded_changes(tmp_path, eval_folders):
    (eval_folders["base"] / "text_eval.json").unlink()
    write_json(eval_folders["sft"] / "text_eval.json", {"ppl": 25.0, "ppl_change_pct": 12.0})

    metrics = compare_runs(eval_folders, tmp_path / "report", base_name="base")

    assert "text_ppl" not in metrics["base"]
    assert metrics["sft"]["text_ppl_change_pct"] == 12.0
    assert metrics["gkd"]["text_ppl_change_pct"] is None


def test_compare_command(tmp_path, eval_folders, capsys):
    out = tmp_path / "report"
    runs = [arg for name, folder in eval_folders.items() for arg in ("--run", f"{name}={folder}")]

    assert cli.main(["eval", "compare", *runs, "--out", str(out), "--title", "Anchoring"]) == 0
    assert json.loads((out / "report.json").read_text())["title"] == "Anchoring"

    assert cli.main(["eval", "compare", *runs, "--base-name", "teacher", "--out", str(out)]) == 2
    assert "'teacher' is not one of the runs" in capsys.readouterr().err
    missing = ["--run", f"other={tmp_path / 'absent'}"]
    assert cli.main(["eval", "compare", *runs, *missing, "--out", str(out)]) == 2
    assert f"evaluation folder not found: {tmp_path / 'absent'}" in capsys.readouterr().err
    assert cli.main(["eval", "compare", *runs[:2], *runs[:2], "--out", str(out)]) == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "compare", "--run", "no-equals-sign", "--out", str(out)])
    assert exit_info.value.code == 2


def test_compare_folder_without_scores_is_named(tmp_path, eval_folders, capsys):
    (eval_folders["gkd"] / "scores.json").unlink()
    runs = [arg for name, folder in eval_folders.items() for arg in ("--run", f"{name}={folder}")]

    assert cli.main(["eval", "compare", *runs, "--out", str(tmp_path / "report")]) == 2
    assert f"{eval_folders['gkd'] / 'scores.json'}: not found" in capsys.readouterr().err


# Modules that load or run a model; comparing finished evaluations must not even import them.
MODEL_MODULES = (
    "anchorkd.eval.model",
    "anchorkd.eval.generate",
    "anchorkd.eval.text_eval",
    "anchorkd.eval.evaluate",
    "swift",
    "transformers",
    "torch",
)


def test_comparison_never_imports_model_code(eval_folders, tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        model_modules, runs, out = json.loads(sys.argv[1])
        import anchorkd.eval.compare as compare
        after_import = [m for m in model_modules if m in sys.modules]
        compare.compare_runs(runs, out, base_name="base")
        after_run = [m for m in model_modules if m in sys.modules]
        print(json.dumps([after_import, after_run]))
        """
    )
    arguments = [
        MODEL_MODULES,
        {name: str(folder) for name, folder in eval_folders.items()},
        str(tmp_path / "out"),
    ]
    completed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(arguments)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
    )
    assert json.loads(completed.stdout.splitlines()[-1]) == [[], []]
    assert (tmp_path / "out" / "report.json").is_file()  # the comparison really ran


# ------------------------------------------------------------------------------------------ provenance


def test_provenance_records_versions_and_revision(tmp_path):
    versions = package_versions()
    assert versions["anchorkd"] and versions["ms-swift"] and versions["transformers"] and versions["torch"]
    assert git_revision(tmp_path) is None  # not a git work tree: recorded as unknown, not an error
    revision = git_revision(Path(__file__).parent)
    if revision is not None:
        assert len(revision["commit"]) == 40 and isinstance(revision["dirty"], bool)
