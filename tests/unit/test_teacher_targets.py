"""The seq_kd data step (``anchorkd.trainers.teacher_targets``) with the teacher's generation replaced by a fake.

What is checked here needs no model: which prompt each row gives the teacher, what the rewritten rows hold,
what the cache keys cover (prompt, images, teacher files, settings), that no answer is generated twice,
that non-writer ranks wait for the writer's files, and the ``anchorkd teacher-targets`` command. The real
generation (labels equal to the teacher's greedy answer) is tested in ``tests/integration/test_seq_kd.py``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from anchorkd import swift_seam
from anchorkd.cli import EXIT_BAD_INPUT, main
from anchorkd.config import ConfigLoader, DataError
from anchorkd.errors import ConfigError
from anchorkd.eval.generate import Response
from anchorkd.io import iter_jsonl
from anchorkd.trainers import teacher_targets as tt

MAX_NEW = 9


class FakeTeacher:
    """Stands in for ``load_model`` + ``generate_responses``: answers name the prompt's source line."""

    def __init__(self) -> None:
        self.loads: list[dict] = []
        self.prompts: list[tuple[list, list]] = []
        self.request_configs: list = []

    def load_model(self, model, adapter=None, **options):
        self.loads.append({"model": model, "adapter": adapter, **options})
        return object()

    def generate_responses(self, loaded, batch, request_config):
        self.request_configs.append(request_config)
        answers = []
        for sample in batch:
            self.prompts.append((sample.prompt_messages, sample.images))
            answers.append(Response(f"teacher answer to {Path(sample.source).name}:{sample.line}", "stop", 5))
        return answers

    @property
    def generated(self) -> int:
        return len(self.prompts)


@pytest.fixture
def fake(monkeypatch) -> FakeTeacher:
    teacher = FakeTeacher()
    monkeypatch.setattr(tt, "load_model", teacher.load_model)
    monkeypatch.setattr(tt, "generate_responses", teacher.generate_responses)
    return teacher


@pytest.fixture
def data(tmp_path, synthetic_data_dir) -> Path:
    """Four rows of the synthetic training data (with images), copied so tests may change them."""
    lines = (synthetic_data_dir / "train.jsonl").read_text().splitlines()[:4]
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    return path


def seq_kd_config(tiny_model_dir: Path, data: Path, tmp_path: Path) -> dict:
    return {
        "model": {"model": str(tiny_model_dir), "model_type": "qwen3_vl", "torch_dtype": "float32"},
        "data": {"dataset": [str(data)], "val_dataset": [str(data)]},
        "template": {"max_pixels": 16384},
        "tuner": {"tuner_type": "lora"},
        "training": {"output_dir": str(tmp_path / "runs" / "run")},
        "rlhf": {
            "rlhf_type": "gkd",
            "teacher_model": str(tiny_model_dir),
            "lmbda": 0.0,
            "seq_kd": True,
            "max_completion_length": MAX_NEW,
        },
        "custom": {"trainer_variant": "gkd_monitor", "teacher_targets": {"batch_size": 3}},
    }


@pytest.fixture
def config_dict(tiny_model_dir, data, tmp_path) -> dict:
    return seq_kd_config(tiny_model_dir, data, tmp_path)


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "seq_kd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def resolve(tmp_path, config: dict):
    return ConfigLoader.resolve(write_config(tmp_path, config))


def rows_of(path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


# --- what is written ----------------------------------------------------------------------------------------


def test_rows_train_on_the_teachers_answer_with_provenance(tmp_path, config_dict, data, fake, tiny_model_dir):
    config = resolve(tmp_path, config_dict)
    trained = tt.with_teacher_targets(config, writer=True)

    (target,) = trained.sections["data"]["dataset"]
    assert Path(target).parent == tmp_path / "runs" / "teacher_targets" / tt.DATASETS_DIR  # default cache dir
    assert trained.sections["data"]["val_dataset"] == [str(data)]  # evaluation keeps the data set's answers
    assert config.sections["data"]["dataset"] == [str(data)]  # the checked config is left as it was
    sources, targets = rows_of(data), rows_of(target)
    assert len(targets) == len(sources) == 4
    for line, (source, row) in enumerate(zip(sources, targets, strict=True), start=1):
        assert row["messages"][:-1] == source["messages"][:-1]
        assert row["messages"][-1] == {
            "role": "assistant",
            "content": f"teacher answer to train.jsonl:{line}",
        }
        assert row["images"] == source["images"] and row["meta"] == source["meta"]
        provenance = row[tt.PROVENANCE_KEY]
        assert (provenance["source"], provenance["line"]) == (str(data), line)
        assert provenance["teacher"]["model"] == str(tiny_model_dir.resolve())
        assert provenance["teacher"]["fingerprint"] == tt.teacher_fingerprint(
            tt.TargetJob.from_config(config).teacher, tmp_path / "runs" / "teacher_targets"
        )
        assert provenance["generation"] == {
            "max_new_tokens": MAX_NEW,
            "temperature": 0.0,
            "decoding": "greedy",
            "infer_backend": "transformers",
            "model_type": "qwen3_vl",
            "torch_dtype": "float32",
            "template_type": None,
            "max_pixels": 16384,
            "system": None,
        }
        assert (provenance["finish_reason"], provenance["generated_tokens"]) == ("stop", 5)
    # The teacher saw each row's messages without its answer, with its images; greedy, capped at MAX_NEW.
    assert fake.prompts == [(s["messages"][:-1], s["images"]) for s in sources]
    assert {(c.temperature, c.max_tokens, c.repetition_penalty) for c in fake.request_configs} == {
        (0, MAX_NEW, 1.0)
    }
    assert len(fake.request_configs) == 2  # batch_size 3: 3 + 1 rows
    (load,) = fake.loads
    assert load["model"] == tiny_model_dir.resolve() and load["adapter"] is None
    assert load["prompt_settings"].max_pixels == 16384 and load["infer_backend"] == "transformers"


def test_a_row_without_an_answer_gets_the_teachers(tmp_path, config_dict, data, fake):
    first = rows_of(data)[0]
    prompt_only = {**first, "messages": first["messages"][:-1]}
    data.write_text(json.dumps(prompt_only) + "\n")
    (target,) = tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True).sections["data"][
        "dataset"
    ]
    (row,) = rows_of(target)
    assert row["messages"] == [
        *prompt_only["messages"],
        {"role": "assistant", "content": "teacher answer to train.jsonl:1"},
    ]


def test_rows_with_inputs_the_teacher_would_not_see_are_refused(tmp_path, config_dict, data, fake):
    rows = rows_of(data)
    clip = tmp_path / "clip.mp4"  # present, so the refusal is about the teacher, not a missing file
    clip.write_bytes(b"\0")
    rows[2]["videos"] = [str(clip)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True)
    assert str(info.value).startswith(f"{data}:3: ") and "'videos'" in str(info.value)
    assert fake.generated == 0


def test_without_seq_kd_the_config_is_unchanged(tmp_path, config_dict, fake):
    config_dict["rlhf"]["seq_kd"] = False
    config = resolve(tmp_path, config_dict)
    assert tt.with_teacher_targets(config, writer=True) is config
    assert fake.loads == []


def test_anchor_prompts_keep_their_answers_and_the_teacher_answers_the_rest(
    tmp_path, config_dict, data, fake
):
    """custom.anchor: a row with an assistant turn is kept byte for byte; a row without one gets the
    teacher's answer, through the same cache (a second pass generates nothing)."""
    rows = rows_of(data)
    anchors = tmp_path / "anchors.jsonl"
    prompt_only = {**rows[0], "messages": rows[0]["messages"][:-1]}
    anchors.write_text("".join(json.dumps(r) + "\n" for r in [prompt_only, rows[1]]))
    config_dict["rlhf"]["seq_kd"] = False
    config_dict["custom"]["anchor"] = {"dataset": [str(anchors)], "ratio": 0.25}
    trained = tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True)

    (target,) = trained.custom.anchor.dataset
    assert trained.sections["data"]["dataset"] == [str(data)]  # the domain rows keep their answers
    answered, kept = rows_of(target)
    assert answered["messages"] == [
        *prompt_only["messages"],
        {"role": "assistant", "content": "teacher answer to anchors.jsonl:1"},
    ]
    assert answered[tt.PROVENANCE_KEY]["line"] == 1
    assert kept == rows[1]
    assert fake.generated == 1 and fake.prompts[0] == (prompt_only["messages"], prompt_only["images"])
    Path(target).unlink()
    _, stats = tt.write_teacher_targets(tt.TargetJob.for_anchor_prompts(resolve(tmp_path, config_dict)))
    assert (stats.rows, stats.kept, stats.cached, stats.generated, fake.generated) == (1, 1, 1, 0, 1)


# --- the cache ------------------------------------------------------------------------------------------------


def test_no_answer_is_generated_twice(tmp_path, config_dict, data, fake, synthetic_data_dir):
    config = resolve(tmp_path, config_dict)
    (target,) = tt.with_teacher_targets(config, writer=True).sections["data"]["dataset"]
    assert fake.generated == 4 and len(fake.loads) == 1
    written = Path(target).read_bytes()

    # Another epoch, a resumed run, or a second run of the same config: the data file is reused whole and
    # the teacher is not even loaded.
    again, stats = tt.write_teacher_targets(tt.TargetJob.from_config(config))
    assert list(again.values()) == [Path(target)]
    assert (stats.generated, stats.files_reused, len(fake.loads)) == (0, 1, 1)

    # The data file lost: rebuilt from the per-answer cache, byte for byte.
    Path(target).unlink()
    _, stats = tt.write_teacher_targets(tt.TargetJob.from_config(config))
    assert (stats.generated, stats.cached, len(fake.loads)) == (0, 4, 1)
    assert Path(target).read_bytes() == written

    # One new row and one repeated prompt: only the new prompt is generated.
    rows = rows_of(data)
    new_row = rows_of(synthetic_data_dir / "train.jsonl")[4]
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[1], new_row]))
    (changed,) = tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True).sections["data"][
        "dataset"
    ]
    assert changed != target  # a new source file gets a new content address
    assert fake.generated == 5 and fake.prompts[-1] == (new_row["messages"][:-1], new_row["images"])
    assert len(rows_of(changed)) == 6


@pytest.mark.parametrize(
    "change",
    [
        ("rlhf", "max_completion_length", MAX_NEW + 1),
        ("template", "max_pixels", 8192),
        ("template", "system", "You are terse."),
        ("custom", "teacher_targets", {"temperature": 0.7}),
    ],
    ids=lambda c: f"{c[0]}.{c[1]}",
)
def test_generation_settings_are_part_of_the_key(tmp_path, config_dict, fake, change):
    first = tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True).sections["data"]["dataset"]
    section, key, value = change
    config_dict[section][key] = value
    second = tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True).sections["data"]["dataset"]
    assert first != second
    assert fake.generated == 8


def test_the_same_image_bytes_share_a_key_and_other_bytes_do_not(
    tmp_path, config_dict, data, fake, synthetic_data_dir
):
    tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True)
    rows = rows_of(data)
    image = Path(rows[0]["images"][0])
    copy = tmp_path / "same.png"
    copy.write_bytes(image.read_bytes())
    other = tmp_path / "other.png"
    unseen = rows_of(synthetic_data_dir / "train.jsonl")[5]["images"][0]
    other.write_bytes(Path(unseen).read_bytes())
    rows[0]["images"] = [str(copy)]  # the same pixels under another name: a cache hit
    rows[2]["images"] = [str(other)]  # pixels the teacher has not seen: a new answer
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True)
    assert fake.generated == 5 and fake.prompts[-1][1] == [str(other)]


def test_the_teacher_fingerprint_covers_its_files_and_is_memoised(tmp_path, tiny_model_dir, monkeypatch):
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    for path in tiny_model_dir.iterdir():
        (teacher_dir / path.name).symlink_to(path)
    teacher = tt.Teacher(teacher_dir, None, "qwen3_vl", None)
    cache = tmp_path / "cache"
    hashed: list[str] = []
    real_sha = tt.sha256_file
    monkeypatch.setattr(tt, "sha256_file", lambda p: hashed.append(Path(p).name) or real_sha(p))

    first = tt.teacher_fingerprint(teacher, cache)
    assert "model.safetensors" in hashed and "config.json" in hashed
    assert tt.teacher_fingerprint(teacher, cache) == first
    assert len(hashed) == len(tt._fingerprint_files(teacher_dir))  # the second time, nothing was re-read

    # Other weights under the same name: a new fingerprint (only the changed file is hashed again).
    (teacher_dir / "model.safetensors").unlink()
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (teacher_dir / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    hashed.clear()
    assert tt.teacher_fingerprint(teacher, cache) != first
    assert hashed == ["model.safetensors"]
    # An adapter is part of the teacher too.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with_adapter = tt.Teacher(teacher_dir, adapter, "qwen3_vl", None)
    assert tt.teacher_fingerprint(with_adapter, cache) != tt.teacher_fingerprint(teacher, cache)


def test_the_default_cache_dir_is_settled_when_the_config_is_resolved(tmp_path, config_dict):
    """Beside the output dir as written, and recorded in the resolved config: a resume later points
    training.output_dir at the run's own v<N>-<time> folder, which must not move the cache."""
    config = resolve(tmp_path, config_dict)
    assert config.custom.teacher_targets.cache_dir == str(tmp_path / "runs" / "teacher_targets")
    assert f"cache_dir: {tmp_path / 'runs' / 'teacher_targets'}" in config.to_yaml()
    del config_dict["training"]["output_dir"]  # ms-swift's default output dir is under output/
    assert resolve(tmp_path, config_dict).custom.teacher_targets.cache_dir == "output/teacher_targets"
    config_dict["rlhf"]["seq_kd"] = False
    assert resolve(tmp_path, config_dict).custom.teacher_targets.cache_dir is None


def test_cache_dir_from_the_config(tmp_path, config_dict, fake):
    config_dict["custom"]["teacher_targets"]["cache_dir"] = str(tmp_path / "shared-cache")
    (target,) = tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True).sections["data"][
        "dataset"
    ]
    assert Path(target).parent == tmp_path / "shared-cache" / tt.DATASETS_DIR
    assert len(list((tmp_path / "shared-cache" / tt.ROWS_DIR).rglob("*.json"))) == 4


# --- ranks ------------------------------------------------------------------------------------------------------


def test_other_ranks_wait_for_the_writers_files(tmp_path, config_dict, fake):
    config = resolve(tmp_path, config_dict)
    waited: list[tuple[list[Path], Path]] = []
    reader = tt.with_teacher_targets(
        config, writer=False, wait=lambda paths, heartbeat: waited.append((list(paths), heartbeat))
    )
    assert fake.loads == [] and fake.generated == 0  # only the writer generates
    writer = tt.with_teacher_targets(config, writer=True)
    assert reader.sections["data"]["dataset"] == writer.sections["data"]["dataset"]
    job = tt.TargetJob.from_config(config)
    assert waited == [([Path(p) for p in writer.sections["data"]["dataset"]], tt.heartbeat_path(job))]
    # The writer's heartbeat lives in the cache while it works, and is gone once the files are written.
    assert tt.heartbeat_path(job).parent == job.cache_dir / tt.WRITERS_DIR
    assert not tt.heartbeat_path(job).exists()


def test_the_writer_beats_while_it_generates(tmp_path, config_dict, fake, monkeypatch):
    config = resolve(tmp_path, config_dict)
    heartbeat = tt.heartbeat_path(tt.TargetJob.from_config(config))
    seen = []
    answer = fake.generate_responses

    def generate_and_look(loaded, batch, request_config):
        seen.append(json.loads(heartbeat.read_text()))
        return answer(loaded, batch, request_config)

    monkeypatch.setattr(tt, "generate_responses", generate_and_look)
    tt.with_teacher_targets(config, writer=True)
    assert seen and seen[0]["writes"] == "the teacher's answers" and seen[0]["beat"] >= 1
    assert not heartbeat.exists()


def test_a_bad_wait_limit_is_refused_before_the_teacher_loads(tmp_path, config_dict, fake, monkeypatch):
    monkeypatch.setenv("ANCHORKD_WRITER_SILENCE_S", "0")
    config = resolve(tmp_path, config_dict)
    with pytest.raises(ConfigError, match="ANCHORKD_WRITER_SILENCE_S: must be a number of seconds above 0"):
        tt.with_teacher_targets(config, writer=True)
    assert fake.loads == []


def test_wait_for_files_returns_once_the_files_exist(tmp_path):
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    paths[0].write_text("{}\n")

    def write_later():
        time.sleep(0.3)
        paths[1].write_text("{}\n")

    thread = threading.Thread(target=write_later)
    started = time.monotonic()
    thread.start()
    tt.wait_for_files(paths, poll_s=0.02)  # no heartbeat to read: only the limits end it
    thread.join()
    assert paths[1].is_file() and time.monotonic() - started >= 0.3


# --- the command ------------------------------------------------------------------------------------------------


def test_teacher_targets_command_writes_one_jsonl_for_every_data_file(
    tmp_path, config_dict, data, fake, capsys, tiny_model_dir, synthetic_data_dir
):
    second = tmp_path / "data" / "more.jsonl"
    second.write_text("\n".join((synthetic_data_dir / "train.jsonl").read_text().splitlines()[4:6]) + "\n")
    config_dict["data"]["dataset"] = [str(data), str(second)]
    config_dict["rlhf"]["seq_kd"] = False  # the command is the data step of the config's seq_kd run
    out = tmp_path / "targets" / "train_teacher.jsonl"
    code = main(["teacher-targets", "--config", str(write_config(tmp_path, config_dict)), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert f"anchorkd: 6 teacher answers in {out} (6 generated, 0 from the cache" in stdout
    rows = rows_of(out)
    assert [(Path(r[tt.PROVENANCE_KEY]["source"]).name, r[tt.PROVENANCE_KEY]["line"]) for r in rows] == [
        ("train.jsonl", 1),
        ("train.jsonl", 2),
        ("train.jsonl", 3),
        ("train.jsonl", 4),
        ("more.jsonl", 1),
        ("more.jsonl", 2),
    ]
    # A seq_kd run of the same config then finds every answer in the cache.
    config_dict["rlhf"]["seq_kd"] = True
    tt.with_teacher_targets(resolve(tmp_path, config_dict), writer=True)
    assert fake.generated == 6 and len(fake.loads) == 1


def test_teacher_targets_command_refuses_a_config_it_cannot_serve(tmp_path, config_dict, fake, capsys):
    config_dict["rlhf"]["teacher_model_server"] = "http://127.0.0.1:8000"
    config_dict["custom"] = {}
    out = tmp_path / "targets.jsonl"
    code = main(["teacher-targets", "--config", str(write_config(tmp_path, config_dict)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err.startswith("anchorkd: error: rlhf.teacher_model_server (in ") and "Traceback" not in err
    assert not out.exists() and fake.loads == []


# --- the inference backend ----------------------------------------------------------------------------------------


def test_eval_generate_refuses_a_backend_that_is_not_installed(
    tmp_path, tiny_model_dir, data, monkeypatch, capsys
):
    monkeypatch.setattr(swift_seam, "infer_backend_installed", lambda name: name == "transformers")
    out = tmp_path / "gen"
    argv = ["eval", "generate", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]
    code = main([*argv, "--infer-backend", "vllm"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "--infer-backend: vllm is not installed in this environment" in err
    assert not out.exists()


def test_validate_checks_a_seq_kd_config_without_generating(tmp_path, config_dict, fake, capsys):
    code = main(["validate", str(write_config(tmp_path, config_dict))])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "OK (gkd, RLHFArguments)" in out and "seq_kd=on" in out
    assert fake.loads == [] and not (tmp_path / "runs").exists()
