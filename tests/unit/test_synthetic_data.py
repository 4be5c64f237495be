"""Unit tests for the synthetic dense-caption data set generator."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anchorkd.data.dense_caption import parse_dense_caption
from anchorkd.demo import synthetic
from anchorkd.demo.scenes import OBJECTS_BY_KIND, draw_scene
from anchorkd.demo.synthetic import (
    BASE_FAMILIES,
    CAPTION_WORDS,
    DEFAULT_BOX_GRID,
    DENSE_PROMPT,
    DOMAIN_FAMILY,
    GENERAL_PROMPT,
    HELD_OUT_FAMILIES,
    MANIFEST_FILE,
    NEAR_OOD_FAMILIES,
    OOD_FAMILIES,
    SPLIT_FILES,
    SyntheticSizes,
    generate_text_samples,
    make_synthetic_data,
    normalise_box,
)
from anchorkd.eval.lexicon import load_lexicon

EVAL_OOD_SPLITS = tuple(f"eval_{family}{suffix}" for family in OOD_FAMILIES for suffix in ("", "_dense"))
IMAGE_SPLITS = ("base_train", "train", "val", "eval_indoor", "eval_indoor_general", *EVAL_OOD_SPLITS)
# What every image split must hold: (scene kinds allowed, style, prompt).
SPLIT_CONTENT = {
    "train": ({"indoor"}, "dense", DENSE_PROMPT),
    "val": ({"indoor"}, "dense", DENSE_PROMPT),
    "eval_indoor": ({"indoor"}, "dense", DENSE_PROMPT),
    "eval_indoor_general": ({"indoor"}, "general", GENERAL_PROMPT),
    **{f"eval_{family}": ({family}, "general", GENERAL_PROMPT) for family in OOD_FAMILIES},
    **{f"eval_{family}_dense": ({family}, "dense", DENSE_PROMPT) for family in OOD_FAMILIES},
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def image_records(splits: dict[str, Path]) -> list[tuple[str, dict]]:
    return [(split, rec) for split in IMAGE_SPLITS for rec in read_jsonl(splits[split]) if "images" in rec]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return make_synthetic_data(
        tmp_path_factory.mktemp("synthetic") / "data", seed=0, sizes=SyntheticSizes.quick()
    )


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(tmp_path):
    # Image paths are absolute, so both runs must target the same folder to be comparable byte for byte.
    out = tmp_path / "data"
    make_synthetic_data(out, seed=3, sizes=SyntheticSizes.quick())
    first = tree_bytes(out)
    make_synthetic_data(out, seed=3, sizes=SyntheticSizes.quick(), overwrite=True)
    second = tree_bytes(out)
    assert first.keys() == second.keys()
    assert any(name.endswith(".png") for name in first)
    assert first == second


def test_different_seed_gives_different_data(tmp_path):
    a = make_synthetic_data(tmp_path / "a", seed=0, sizes=SyntheticSizes.quick())
    b = make_synthetic_data(tmp_path / "b", seed=1, sizes=SyntheticSizes.quick())
    captions_a = [r["messages"][1]["content"] for r in read_jsonl(a["train"])]
    captions_b = [r["messages"][1]["content"] for r in read_jsonl(b["train"])]
    assert captions_a != captions_b
    png = "images/train-00000.png"
    assert (tmp_path / "a" / png).read_bytes() != (tmp_path / "b" / png).read_bytes()


def test_eval_images_do_not_depend_on_training_split_sizes(tmp_path):
    small = SyntheticSizes.quick()
    bigger = SyntheticSizes(**{**asdict(small), "domain_train": small.domain_train + 5, "base_images": 7})
    make_synthetic_data(tmp_path / "small", seed=0, sizes=small)
    make_synthetic_data(tmp_path / "bigger", seed=0, sizes=bigger)
    for name in ("eval-indoor-00000.png", "eval-outdoor-00002.png", "val-00001.png"):
        assert (tmp_path / "small/images" / name).read_bytes() == (
            tmp_path / "bigger/images" / name
        ).read_bytes()


def test_draw_scene_is_a_pure_function_of_the_generator():
    first = draw_scene("outdoor", np.random.default_rng(11), 128)
    second = draw_scene("outdoor", np.random.default_rng(11), 128)
    assert first.objects == second.objects
    assert first.image.tobytes() == second.image.tobytes()


# --- layout and schema ----------------------------------------------------------------------------


def test_returns_every_split_file(dataset):
    assert set(dataset) == set(SPLIT_FILES)
    root = dataset["train"].parent
    for split, path in dataset.items():
        assert path == root / SPLIT_FILES[split]
        assert path.is_file()
        assert path.read_text(encoding="utf-8").endswith("\n")
    assert (root / MANIFEST_FILE).is_file()
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_record_schema(dataset):
    for split in set(SPLIT_FILES) - {"anchor"}:
        records = read_jsonl(dataset[split])
        assert records, split
        # An id names an image; base_train may hold one image under both prompts, never twice under one.
        ids = [(r["meta"]["id"], r["meta"]["style"]) for r in records]
        assert len(ids) == len(set(ids)), f"duplicate ids in {split}"
        for rec in records:
            assert set(rec) <= {"messages", "images", "meta"}
            user, assistant = rec["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert assistant["content"].strip()
            meta = rec["meta"]
            assert set(meta) == {"id", "scene", "style", "objects"}
            if meta["scene"] == "text":
                assert "images" not in rec
                assert meta["style"] == "text" and meta["objects"] == []
                assert "<image>" not in user["content"]
                continue
            assert len(rec["images"]) == 1 and Path(rec["images"][0]).is_absolute()
            assert user["content"].count("<image>") == 1
            assert meta["objects"], "an image record without objects"
            if split in SPLIT_CONTENT:
                scenes, style, prompt = SPLIT_CONTENT[split]
                assert meta["scene"] in scenes and meta["style"] == style and user["content"] == prompt
            else:
                assert split == "base_train"
                prompt = DENSE_PROMPT if meta["style"] == "dense" else GENERAL_PROMPT
                assert user["content"] == prompt
                # The base may know the box format, but never from an indoor (domain) image, and it never
                # sees the held-out family.
                assert meta["scene"] in BASE_FAMILIES
                assert meta["style"] == "general" or meta["scene"] in NEAR_OOD_FAMILIES
    for split in ("text", "text_eval"):
        assert all(r["meta"]["scene"] == "text" for r in read_jsonl(dataset[split]))


def test_base_train_mixes_the_known_families_and_text_shuffled(dataset):
    records = read_jsonl(dataset["base_train"])
    sizes = SyntheticSizes.quick()
    kinds = Counter((r["meta"]["scene"], r["meta"]["style"]) for r in records)
    assert kinds == {
        **{(family, "general"): sizes.base_images for family in BASE_FAMILIES},
        **{(family, "dense"): sizes.base_dense for family in NEAR_OOD_FAMILIES},
        ("text", "text"): sizes.base_text,
    }
    assert DOMAIN_FAMILY not in NEAR_OOD_FAMILIES and not set(HELD_OUT_FAMILIES) & set(BASE_FAMILIES)
    # The dense outdoor records reuse base images that also have a general caption.
    general = {r["images"][0] for r in records if r["meta"]["style"] == "general"}
    assert {r["images"][0] for r in records if r["meta"]["style"] == "dense"} <= general
    ids = [r["meta"]["id"] for r in records]
    assert ids != sorted(ids), "base_train is not shuffled"
    text_in_base = [r for r in records if r["meta"]["scene"] == "text"]
    assert sorted(text_in_base, key=lambda r: r["meta"]["id"]) == read_jsonl(dataset["text"])


def test_images_exist_open_and_have_the_configured_size(dataset):
    root = dataset["train"].parent
    referenced = set()
    for _, rec in image_records(dataset):
        path = Path(rec["images"][0])
        assert path.parent == root / "images"
        referenced.add(path)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (192, 192)
    referenced |= {Path(rec["images"][0]) for rec in read_jsonl(dataset["anchor"]) if "images" in rec}
    assert referenced == set((root / "images").glob("*.png")), "unreferenced or missing images"


def test_image_size_is_configurable(tmp_path):
    sizes = SyntheticSizes(
        base_images=1,
        base_dense=1,
        base_text=1,
        domain_train=2,
        domain_val=1,
        eval_indoor=1,
        image_size=96,
    )
    splits = make_synthetic_data(tmp_path / "small", seed=5, sizes=sizes)
    for _, rec in image_records(splits):
        with Image.open(rec["images"][0]) as image:
            assert image.size == (96, 96)


# --- annotations and captions ---------------------------------------------------------------------


def test_dense_captions_round_trip_to_meta_objects(dataset):
    lexicon = load_lexicon()  # maps each dense-caption word ("lamp post") to its canonical object ("pole")
    dense = [rec for _, rec in image_records(dataset) if rec["meta"]["style"] == "dense"]
    dense_splits = ("train", "val", "eval_indoor", *(f"eval_{family}_dense" for family in OOD_FAMILIES))
    expected = sum(
        len(read_jsonl(dataset[s])) for s in dense_splits
    ) + SyntheticSizes.quick().base_dense * len(NEAR_OOD_FAMILIES)
    assert len(dense) == expected
    for rec in dense:
        parsed = parse_dense_caption(rec["messages"][1]["content"], lexicon.canonicalize)
        expected = [(obj["name"], obj["box"]) for obj in rec["meta"]["objects"]]
        assert [(field.name, list(field.box)) for field in parsed.fields] == expected
        assert parsed.malformed_lines == ()
        assert len(parsed.fields) == len(rec["messages"][1]["content"].splitlines())


def test_dense_captions_list_class_by_class_each_in_reading_order(dataset):
    for _, rec in image_records(dataset):
        classes = OBJECTS_BY_KIND[rec["meta"]["scene"]]
        keys = [(classes.index(obj["name"]), obj["box"][1], obj["box"][0]) for obj in rec["meta"]["objects"]]
        assert keys == sorted(keys)


def test_boxes_are_valid_on_the_1000_grid(dataset):
    for _, rec in image_records(dataset):
        for obj in rec["meta"]["objects"]:
            x1, y1, x2, y2 = obj["box"]
            assert all(isinstance(v, int) for v in obj["box"])
            assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000, obj


def test_object_names_belong_to_their_scene_kind(dataset):
    seen = {kind: set() for kind in OBJECTS_BY_KIND}
    for _, rec in image_records(dataset):
        names = {obj["name"] for obj in rec["meta"]["objects"]}
        assert names <= set(OBJECTS_BY_KIND[rec["meta"]["scene"]]), (rec["meta"]["id"], names)
        seen[rec["meta"]["scene"]] |= names
    assert seen["indoor"] >= {"rack", "bbu"} and seen["outdoor"] >= {"sky"}
    assert all(seen[family] for family in OOD_FAMILIES)


def _count_phrase(name: str, count: int) -> str:
    singular, plural = CAPTION_WORDS[name]
    if name == "sky":
        return "sky"
    return f"{count} {plural}" if count > 1 else f"{'an' if singular[0] in 'aeiou' else 'a'} {singular}"


def _mentions(caption: str, name: str) -> bool:
    singular, plural = CAPTION_WORDS[name]
    return re.search(rf"\b({re.escape(singular)}|{re.escape(plural)})\b", caption) is not None


def test_general_captions_name_present_objects_with_counts_and_nothing_else(dataset):
    general = [rec for _, rec in image_records(dataset) if rec["meta"]["style"] == "general"]
    assert {rec["meta"]["scene"] for rec in general} == set(OBJECTS_BY_KIND)
    for rec in general:
        caption = rec["messages"][1]["content"]
        counts = Counter(obj["name"] for obj in rec["meta"]["objects"])
        for name in OBJECTS_BY_KIND[rec["meta"]["scene"]]:
            if counts[name] and name in ("sky", "sun"):
                continue  # scenery, phrased by the template rather than counted
            if counts[name]:
                assert re.search(rf"\b{_count_phrase(name, counts[name])}\b", caption), (
                    caption,
                    name,
                    counts,
                )
            else:
                assert not _mentions(caption, name), (caption, name)
        assert caption.endswith(".") and caption[0].isupper()


def test_general_captions_use_more_than_one_template(tmp_path):
    sizes = SyntheticSizes(
        base_images=12,
        base_dense=0,
        base_text=0,
        domain_train=0,
        domain_val=0,
        eval_ood=0,
        text_eval=0,
        anchor_images=0,
        anchor_text=0,
    )
    splits = make_synthetic_data(tmp_path / "d", seed=2, sizes=sizes)
    openings = {r["messages"][1]["content"].split(" with ")[0][:18] for r in read_jsonl(splits["base_train"])}
    assert len(openings) >= 3


def test_no_image_is_shared_between_splits(dataset):
    groups = {
        split: {rec["images"][0] for rec in read_jsonl(dataset[split]) if "images" in rec}
        for split in (
            "base_train",
            "train",
            "val",
            "eval_indoor",
            "anchor",
            *(f"eval_{f}" for f in OOD_FAMILIES),
        )
    }
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b], (a, b)
    # The general-prompt indoor / dense-prompt outdoor eval files reuse exactly the held-out images.
    assert {r["images"][0] for r in read_jsonl(dataset["eval_indoor_general"])} == groups["eval_indoor"]
    for family in OOD_FAMILIES:
        dense_images = {r["images"][0] for r in read_jsonl(dataset[f"eval_{family}_dense"])}
        assert dense_images == groups[f"eval_{family}"]
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for paths in groups.values() for p in paths]
    assert len(digests) == len(set(digests)), "two splits hold pixel-identical images"


# --- text-only samples ----------------------------------------------------------------------------


def test_text_eval_questions_are_held_out(dataset):
    train_questions = [r["messages"][0]["content"] for r in read_jsonl(dataset["text"])]
    eval_questions = [r["messages"][0]["content"] for r in read_jsonl(dataset["text_eval"])]
    assert len(set(train_questions)) == len(train_questions) == SyntheticSizes.quick().base_text
    assert len(eval_questions) == SyntheticSizes.quick().text_eval
    assert not set(train_questions) & set(eval_questions)


def test_generate_text_samples_is_deterministic_and_distinct():
    first = generate_text_samples(300, 7)
    assert first == generate_text_samples(300, 7)
    assert first != generate_text_samples(300, 8)
    assert generate_text_samples(20, np.random.default_rng(7)) == first[:20]
    assert generate_text_samples(5, random.Random(1)) == generate_text_samples(5, random.Random(1))
    assert len({s.question for s in first}) == 300
    assert len({s.topic for s in first}) >= 6
    excluded = {s.question for s in first[:100]}
    assert not excluded & {s.question for s in generate_text_samples(300, 7, exclude=excluded)}
    with pytest.raises(TypeError):
        generate_text_samples(3, "seed")


def test_generated_text_answers_are_correct():
    operations = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    checked = 0
    for sample in generate_text_samples(400, 0):
        match = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", sample.question)
        if match:
            a, op, b = int(match[1]), match[2], int(match[3])
            assert sample.answer == f"{a} {op} {b} is {operations[op](a, b)}."
            checked += 1
        match = re.fullmatch(r"What is the capital of (\w+)\?", sample.question)
        if match and match[1] == "France":
            assert sample.answer == "The capital of France is Paris."
        match = re.fullmatch(r"Which day comes after (\w+)\?", sample.question)
        if match and match[1] == "Sunday":
            assert sample.answer == "The day after Sunday is Monday."
        assert sample.messages() == [
            {"role": "user", "content": sample.question},
            {"role": "assistant", "content": sample.answer},
        ]
    assert checked > 20


# --- boxes ----------------------------------------------------------------------------------------


def test_normalise_box_maps_pixels_onto_the_1000_grid():
    assert normalise_box((0, 0, 192, 192), 192) == [0, 0, 1000, 1000]
    assert normalise_box((48, 96, 144, 100), 192) == [250, 500, 750, 521]


def test_normalise_box_on_a_coarse_grid_rounds_outwards_and_never_collapses():
    # 10 cells of 19.2 px: a box from 20 to 37 px sits inside cell 1 and keeps a width of one cell.
    assert normalise_box((20, 20, 37, 37), 192, grid=10) == [1, 1, 2, 2]
    assert normalise_box((0, 96, 192, 97), 192, grid=10) == [0, 5, 10, 6]
    # Exact cell edges stay exact instead of spilling into the next cell.
    assert normalise_box((0, 0, 96, 192), 192, grid=10) == [0, 0, 5, 10]


def test_default_dense_captions_use_the_coarse_grid(dataset):
    for _, rec in image_records(dataset):
        for obj in rec["meta"]["objects"]:
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= DEFAULT_BOX_GRID and 0 <= y1 < y2 <= DEFAULT_BOX_GRID, obj


# --- output folder safety -------------------------------------------------------------------------


def test_non_empty_out_dir_raises_and_is_left_untouched(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        make_synthetic_data(out, sizes=SyntheticSizes.quick())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_empty_out_dir_is_used_and_overwrite_replaces_old_content(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    make_synthetic_data(out, sizes=SyntheticSizes.quick())
    (out / "stale.txt").write_text("old")
    make_synthetic_data(out, seed=1, sizes=SyntheticSizes.quick(), overwrite=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / MANIFEST_FILE).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_interrupted_run_leaves_no_partial_data_set(tmp_path, monkeypatch):
    def fail_midway(path, records):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "write_jsonl", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        make_synthetic_data(tmp_path / "data", sizes=SyntheticSizes.quick())
    assert list(tmp_path.iterdir()) == []


def test_invalid_sizes_and_seed_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        SyntheticSizes(domain_train=-1)
    with pytest.raises(ValueError):
        SyntheticSizes(image_size=16)
    with pytest.raises(ValueError, match="box_grid"):
        SyntheticSizes(box_grid=0)
    with pytest.raises(ValueError, match="base_dense"):
        SyntheticSizes(base_images=2, base_dense=3)
    with pytest.raises(ValueError):
        make_synthetic_data(tmp_path / "data", seed=-1, sizes=SyntheticSizes.quick())


# --- manifest -------------------------------------------------------------------------------------


def test_manifest_counts_match_files(dataset):
    root = dataset["train"].parent
    manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    assert manifest["seed"] == 0
    assert manifest["generator"] == synthetic.GENERATOR_VERSION
    assert manifest["sizes"] == asdict(SyntheticSizes.quick())
    assert manifest["counts"] == {
        filename: len(dataset[split].read_text(encoding="utf-8").splitlines())
        for split, filename in SPLIT_FILES.items()
    }
    sizes = SyntheticSizes.quick()
    assert manifest["counts"]["train.jsonl"] == sizes.domain_train
    known, near, ood = len(BASE_FAMILIES), len(NEAR_OOD_FAMILIES), len(OOD_FAMILIES)
    assert manifest["counts"]["base_train.jsonl"] == (
        known * sizes.base_images + near * sizes.base_dense + sizes.base_text
    )
    assert manifest["counts"]["anchor.jsonl"] == known * sizes.anchor_images + sizes.anchor_text
    assert manifest["images"] == len(list((root / "images").glob("*.png")))
    assert manifest["images"] == (
        known * (sizes.base_images + sizes.anchor_images)
        + sizes.domain_train
        + sizes.domain_val
        + sizes.eval_indoor
        + ood * sizes.eval_ood
    )


# --- anchor set -----------------------------------------------------------------------------------


def test_anchor_set_is_prompt_only_from_known_families_and_disjoint_from_every_eval_set(dataset):
    records = read_jsonl(dataset["anchor"])
    sizes = SyntheticSizes.quick()
    assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in records)
    images = [r for r in records if "images" in r]
    assert Counter(r["meta"]["scene"] for r in images) == {
        family: sizes.anchor_images for family in BASE_FAMILIES
    }
    assert all(r["messages"][0]["content"] == GENERAL_PROMPT for r in images)
    questions = [r["messages"][0]["content"] for r in records if "images" not in r]
    assert len(questions) == len(set(questions)) == sizes.anchor_text
    evaluated = {r["messages"][0]["content"] for r in read_jsonl(dataset["text_eval"])}
    trained = {r["messages"][0]["content"] for r in read_jsonl(dataset["text"])}
    assert not set(questions) & (evaluated | trained)
    anchor_images = {r["images"][0] for r in images}
    for split in IMAGE_SPLITS:
        assert not anchor_images & {r["images"][0] for r in read_jsonl(dataset[split]) if "images" in r}, (
            split
        )
