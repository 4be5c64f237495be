"""Teacher/student compatibility preflight (``anchorkd check`` and the check ``run_training`` makes first).

Each teacher is a clone of the tiny checkpoint (small files copied, the weights symlinked) with one thing
changed: the chat template, an image-processor setting, a special-token id, the vocabulary (two ids
swapped), or the vocabulary rows of the model (embedding and LM head padded to 152,064, as some
checkpoints ship them). Every change must be reported by name, before any weights are loaded; the CLI
exits 2.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import gkd_harness as h
import pytest

import anchorkd.trainers.preflight as preflight
from anchorkd.cli import EXIT_BAD_INPUT, main
from anchorkd.config import ConfigError, ConfigLoader

pytestmark = pytest.mark.integration

SMALL_FILE = 1_000_000  # bytes: copied; larger files are symlinked unless they are to be edited


@pytest.fixture(scope="module", autouse=True)
def cached_fingerprints():
    """Fingerprinting loads the 151k-token tokenizer (seconds); every case compares against the same
    student folder, so remember fingerprints per folder (each teacher clone is its own folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preflight, "fingerprint", functools.lru_cache(maxsize=None)(preflight.fingerprint))
        yield


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


def clone_checkpoint(source: Path, target: Path, edit: tuple[str, ...] = ()) -> Path:
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.stat().st_size < SMALL_FILE or item.name in edit:
            shutil.copy(item, target / item.name)
        else:
            (target / item.name).symlink_to(item.resolve())
    return target


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _change_chat_template(folder: Path) -> None:
    jinja = folder / "chat_template.jinja"
    jinja.write_text(jinja.read_text().replace("You are a helpful assistant.", "You are a rack inspector."))


def _change_pixel_budget(folder: Path) -> None:
    def change(data):
        data["image_processor"]["size"]["longest_edge"] = 4 * data["image_processor"]["size"]["longest_edge"]

    _edit_json(folder / "processor_config.json", change)


def _change_special_token_id(folder: Path) -> None:
    def change(data):
        for token in data["added_tokens"]:
            if token["content"] == "<|endoftext|>":
                token["id"] = 151700  # past every other id: the other special tokens keep theirs

    _edit_json(folder / "tokenizer.json", change)


def _pad_vocabulary_rows(folder: Path) -> None:
    """Pad the embedding and LM head with zero rows to 152,064 and say so in config.json."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows, width = weights[name].shape
        weights[name] = np.concatenate([weights[name], np.zeros((152064 - rows, width), weights[name].dtype)])
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    def change(data):
        data["text_config"]["vocab_size"] = 152064

    _edit_json(folder / "config.json", change)


def _swap_two_vocabulary_ids(folder: Path) -> None:
    def change(data):
        vocab = data["model"]["vocab"]
        by_id = {index: token for token, index in vocab.items() if index in (1000, 1001)}
        vocab[by_id[1000]], vocab[by_id[1001]] = 1001, 1000

    _edit_json(folder / "tokenizer.json", change)


CASES = {
    "chat-template": (_change_chat_template, (), "chat template differs"),
    "pixel-budget": (_change_pixel_budget, (), "image processor setting 'size' differs"),
    "special-token-id": (
        _change_special_token_id,
        ("tokenizer.json",),
        "special token '<|endoftext|>' id differs",
    ),
    "vocabulary": (
        _swap_two_vocabulary_ids,
        ("tokenizer.json",),
        "tokenizer vocabulary differs first at token id 1000 (student 'atus', teacher 'Th')",
    ),
    "padded-vocabulary-rows": (
        _pad_vocabulary_rows,
        ("model.safetensors",),
        "LM head rows differ (student 151936, teacher 152064): the KD loss compares the two models' logits "
        "row by row, so both need the same vocabulary size; input embedding rows differ (student 151936, "
        "teacher 152064); config vocab_size differs (student 151936, teacher 152064)",
    ),
}


def _teacher(env, tmp_path: Path, case: str | None) -> Path:
    if case is None:
        return clone_checkpoint(env.model_dir, tmp_path / "teacher")
    change, edit, _ = CASES[case]
    folder = clone_checkpoint(env.model_dir, tmp_path / f"teacher-{case}", edit)
    change(folder)
    return folder


def _cli_args(env, teacher: Path) -> list[str]:
    return ["check", str(h.STAGE2_GKD_DEMO), *env.overrides("preflight"), f"rlhf.teacher_model={teacher}"]


def test_identical_checkpoints_pass(env, tmp_path, capsys):
    teacher = _teacher(env, tmp_path, None)
    config = ConfigLoader.resolve(
        h.STAGE2_GKD_DEMO, [*env.overrides("preflight"), f"rlhf.teacher_model={teacher}"]
    )
    assert preflight.run_preflight(config) == [
        "LM head / embedding rows and vocab_size",
        "vocabulary",
        "special-token ids",
        "chat template",
        "image-processor settings",
    ]
    assert main(_cli_args(env, teacher)) == 0
    assert "compatible" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(CASES))
def test_mismatch_fails_naming_the_difference(env, tmp_path, capsys, case):
    teacher = _teacher(env, tmp_path, case)
    expected = CASES[case][2]
    config = ConfigLoader.resolve(
        h.STAGE2_GKD_DEMO, [*env.overrides("preflight"), f"rlhf.teacher_model={teacher}"]
    )
    with pytest.raises(ConfigError) as error:
        preflight.run_preflight(config)
    assert error.value.key_path == "rlhf.teacher_model"
    assert expected in str(error.value)
    assert main(_cli_args(env, teacher)) == EXIT_BAD_INPUT
    assert expected in capsys.readouterr().err


def test_run_training_fails_before_loading_weights(env, tmp_path, monkeypatch):
    """The preflight runs before any model is loaded or anything is written: a mismatched teacher stops
    run_training before build_pipeline is called and before the output dir exists."""
    import anchorkd.trainers.pipeline as pipeline_module

    def no_loading(*args, **kwargs):
        raise AssertionError("weights must not be loaded when the preflight fails")

    monkeypatch.setattr(pipeline_module, "build_pipeline", no_loading)
    teacher = _teacher(env, tmp_path, "chat-template")
    overrides = [*env.overrides("preflight-run"), f"rlhf.teacher_model={teacher}"]
    with pytest.raises(ConfigError, match="chat template differs"):
        pipeline_module.run_training(h.STAGE2_GKD_DEMO, overrides)
    assert not (env.work / "preflight-run").exists()


# --- what the checkpoints' own files tell (anchorkd.checkpoint_rules) ------------------------------------

SFT_DEMO = h.CONFIGS_DIR / "demo" / "stage_2_llm_lora.yaml"


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` (links not followed): size and modification time in nanoseconds."""
    return {
        str(path.relative_to(folder)): (path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


def no_model_loading(monkeypatch):
    """From here on, building ms-swift's pipeline (which loads the model) fails the test."""
    import anchorkd.trainers.pipeline as pipeline_module

    def no_loading(*args, **kwargs):
        raise AssertionError("no model may be loaded when a checkpoint rule refuses the run")

    monkeypatch.setattr(pipeline_module, "build_pipeline", no_loading)
    return pipeline_module


CHECKPOINT_CASES = {
    # a target that names no module of the tiny Qwen3-VL, next to one that does
    "target-modules": (
        ("tuner.target_modules=[q_proj, qproj]",),
        "tuner.target_modules[1]",
        "'qproj' matches no",
    ),
    # Qwen2-VL's type on a Qwen3-VL checkpoint
    "model-type": (("model.model_type=qwen2_vl",), "model.model_type", "'qwen2_vl' does not fit"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_train_refuses_what_the_checkpoint_files_tell_before_loading(env, monkeypatch, capsys, case):
    extra, key, expected = CHECKPOINT_CASES[case]
    pipeline_module = no_model_loading(monkeypatch)
    overrides = env.overrides(f"checkpoint-rule-{case}", extra=extra)
    with pytest.raises(ConfigError) as error:
        pipeline_module.run_training(SFT_DEMO, overrides)
    assert error.value.key_path == key and expected in error.value.rule
    assert main(["train", "--config", str(SFT_DEMO), *overrides]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"anchorkd: error: {key}: {expected}" in err and "Traceback" not in err
    assert not (env.work / f"checkpoint-rule-{case}").exists()


def test_resume_under_another_lora_rank_is_refused_and_the_run_folder_is_left_alone(env, monkeypatch, capsys):
    """A real 2-step run at rank 4, then ``train ... tuner.lora_rank=8 resume_from_checkpoint=auto``: refused
    naming rank 4 against 8 before anything loads, every file of the run folder as it was."""
    name = "resume-other-rank"
    trained = h.run_training(SFT_DEMO, env.overrides(name, steps=2, batch=2, extra=("tuner.lora_rank=4",)))
    run_dir = Path(trained["output_dir"])
    checkpoint = run_dir / "checkpoint-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 4
    before = folder_state(run_dir)
    no_model_loading(monkeypatch)
    capsys.readouterr()  # the training's own output
    resume = env.overrides(
        name, steps=4, batch=2, extra=("tuner.lora_rank=8", "training.resume_from_checkpoint=auto")
    )
    for command in ("validate", "check", "train"):
        config_flag = ["--config"] if command == "train" else []
        assert main([command, *config_flag, str(SFT_DEMO), *resume]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert (
            f"anchorkd: error: tuner.lora_rank: 8 here, but the checkpoint {checkpoint.resolve()} was trained with 4 "
            "(adapter_config.json)"
        ) in err
        assert "Traceback" not in err
        assert folder_state(run_dir) == before
    # The same resume at the checkpoint's rank passes the checks.
    same = env.overrides(
        name, steps=4, batch=2, extra=("tuner.lora_rank=4", "training.resume_from_checkpoint=auto")
    )
    assert main(["validate", str(SFT_DEMO), *same]) == 0
    assert folder_state(run_dir) == before
