"""``anchorkd anchors build`` (``anchorkd.data.anchor_set``): composition and shares, exclusion of images that
are in the training or eval sets (by SHA-256), determinism per seed, the summary, and every refusal (exit 2,
nothing written) through the real command line."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from anchorkd.cli import EXIT_BAD_INPUT, main
from anchorkd.data import anchor_set as ab
from anchorkd.data.validate import validate_jsonl
from anchorkd.errors import ConfigError
from anchorkd.resources import default_general_prompts_path, default_text_questions_path

DENSE = "<image>List every object with its bounding box."
COUNT = "How many racks are in <image>?"
SYSTEM = "You are a careful inspector."


def png(path: Path, shade: int, size: tuple[int, int] = (8, 6)) -> Path:
    """A small PNG whose bytes differ for each shade (Pillow writes no timestamp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 255 - shade, (shade * 7) % 256)).save(path, format="PNG")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answered(prompt: str, images: list[Path], answer: str = "- rack: [1, 1, 4, 4]", system=None) -> dict:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    row: dict = {"messages": messages}
    if images:
        row["images"] = [str(p) for p in images]
    return row


@pytest.fixture
def data(tmp_path: Path) -> dict:
    """A training set (two image prompts, one with a system prompt, plus a text-only row), an eval set, and a
    folder of off-domain images holding a copy of a training image, a copy of an eval image and one image
    twice, beside a README and a hidden file."""
    train_images = [png(tmp_path / "train" / f"t{i}.png", 10 + i) for i in range(3)]
    eval_images = [png(tmp_path / "eval" / f"e{i}.png", 60 + i) for i in range(2)]
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            answered(DENSE, [train_images[0]]),
            answered(DENSE, [train_images[1]]),
            answered(COUNT, [train_images[2]], answer="3", system=SYSTEM),
            answered("Say hello.", [], answer="Hello."),
        ],
    )
    evals = write_jsonl(tmp_path / "eval.jsonl", [answered(DENSE, [p]) for p in eval_images])
    folder = tmp_path / "offdomain"
    fresh = [png(folder / f"o{i:02d}.png", 100 + i) for i in range(6)]
    fresh += [png(folder / "nested" / "deeper" / f"n{i}.png", 150 + i) for i in range(2)]
    shutil.copy(train_images[0], folder / "copy_of_train.png")
    shutil.copy(eval_images[1], folder / "nested" / "copy_of_eval.png")
    shutil.copy(fresh[0], folder / "zz_repeat.png")
    (folder / "README.txt").write_text("not an image\n")
    png(folder / ".hidden" / "h.png", 200)
    return {
        "train": train,
        "eval": evals,
        "folder": folder,
        "fresh": fresh,
        "train_images": train_images,
        "eval_images": eval_images,
        "root": tmp_path,
    }


def build_args(data: dict, out: Path, *extra: str) -> list[str]:
    return [
        "anchors",
        "build",
        "--train",
        str(data["train"]),
        "--images",
        str(data["folder"]),
        "--eval",
        str(data["eval"]),
        "--out",
        str(out),
        *extra,
    ]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def kind_rows(rows: list[dict], kind: str) -> list[dict]:
    return [row for row in rows if row["meta"]["kind"] == kind]


# --- composition --------------------------------------------------------------------------------------------


def test_rows_follow_the_shares_and_each_kind_asks_its_prompts(data, capsys):
    out = data["root"] / "anchors" / "anchors.jsonl"
    assert main(build_args(data, out, "--rows", "20")) == 0
    rows = read_jsonl(out)
    assert len(rows) == 20
    assert Counter(row["meta"]["kind"] for row in rows) == {"training_prompts": 10, "general": 5, "text": 5}
    # No row has an answer: the base writes them before training.
    assert all(row["messages"][-1]["role"] == "user" for row in rows)
    assert validate_jsonl(out) == 20  # every row is one ms-swift keeps (tags match images, images readable)

    training = kind_rows(rows, "training_prompts")
    # Two distinct training prompts, drawn in passes: each asked 5 times; the system prompt comes along.
    asked = Counter(tuple((m["role"], m["content"]) for m in row["messages"]) for row in training)
    assert asked == {
        (("user", DENSE),): 5,
        (("system", SYSTEM), ("user", COUNT)): 5,
    }
    assert all(len(row["images"]) == 1 for row in training)

    general_prompts = [
        "<image>" + line
        for line in default_general_prompts_path().read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    general = kind_rows(rows, "general")
    # 5 rows from the 8 shipped prompts: 5 different ones, each with a tag at its start and one image.
    assert len({row["messages"][0]["content"] for row in general}) == 5
    assert {row["messages"][0]["content"] for row in general} <= set(general_prompts)
    assert all(len(row["messages"]) == 1 and len(row["images"]) == 1 for row in general)
    # General prompts are asked about the images the training prompts are asked about.
    assert {row["images"][0] for row in general} <= {row["images"][0] for row in training}

    questions = {
        line for line in default_text_questions_path().read_text().splitlines() if line and line[0] != "#"
    }
    text = kind_rows(rows, "text")
    assert all("images" not in row and row["messages"][0]["content"] in questions for row in text)
    assert len({row["messages"][0]["content"] for row in text}) == 5

    out_text = capsys.readouterr().out
    assert f"20 anchor rows in {out}: training_prompts 10 (2 prompt(s)), general 5 (5 prompt(s))" in out_text
    assert (
        "8 of 8 off-domain images used; left out: 1 in the training set, 1 in the eval sets, 1 repeated"
        in out_text
    )


def test_no_anchor_image_is_in_the_training_or_eval_set_and_every_exclusion_is_counted(data):
    out = data["root"] / "anchors.jsonl"
    assert main(build_args(data, out, "--rows", "40", "--share", "training_prompts=0.5,general=0.5")) == 0
    rows = read_jsonl(out)
    used = {Path(image) for row in rows for image in row.get("images", [])}
    forbidden = {sha(p) for p in data["train_images"] + data["eval_images"]}
    assert used and not {sha(p) for p in used} & forbidden
    # 20 image rows per kind over 8 images left: every image is used, none of the excluded ones.
    assert used == {p.resolve() for p in data["fresh"]}
    summary = json.loads(ab.summary_path_for(out).read_text())
    excluded = summary["excluded_images"]
    assert excluded["in_training"]["count"] == 1
    assert excluded["in_training"]["examples"] == [
        {
            "image": str((data["folder"] / "copy_of_train.png").resolve()),
            "sha256": sha(data["train_images"][0]),
            "also_in": f"{data['train']}:1",
        }
    ]
    assert excluded["in_eval"]["count"] == 1
    assert excluded["in_eval"]["examples"][0]["also_in"] == f"{data['eval']}:2"
    assert excluded["repeated"]["count"] == 1
    assert excluded["repeated"]["examples"][0]["also_in"] == str(data["fresh"][0].resolve())
    # 11 image files found (the README and the hidden folder are not candidates), 8 left.
    assert summary["images"]["candidates"] == 11 and summary["images"]["available"] == 8
    assert summary["images"]["sources"] == [
        {"path": str(data["folder"]), "type": "folder", "images": 11, "other_files": 1}
    ]


def test_an_eval_folder_and_a_jsonl_image_source_work_like_the_files(data):
    source = write_jsonl(
        data["root"] / "images.jsonl",
        [
            {"image": str(data["fresh"][1])},
            answered("Say hello.", [], answer="Hello."),  # a text chat among ms-swift rows adds no image
            {"images": [str(data["fresh"][2]), str(data["eval_images"][0])]},
        ],
    )
    out = data["root"] / "anchors.jsonl"
    args = ["anchors", "build", "--train", str(data["train"]), "--images", str(source)]
    args += ["--eval", str(data["root"] / "eval"), "--out", str(out), "--rows", "4", "--share", "general=1"]
    assert main(args) == 0
    rows = read_jsonl(out)
    assert {image for row in rows for image in row["images"]} == {
        str(data["fresh"][1].resolve()),
        str(data["fresh"][2].resolve()),
    }
    summary = json.loads(ab.summary_path_for(out).read_text())
    assert summary["excluded_images"]["in_eval"]["examples"][0]["also_in"] == str(data["eval_images"][0])
    assert summary["images"]["list"][0]["from"] == f"{source}:1"
    assert summary["images"]["sources"] == [
        {"path": str(source), "type": "jsonl", "images": 3, "rows_without_image": 1}
    ]


def test_refuses_a_jsonl_image_source_row_that_names_no_image(data, capsys):
    source = write_jsonl(
        data["root"] / "images.jsonl", [{"image": str(data["fresh"][0])}, {"picture": "x.png"}]
    )
    args = build_args(data, data["root"] / "anchors.jsonl")
    args[args.index(str(data["folder"]))] = str(source)
    refuse(args, data["root"], capsys, f"{source}:2: the row names no local image ('images' or 'image')")


def test_rows_per_kind_splits_by_largest_remainder():
    assert ab.rows_per_kind(20, ab.DEFAULT_SHARES) == {"training_prompts": 10, "general": 5, "text": 5}
    # 3.5 / 1.75 / 1.75: floors 3 / 1 / 1, the two rows left go to the larger remainders.
    assert ab.rows_per_kind(7, ab.DEFAULT_SHARES) == {"training_prompts": 3, "general": 2, "text": 2}
    thirds = {kind: 1 / 3 for kind in ab.KINDS}
    assert ab.rows_per_kind(10, ab.check_shares(thirds)) == {"training_prompts": 4, "general": 3, "text": 3}
    assert ab.rows_per_kind(3, ab.parse_shares("text=1")) == {"training_prompts": 0, "general": 0, "text": 3}


def test_draw_uses_every_item_once_per_pass():
    order = ab.draw(10, 4, seed=3, stream="x")
    assert len(order) == 10
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:8]) == [0, 1, 2, 3]
    assert ab.draw(10, 4, seed=3, stream="x") == order
    assert ab.draw(10, 4, seed=4, stream="x") != order or ab.draw(10, 4, seed=5, stream="x") != order


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("training=1", "is not KIND=SHARE"),
        ("general", "is not KIND=SHARE"),
        ("general=0.5,text=0.4", "must add up to 1, they add up to 0.9"),
        ("general=1.5,text=-0.5", "must be a finite number >= 0"),
        ("general=0.5,general=0.5", "general is given twice"),
        ("general=half,text=0.5", "must be a number, got 'half'"),
        ("general=nan,text=1", "must be a finite number >= 0"),
    ],
)
def test_parse_shares_refuses_bad_specs(text, why):
    with pytest.raises(ConfigError, match="^--share: ") as error:
        ab.parse_shares(text)
    assert why in str(error.value)


def test_parse_shares_fills_in_the_kinds_left_out():
    assert ab.parse_shares("training_prompts=0.75, text=0.25") == {
        "training_prompts": 0.75,
        "general": 0.0,
        "text": 0.25,
    }


# --- training prompts ---------------------------------------------------------------------------------------


def test_training_prompt_is_the_final_user_turn_with_its_images_and_system_prompt():
    prompt, why = ab.training_prompt(answered(COUNT, [Path("a.png")], system=SYSTEM))
    assert (prompt, why) == (ab.Prompt(COUNT, 1, SYSTEM), "ok")
    # No tag: ms-swift puts one per image before the first message; the prompt takes them all.
    row = answered("Compare the two racks.", [Path("a.png"), Path("b.png")])
    assert ab.training_prompt(row) == (ab.Prompt("Compare the two racks.", 2), "ok")
    # Typed content blocks are tags.
    typed = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Boxes?"}],
            },
            {"role": "assistant", "content": "none"},
        ]
    }
    assert ab.training_prompt(typed) == (ab.Prompt("<image>Boxes?", 1), "ok")
    multi_turn = {
        "messages": [
            {"role": "user", "content": "<image>What is this?"},
            {"role": "assistant", "content": "A rack."},
            {"role": "user", "content": "And its height?"},
            {"role": "assistant", "content": "2 m."},
        ],
        "images": ["a.png"],
    }
    assert ab.training_prompt(multi_turn) == (None, "images_in_other_turns")
    assert ab.training_prompt(answered("Say hello.", [])) == (None, "text_only")
    assert ab.training_prompt({"messages": [{"role": "user", "content": DENSE}], "images": ["a"]}) == (
        None,
        "no_answer",
    )
    video = answered("<video>What happens?", [])
    video["videos"] = ["v.mp4"]
    assert ab.training_prompt(video) == (None, "video_or_audio")


def test_text_only_training_rows_are_counted_not_asked(data):
    out = data["root"] / "anchors.jsonl"
    assert main(build_args(data, out, "--rows", "8")) == 0
    summary = json.loads(ab.summary_path_for(out).read_text())
    assert summary["training_rows_without_an_image_prompt"] == {"text_only": 1}
    assert summary["training_sets"] == [
        {"path": str(data["train"]), "sha256": sha(data["train"]), "rows": 4, "image_prompts": 2}
    ]
    assert all(row["messages"][-1]["content"] != "Say hello." for row in read_jsonl(out))


# --- determinism and summary ----------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_draws(data):
    outs = [data["root"] / name / "anchors.jsonl" for name in ("a", "b", "c")]
    for out, seed in zip(outs, ("7", "7", "8"), strict=True):
        assert main(build_args(data, out, "--rows", "30", "--seed", seed)) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    first, second = (json.loads(ab.summary_path_for(o).read_text()) for o in outs[:2])
    assert first.pop("anchor_set") == str(outs[0]) and second.pop("anchor_set") == str(outs[1])
    assert first == second
    assert outs[2].read_bytes() != outs[0].read_bytes()
    # Another seed draws other images and prompts, but the composition is the same.
    assert Counter(r["meta"]["kind"] for r in read_jsonl(outs[2])) == Counter(
        r["meta"]["kind"] for r in read_jsonl(outs[0])
    )


def test_the_summary_counts_rows_per_prompt_and_per_image_with_hashes(data):
    out = data["root"] / "anchors.jsonl"
    assert (
        main(build_args(data, out, "--rows", "12", "--share", "training_prompts=0.5,general=0.25,text=0.25"))
        == 0
    )
    rows = read_jsonl(out)
    summary = json.loads(ab.summary_path_for(out).read_text())
    assert summary["rows"] == 12 and summary["seed"] == 0
    for kind in ab.KINDS:
        info = summary["kinds"][kind]
        asked = Counter(row["meta"]["prompt"] for row in kind_rows(rows, kind))
        assert {p["index"]: p["rows"] for p in info["prompts"] if p["rows"]} == dict(asked)
        assert info["rows"] == sum(p["rows"] for p in info["prompts"]) == len(kind_rows(rows, kind))
    training = summary["kinds"]["training_prompts"]
    assert training["prompts"] == [
        {"index": 0, "text": DENSE, "images": 1, "rows": 3, "training_rows": 2},
        {"index": 1, "text": COUNT, "images": 1, "system": SYSTEM, "rows": 3, "training_rows": 1},
    ]
    assert summary["kinds"]["general"]["prompts"][0]["from"] == f"{default_general_prompts_path()}:4"
    assert summary["kinds"]["text"]["prompts_available"] == 60
    per_image = Counter(image for row in rows for image in row.get("images", []))
    assert {entry["path"]: entry["rows"] for entry in summary["images"]["list"]} == dict(per_image)
    for entry in summary["images"]["list"]:
        assert entry["sha256"] == sha(Path(entry["path"]))
    assert summary["images"]["used"] == len(per_image) == 6  # 6 training-prompt rows over 8 images: 6 used
    assert summary["eval_sets"] == [{"path": str(data["eval"]), "sha256": sha(data["eval"]), "images": 2}]
    assert summary["prompt_files"] == {
        "general": str(default_general_prompts_path()),
        "text": str(default_text_questions_path()),
    }


def test_prompt_files_replace_the_shipped_lists(data):
    general = data["root"] / "general.txt"
    general.write_text("# mine\n\nWhat colour dominates <image>?\nName one thing here.\n")
    questions = write_jsonl(
        data["root"] / "questions.jsonl",
        [
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
            {
                "messages": [
                    {"role": "user", "content": "Capital of Peru?"},
                    {"role": "assistant", "content": "x"},
                ]
            },
        ],
    )
    out = data["root"] / "anchors.jsonl"
    extra = ["--rows", "8", "--share", "general=0.5,text=0.5", "--general-prompts", str(general)]
    assert main(build_args(data, out, *extra, "--text-questions", str(questions))) == 0
    rows = read_jsonl(out)
    assert Counter(r["messages"][-1]["content"] for r in kind_rows(rows, "general")) == {
        "What colour dominates <image>?": 2,
        "<image>Name one thing here.": 2,
    }
    assert Counter(tuple(m["content"] for m in r["messages"]) for r in kind_rows(rows, "text")) == {
        ("Be brief.", "2+2?"): 2,
        ("Capital of Peru?",): 2,  # the file's answer is dropped: the base answers
    }


def test_a_text_only_set_needs_no_images(data):
    out = data["root"] / "anchors.jsonl"
    assert (
        main(
            [
                "anchors",
                "build",
                "--train",
                str(data["train"]),
                "--out",
                str(out),
                "--rows",
                "3",
                "--share",
                "text=1",
            ]
        )
        == 0
    )
    assert [row["meta"]["kind"] for row in read_jsonl(out)] == ["text"] * 3
    assert json.loads(ab.summary_path_for(out).read_text())["images"]["candidates"] == 0


# --- refusals: exit 2, a message naming the problem, nothing written ----------------------------------------------


def refuse(args: list[str], root: Path, capsys, *expected: str) -> str:
    before = listing(root)
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("anchorkd: error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert listing(root) == before
    return err


def test_refuses_an_empty_image_folder(data, capsys):
    empty = data["root"] / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    args = build_args(data, data["root"] / "out" / "anchors.jsonl")
    args[args.index(str(data["folder"]))] = str(empty)
    refuse(args, data["root"], capsys, f"{empty}: holds no image files (1 other file(s)")


def test_refuses_an_unreadable_image_naming_it(data, capsys):
    broken = data["folder"] / "nested" / "broken.png"
    broken.write_bytes(data["fresh"][0].read_bytes()[:40])  # a PNG cut short in its header
    refuse(
        build_args(data, data["root"] / "anchors.jsonl"),
        data["root"],
        capsys,
        # The decoder's own error, as `anchorkd validate` reports it (data.media.image_problem).
        f"{broken}: not a readable image (UnidentifiedImageError: cannot identify",
    )


def test_refuses_an_unreadable_image_listed_in_a_jsonl_naming_file_line_and_image(data, capsys):
    missing = data["root"] / "nowhere.png"
    source = write_jsonl(
        data["root"] / "images.jsonl", [{"image": str(data["fresh"][0])}, {"image": str(missing)}]
    )
    args = build_args(data, data["root"] / "anchors.jsonl")
    args[args.index(str(data["folder"]))] = str(source)
    refuse(args, data["root"], capsys, f"{source}:2: image not found: {missing}")


def test_refuses_a_training_set_with_no_prompts_naming_it(data, capsys):
    prompt_only = write_jsonl(
        data["root"] / "prompts.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}]
    )
    args = build_args(data, data["root"] / "anchors.jsonl", "--train", str(prompt_only))
    refuse(args, data["root"], capsys, f"{prompt_only}: holds no training prompt")


def test_refuses_training_prompts_when_no_training_prompt_takes_an_image(data, capsys):
    text_only = write_jsonl(data["root"] / "chat.jsonl", [answered("Say hello.", [], answer="Hello.")])
    args = build_args(data, data["root"] / "anchors.jsonl")
    args[args.index(str(data["train"]))] = str(text_only)
    refuse(args, data["root"], capsys, f"{text_only}: no training prompt takes an image (1 row(s) text only)")


def test_refuses_an_eval_set_that_overlaps_every_image(data, capsys):
    everything = write_jsonl(
        data["root"] / "eval_all.jsonl",
        [answered(DENSE, [p]) for p in sorted(data["folder"].rglob("*.png")) if ".hidden" not in p.parts],
    )
    args = build_args(data, data["root"] / "anchors.jsonl", "--eval", str(everything))
    refuse(
        args,
        data["root"],
        capsys,
        f"{data['folder']}: no off-domain image is left: all 11 image(s) are excluded (1 in training, 10 in eval)",
    )


def test_refuses_an_existing_output_unless_forced(data, capsys):
    out = data["root"] / "anchors.jsonl"
    out.write_text("old\n")
    refuse(build_args(data, out), data["root"], capsys, f"{out} already exists; pass --force")
    out.unlink()
    summary = ab.summary_path_for(out)
    summary.write_text("{}\n")
    refuse(build_args(data, out), data["root"], capsys, f"{summary} already exists; pass --force")
    assert main(build_args(data, out, "--rows", "4", "--force")) == 0
    assert len(read_jsonl(out)) == 4 and json.loads(summary.read_text())["rows"] == 4


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--share", "general=0.6,text=0.6"], "--share: the shares must add up to 1, they add up to 1.2"),
        (["--share", "pictures=1"], "--share: 'pictures=1' is not KIND=SHARE"),
        (["--rows", "0"], "--rows: the anchor set needs at least 1 row, got 0"),
        (["--seed", "-1"], "--seed: the seed must be an integer >= 0"),
    ],
)
def test_refuses_bad_sizes(data, capsys, extra, expected):
    refuse(build_args(data, data["root"] / "anchors.jsonl", *extra), data["root"], capsys, expected)


def test_refuses_image_rows_without_images_and_an_output_that_is_not_jsonl(data, capsys):
    args = ["anchors", "build", "--train", str(data["train"]), "--out", str(data["root"] / "anchors.jsonl")]
    refuse(
        args,
        data["root"],
        capsys,
        "--images: 200 training-prompt and 100 general rows need off-domain images",
    )
    refuse(
        build_args(data, data["root"] / "anchors.json"),
        data["root"],
        capsys,
        "--out: ",
        "must be a .jsonl file",
    )


def test_refuses_a_text_question_with_an_image_tag_naming_file_and_line(data, capsys):
    questions = data["root"] / "questions.txt"
    questions.write_text("What is 2+2?\nWhat is in <image>?\n")
    args = build_args(data, data["root"] / "anchors.jsonl", "--text-questions", str(questions))
    refuse(args, data["root"], capsys, f"{questions}:2: a text question must not hold an <image> tag")


def test_refuses_a_bad_training_line_with_file_and_line(data, capsys):
    with data["train"].open("a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}\n')
    refuse(
        build_args(data, data["root"] / "anchors.jsonl"),
        data["root"],
        capsys,
        f"{data['train']}:5: messages[1].role",
    )
