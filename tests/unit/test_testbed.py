"""Testbed bookkeeping: the base cache key and the aggregation over seeds (no training here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anchorkd.demo import testbed as tb
from anchorkd.errors import DataError


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
    from anchorkd.cli import DEFAULT_DEMO_RUNS, DEMO_RUN_GROUPS, DEMO_RUNS

    assert tuple(tb.DOMAIN_RUNS) == DEMO_RUNS
    assert tb.RUN_GROUPS == DEMO_RUN_GROUPS and not set(DEMO_RUN_GROUPS) & set(DEMO_RUNS)
    assert tb.DEFAULT_RUNS == DEFAULT_DEMO_RUNS == ("sft", "gkd", "gkd_anchor")
    configs = tb.testbed_paths("unused").configs
    for run in tb.DOMAIN_RUNS.values():
        assert (configs / run.config).is_file() if run.config else run.checkpoint_of in tb.DOMAIN_RUNS


def test_demo_runs_the_default_selection_unless_told():
    from anchorkd import cli

    parser = cli.build_parser()
    assert tuple(parser.parse_args(["demo"]).runs) == tb.DEFAULT_RUNS
    assert parser.parse_args(["demo", "--runs", "all"]).runs == ["all"]
    assert parser.parse_args(["demo", "--runs", "baselines", "gkd_visual"]).runs == [
        "baselines",
        "gkd_visual",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--runs", "gkd_nothing"])


# --- the runs of issue 16: definitions, selection, anchor set, replay set -----------------------------------


def _fake_paths(tmp_path) -> tb.TestbedPaths:
    return tb.testbed_paths(tmp_path / "tb")


def _value(overrides: list[str], key: str) -> str | None:
    found = [text.split("=", 1)[1] for text in overrides if text.split("=", 1)[0] == key]
    assert len(found) <= 1, (key, overrides)
    return found[0] if found else None


@pytest.mark.parametrize(
    ("name", "config", "extra"),
    [
        ("sft", "domain_sft.yaml", []),
        ("gkd", "domain_gkd.yaml", []),
        ("gkd_anchor", "domain_gkd_anchor.yaml", []),
        ("gkd_anchor_w1", "domain_gkd_anchor.yaml", ["rlhf.llm_kd_weight=1.0"]),
        ("gkd_anchor_w2", "domain_gkd_anchor.yaml", ["rlhf.llm_kd_weight=2.0"]),
        (
            "gkd_anchor_aw1r025",
            "domain_gkd_anchor.yaml",
            ["custom.anchor.weight=1.0", "custom.anchor.ratio=0.25"],
        ),
        ("gkd_anchor_r025", "domain_gkd_anchor.yaml", ["custom.anchor.ratio=0.25"]),
        ("anchor_only", "domain_anchor_only.yaml", []),
        ("replay", "domain_replay.yaml", []),
        ("gkd_cached", "domain_gkd.yaml", []),
        ("gkd_anchor_cached", "domain_gkd_anchor.yaml", []),
    ],
)
def test_each_trained_run_gets_its_recipe_and_overrides(tmp_path, name, config, extra):
    paths, sizes = _fake_paths(tmp_path), tb.TestbedSizes()
    run = tb.DOMAIN_RUNS[name]
    assert run.config == config and run.checkpoint_of is None
    overrides = tb.training_overrides(name, paths, Path("/base"), sizes, seed=2, replay_rows_per_step=1)
    assert overrides[len(overrides) - len(extra) :] == extra  # the run's own overrides come last
    assert _value(overrides, "model.model") == "/base"
    assert _value(overrides, "training.seed") == "2"
    assert _value(overrides, "training.output_dir") == str(paths.root / "seed-2" / "runs" / name)
    assert _value(overrides, "training.max_steps") == "100"
    anchored = name.startswith("gkd_anchor") or name == "anchor_only"
    assert _value(overrides, "custom.anchor.dataset") == (f"[{paths.anchor_set}]" if anchored else None)
    assert _value(overrides, "custom.teacher_targets.cache_dir") == (
        str(paths.teacher_targets) if anchored else None
    )
    assert _value(overrides, "custom.teacher_cache") == (
        str(paths.teacher_cache(Path("/base"))) if name.endswith("_cached") else None
    )
    if name.endswith("_cached"):  # the live run trained from the teacher cache; nothing else differs
        live = tb.training_overrides(name.removesuffix("_cached"), paths, Path("/base"), sizes, seed=2)
        differs = {"training.output_dir", "custom.teacher_cache"}
        assert [o for o in overrides if o.split("=")[0] not in differs] == [
            o for o in live if o.split("=")[0] not in differs
        ]
    if name == "replay":  # the domain rows and the replay rows, one more row per step for the replay row
        assert _value(overrides, "data.dataset") == f"[{paths.replay_set}]"
        assert _value(overrides, "training.per_device_train_batch_size") == "5"
    else:
        assert _value(overrides, "data.dataset") == f"[{paths.data / 'train.jsonl'}]"
        assert _value(overrides, "training.per_device_train_batch_size") == "4"


@pytest.mark.parametrize(
    ("name", "mode", "kd_weight", "anchored"),
    [
        ("gkd_anchor", "gkd", 5.0, True),
        ("gkd_anchor_w1", "gkd", 1.0, True),
        ("gkd_anchor_w2", "gkd", 2.0, True),
        ("gkd_anchor_aw1r025", "gkd", 5.0, True),  # the first stated anchor setting (below)
        ("gkd_anchor_r025", "gkd", 5.0, True),  # ... and its ratio at the default weight
        ("anchor_only", "gkd", 0.0, True),  # CE alone on the domain rows, KD on the anchor rows only
        ("replay", "sft", None, False),  # ms-swift's SFT trainer: CE only, no teacher
        ("gkd", "gkd", 5.0, False),
        ("gkd_cached", "gkd", 5.0, False),
        ("gkd_anchor_cached", "gkd", 5.0, True),
    ],
)
def test_each_run_resolves_to_what_it_claims(tmp_path, name, mode, kd_weight, anchored):
    from anchorkd.config import ConfigLoader

    paths = _fake_paths(tmp_path)
    overrides = tb.training_overrides(
        name, paths, tmp_path / "base", tb.TestbedSizes(), 0, replay_rows_per_step=1
    )
    config = ConfigLoader.resolve(paths.configs / tb.DOMAIN_RUNS[name].config, overrides, check_files=False)
    assert config.mode == mode
    assert config.custom.anchor.active is anchored
    if anchored:
        # The default: the anchor rows at the domain rows' KD weight 5, half of each step.
        expected = {"gkd_anchor_aw1r025": (1.0, 0.25), "gkd_anchor_r025": (5.0, 0.25)}.get(name, (5.0, 0.5))
        assert (config.custom.anchor.weight, config.custom.anchor.ratio) == expected
        assert config.sections["rlhf"]["max_completion_length"] == 160
    if kd_weight is None:
        assert "rlhf_type" not in config.sections.get("rlhf", {})
    else:
        assert config.llm_kd_weight == kd_weight
    assert (config.custom.teacher_cache is not None) is name.endswith("_cached")


def test_wise_runs_train_nothing_and_scale_the_sft_adapter(tmp_path):
    wise = {name: run for name, run in tb.DOMAIN_RUNS.items() if run.checkpoint_of is not None}
    assert {name: (run.checkpoint_of, run.adapter_scale) for name, run in wise.items()} == {
        "sft_wise0.25": ("sft", 0.25),
        "sft_wise0.5": ("sft", 0.5),
        "sft_wise0.75": ("sft", 0.75),
    }
    assert all(run.config is None for run in wise.values())
    with pytest.raises(ValueError, match="trains nothing"):
        tb.training_overrides("sft_wise0.5", _fake_paths(tmp_path), Path("/base"), tb.TestbedSizes(), 0)


def test_replay_needs_its_rows_per_step(tmp_path):
    with pytest.raises(ValueError, match="replay rows per step"):
        tb.training_overrides("replay", _fake_paths(tmp_path), Path("/base"), tb.TestbedSizes(), 0)


def test_selected_runs_bring_the_checkpoint_they_scale_and_keep_the_testbed_order():
    assert tb.selected_runs(("gkd_anchor", "sft", "gkd")) == ("sft", "gkd", "gkd_anchor")
    assert tb.selected_runs(("sft_wise0.5",)) == ("sft", "sft_wise0.5")
    assert tb.selected_runs(tb.RUN_GROUPS["all"]) == tuple(tb.DOMAIN_RUNS)
    with pytest.raises(ValueError, match="gkd_nothing"):
        tb.selected_runs(("gkd_nothing",))


def test_the_run_loop_trains_each_run_once_and_evaluates_wise_runs_on_the_seeds_sft(tmp_path, monkeypatch):
    """The seed loop with the model work faked: which runs train, on what, and what each evaluation gets."""
    import anchorkd.eval.compare as compare
    import anchorkd.eval.report as report
    import anchorkd.eval.score as score

    trained, evaluated, built = [], [], []

    def train(name, paths, base, sizes, seed, replay_rows_per_step=0):
        trained.append((name, seed, replay_rows_per_step))
        return Path(f"/ckpt/{name}-{seed}")

    def evaluate(name, paths, base, adapter, sizes, seed, base_text_ppl=None, adapter_scale=None):
        evaluated.append((name, seed, adapter, adapter_scale))
        return tmp_path / f"eval-{name}-{seed}"

    monkeypatch.setattr(tb, "prepare_demo_assets", lambda *a, **k: None)
    monkeypatch.setattr(tb, "build_base", lambda paths, sizes: (Path("/base"), True))
    monkeypatch.setattr(tb, "build_testbed_anchor_set", lambda paths, sizes: built.append("anchor_set"))
    monkeypatch.setattr(tb, "build_replay_set", lambda paths, base, sizes: built.append("replay") or 1)
    monkeypatch.setattr(
        tb, "build_teacher_cache", lambda paths, base, sizes, runs: built.append(("teacher_cache", runs))
    )
    monkeypatch.setattr(tb, "train_domain_run", train)
    monkeypatch.setattr(tb, "evaluate_run", evaluate)
    monkeypatch.setattr(score, "read_text_eval", lambda path: {"ppl": 10.0})
    monkeypatch.setattr(compare, "compare_runs", lambda eval_dirs, *a, **k: {n: {} for n in eval_dirs})
    monkeypatch.setattr(compare, "example_captions", lambda eval_dirs: [])
    monkeypatch.setattr(report, "write_comparison_report", lambda *a, **k: None)

    tb.run_testbed(tmp_path / "tb", seeds=(0, 1), runs=("sft_wise0.25", "replay", "sft_wise0.75"))
    assert trained == [("sft", 0, 0), ("replay", 0, 1), ("sft", 1, 0), ("replay", 1, 1)]
    assert built == ["anchor_set", "replay"]  # built once, for every seed
    assert evaluated == [
        ("base", 0, None, None),
        ("sft", 0, Path("/ckpt/sft-0"), None),
        ("replay", 0, Path("/ckpt/replay-0"), None),
        ("sft_wise0.25", 0, Path("/ckpt/sft-0"), 0.25),
        ("sft_wise0.75", 0, Path("/ckpt/sft-0"), 0.75),
        ("sft", 1, Path("/ckpt/sft-1"), None),
        ("replay", 1, Path("/ckpt/replay-1"), None),
        ("sft_wise0.25", 1, Path("/ckpt/sft-1"), 0.25),
        ("sft_wise0.75", 1, Path("/ckpt/sft-1"), 0.75),
    ]
    trained.clear(), built.clear()
    tb.run_testbed(tmp_path / "tb", runs=tb.DEFAULT_RUNS)
    assert [name for name, _, _ in trained] == ["sft", "gkd", "gkd_anchor"] and built == ["anchor_set"]
    trained.clear(), built.clear()
    tb.run_testbed(tmp_path / "tb", seeds=(0, 1), runs=tb.RUN_GROUPS["cache"])
    cache_runs = ("sft", "gkd", "gkd_anchor", "gkd_cached", "gkd_anchor_cached")  # the testbed's order
    assert [name for name, _, _ in trained] == [*cache_runs, *cache_runs]
    assert built == ["anchor_set", ("teacher_cache", cache_runs)]  # the top-k cache: once, for every seed


def _answered_row(kind: str, number: int, answer: str) -> dict:
    row = {
        "messages": [
            {"role": "user", "content": "Why?" if kind == "text" else "<image>Ask."},
            {"role": "assistant", "content": answer},
        ],
        "meta": {"id": f"anchor-{kind}-{number:05d}", "kind": kind, "prompt": 0},
        "teacher_target": {"key": f"k{kind}{number}", "finish_reason": "stop"},
    }
    if kind != "text":
        row["images"] = [f"/img/{kind}-{number}.png"]
    return row


def test_replay_set_is_the_domain_rows_and_anchor_rows_with_the_bases_answers(tmp_path):
    domain = [
        {
            "messages": [
                {"role": "user", "content": "<image>List."},
                {"role": "assistant", "content": f"- rack: [{i}, 0, 1, 1]"},
            ],
            "images": [f"/img/train-{i}.png"],
            "meta": {"id": f"train-{i:05d}", "scene": "indoor", "style": "dense", "objects": []},
        }
        for i in range(16)
    ]
    answered = [
        _answered_row(kind, number, f"base answer {kind} {number}")
        for kind, count in (("training_prompts", 6), ("general", 3), ("text", 3))
        for number in range(count)
    ]
    _write_jsonl(tmp_path / "train.jsonl", domain)
    _write_jsonl(tmp_path / "answered.jsonl", answered)

    written = tb.write_replay_set(
        tmp_path / "train.jsonl", tmp_path / "answered.jsonl", tmp_path / "replay.jsonl", 1, 4
    )
    rows = [json.loads(line) for line in (tmp_path / "replay.jsonl").read_text().splitlines()]
    # One replay row per four domain rows, the anchor set's shares per kind (2 / 1 / 1).
    assert written == 4 and len(rows) == 20
    assert rows[:16] == domain
    replay = rows[16:]
    assert [row["meta"]["style"] for row in replay] == [
        "training_prompts",
        "training_prompts",
        "general",
        "text",
    ]
    by_id = {row["meta"]["id"]: row for row in answered}
    for row in replay:
        source = by_id[row["meta"]["id"].removeprefix("replay-")]
        # The base's answer is the row's assistant turn: plain SFT rows, trained with CE.
        assert row["messages"] == source["messages"]
        assert row["messages"][-1] == {"role": "assistant", "content": source["messages"][-1]["content"]}
        assert row.get("images") == source.get("images")
        assert set(row) <= {"messages", "images", "meta"}  # no teacher provenance in the training rows
        assert set(row["meta"]) == set(domain[0]["meta"])  # meta shaped like the domain rows'
    assert len({row["meta"]["id"] for row in replay}) == 4  # no row twice while the kind has rows left

    unanswered = answered[:1] + [{**answered[1], "messages": answered[1]["messages"][:1]}]
    _write_jsonl(tmp_path / "unanswered.jsonl", unanswered)
    with pytest.raises(DataError, match=r"unanswered.jsonl:2: an anchor row without the teacher's answer"):
        tb.write_replay_set(
            tmp_path / "train.jsonl", tmp_path / "unanswered.jsonl", tmp_path / "r.jsonl", 1, 4
        )


def test_replay_answers_come_from_the_anchored_runs_teacher_job(tmp_path, monkeypatch):
    """The replay rows' answers are the anchored runs' (the same job: the same cache entries)."""
    import anchorkd.trainers.teacher_targets as targets
    from anchorkd.config import ConfigLoader

    paths, sizes = _fake_paths(tmp_path), tb.TestbedSizes()
    jobs = []

    def write(job):
        jobs.append(job)
        return {job.sources[0]: tmp_path / "answered.jsonl"}, None

    monkeypatch.setattr(targets, "write_teacher_targets", write)
    answered, ratio = tb.answered_anchor_set(paths, tmp_path / "base", sizes)
    assert answered == tmp_path / "answered.jsonl" and ratio == 0.5
    for name in ("gkd_anchor", "gkd_anchor_w2", "anchor_only"):
        overrides = tb.training_overrides(name, paths, tmp_path / "base", sizes, seed=1)
        config = ConfigLoader.resolve(
            paths.configs / tb.DOMAIN_RUNS[name].config, overrides, check_files=False
        )
        assert targets.TargetJob.for_anchor_prompts(config) == jobs[0], name
    assert jobs[0].sources == (paths.anchor_set.resolve(),) and jobs[0].keep_answers
    assert jobs[0].cache_dir == paths.teacher_targets and jobs[0].settings.max_new_tokens == 160


def test_the_testbed_anchor_set_is_built_by_the_command_from_the_domain_prompt_on_near_ood_images(
    tmp_path, synthetic_data_dir
):
    from anchorkd.demo.synthetic import DENSE_PROMPT, GENERAL_PROMPT, NEAR_OOD_FAMILIES

    paths = _fake_paths(tmp_path)
    paths.root.mkdir(parents=True)
    (paths.root / "data").symlink_to(synthetic_data_dir, target_is_directory=True)
    sizes = tb.TestbedSizes.quick()
    built = tb.build_testbed_anchor_set(paths, sizes)
    assert built == paths.anchor_set
    rows = [json.loads(line) for line in built.read_text().splitlines()]
    kinds = [row["meta"]["kind"] for row in rows]
    assert len(rows) == sizes.anchor_rows == 8
    assert {kind: kinds.count(kind) for kind in tb.ANCHOR_SHARES} == {
        "training_prompts": 4,
        "general": 2,
        "text": 2,
    }
    assert all("assistant" not in [m["role"] for m in row["messages"]] for row in rows)  # the base answers
    prompts = {
        kind: {row["messages"][-1]["content"] for row in rows if row["meta"]["kind"] == kind}
        for kind in tb.ANCHOR_SHARES
    }
    assert prompts["training_prompts"] == {DENSE_PROMPT} and prompts["general"] == {GENERAL_PROMPT}

    anchor_split = [
        json.loads(line) for line in (synthetic_data_dir / "anchor.jsonl").read_text().splitlines()
    ]
    scene_of = {image: r["meta"]["scene"] for r in anchor_split for image in r.get("images", [])}
    used = [image for row in rows for image in row.get("images", [])]
    assert used and {scene_of[image] for image in used} <= set(NEAR_OOD_FAMILIES)  # no indoor, no field
    questions = {r["messages"][0]["content"] for r in anchor_split if "images" not in r}
    assert prompts["text"] <= questions
    # No image of a training or eval set (the builder checks SHA-256; the synthetic images are all distinct).
    elsewhere = {
        image
        for name in ("train.jsonl", *tb.EVAL_FILES)
        for line in (synthetic_data_dir / name).read_text().splitlines()
        for image in json.loads(line).get("images", [])
    }
    assert not set(used) & elsewhere
    summary = json.loads((paths.anchor_set_dir / "anchors.summary.json").read_text())
    assert summary["images"]["available"] == 2 * len(NEAR_OOD_FAMILIES)  # SyntheticSizes.quick(): 2 a family
    assert {reason: v["count"] for reason, v in summary["excluded_images"].items()} == {
        "in_training": 0,
        "in_eval": 0,
        "repeated": 0,
    }
    # Deterministic: a second build writes the same bytes, so the teacher's cached answers still match.
    first = built.read_bytes()
    assert tb.build_testbed_anchor_set(paths, sizes).read_bytes() == first


def test_demo_expands_named_selections_into_runs(tmp_path, monkeypatch, capsys):
    from anchorkd import cli

    asked = []

    def fake_testbed(root, configs, seeds, sizes, runs):
        asked.append(runs)
        return tb.TestbedResult(tmp_path, {"base": {}}, timings_s={"total": 1.0})

    monkeypatch.setattr(tb, "run_testbed", fake_testbed)
    assert cli.main(["demo", "--root", str(tmp_path), "--runs", "baselines", "gkd_visual", "sft"]) == 0
    assert cli.main(["demo", "--root", str(tmp_path)]) == 0
    assert asked == [(*tb.RUN_GROUPS["baselines"], "gkd_visual"), tb.DEFAULT_RUNS]
    assert "report in" in capsys.readouterr().out
