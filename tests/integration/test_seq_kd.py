"""Sequence-level KD (``rlhf.seq_kd: true``) on the tiny model, through ms-swift's real pipeline and GKD trainer.

- the labels the trainer encodes are exactly the teacher's greedy answers, generated independently with
  ``anchorkd eval generate``'s code path on the same prompts;
- TRL's precedence: with ``lmbda 1`` every batch is the student's sample, with ``lmbda 0`` every batch is
  the teacher's sequence;
- the cache: a two-epoch run generates each answer once, and resuming it generates nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import gkd_harness as h
import pytest

from anchorkd import swift_seam as seam
from anchorkd.trainers import teacher_targets as tt

pytestmark = pytest.mark.integration

MAX_NEW = 12
END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


def seq_kd_extra(cache: Path, *extra: str) -> tuple[str, ...]:
    return (
        "rlhf.seq_kd=true",
        f"rlhf.max_completion_length={MAX_NEW}",
        f"custom.teacher_targets.cache_dir={cache}",
        # One prompt per forward, as in the independent generation below: batched greedy decoding pads,
        # which may flip near-ties of the tiny model's almost uniform logits.
        "custom.teacher_targets.batch_size=1",
        *extra,
    )


@pytest.fixture(scope="module")
def forward_only(env):
    return h.build(h.STAGE2_GKD_DEMO, env.overrides("seq-kd", extra=seq_kd_extra(env.work / "seq-kd-cache")))


class GenerationCounter:
    """Wraps the teacher's generation (in-process), counting the prompts it answers."""

    def __init__(self, monkeypatch) -> None:
        self.prompts = 0
        real = tt.generate_responses

        def counted(loaded, batch, request_config):
            self.prompts += len(batch)
            return real(loaded, batch, request_config)

        monkeypatch.setattr(tt, "generate_responses", counted)


def label_texts(trainer) -> list[str]:
    """The supervised tokens of every training row as the trainer encodes them, decoded."""
    tokenizer = trainer.template.tokenizer
    texts = []
    for index in range(len(trainer.train_dataset)):
        batch = h.prepare(trainer, h.dataset_rows(trainer, [index]))
        assert seam.batch_from_dataset(batch)
        labels = batch[seam.MODEL_INPUTS]["labels"][0]
        texts.append(tokenizer.decode(labels[labels != h.IGNORE_INDEX].tolist()))
    return texts


def test_trained_labels_are_the_teachers_greedy_answers(env, forward_only, tmp_path):
    """Generate independently (``eval.generate`` with the run's prompt settings) and compare with the
    supervised tokens of every row the trainer encodes: the same text, then the end-of-turn token."""
    from anchorkd.eval.generate import generate_captions
    from anchorkd.eval.model import PromptSettings, load_model

    teacher = load_model(
        env.model_dir, torch_dtype="float32", prompt_settings=PromptSettings(max_pixels=h.MAX_PIXELS)
    )
    generations = generate_captions(
        teacher, None, [env.data_dir / "train.jsonl"], tmp_path, batch_size=1, max_new_tokens=MAX_NEW
    )
    captions = [json.loads(line)["caption"] for line in generations.read_text().splitlines()]
    assert len(set(captions)) == len(captions) == 6  # distinct answers, so the comparison below is sharp

    trained = label_texts(forward_only.trainer)
    assert all(text.startswith(tuple(captions)) for text in trained)
    ends = {text[len(next(c for c in captions if text.startswith(c))) :] for text in trained}
    assert ends <= {END_OF_TURN, END_OF_TURN + "\n"}
    stripped = [text.removesuffix("\n").removesuffix(END_OF_TURN) for text in trained]
    assert Counter(stripped) == Counter(captions)  # dataset rows may be shuffled; every answer once
    # ms-swift trained on the teacher-target file, not on the data set's answers.
    (dataset,) = forward_only.train_args.dataset
    assert Path(dataset).parent == env.work / "seq-kd-cache" / tt.DATASETS_DIR


def test_lmbda_precedence(env, forward_only):
    """TRL's precedence: lmbda 0 trains on the teacher's sequences every time (ms-swift's draw is
    ``random() <= lmbda`` per generation buffer). lmbda 1 would train on the student's own samples every
    time, so the teacher's answers would never train: seq_kd with it is refused before anything is written."""
    from anchorkd.config import ConfigError

    trainer = forward_only.trainer
    for index in range(3):
        batch = h.prepare(trainer, h.dataset_rows(trainer, [index]))
        assert seam.batch_from_dataset(batch) is True
    cache = env.work / "seq-kd-on-policy-cache"
    with pytest.raises(ConfigError) as info:
        h.build(
            h.STAGE2_GKD_DEMO, env.overrides("seq-kd-on-policy", extra=seq_kd_extra(cache, "rlhf.lmbda=1.0"))
        )
    assert info.value.key_path == "rlhf.seq_kd" and "has no effect with rlhf.lmbda: 1" in str(info.value)
    assert not cache.exists()


def test_answers_are_generated_once_across_epochs_and_resume(env, tmp_path, monkeypatch):
    """A two-epoch run in ms-swift's versioned run folder, then resumed from its first checkpoint (the
    resume points the output dir at that run folder): each answer is generated once, in the default cache
    beside the output dir."""
    counter = GenerationCounter(monkeypatch)
    extra = (
        "rlhf.seq_kd=true",
        f"rlhf.max_completion_length={MAX_NEW}",
        "training.max_steps=-1",
        "training.num_train_epochs=2",
        "training.save_total_limit=2",
        "training.add_version=true",
    )
    output = tmp_path / "runs" / "seq_kd"
    overrides = h.run_overrides(
        env.quick_overrides, env.model_dir, env.data_dir, output, steps=3, batch=2, extra=extra
    )
    cache = tmp_path / "runs" / "teacher_targets"

    summary = h.run_training(h.STAGE2_GKD_DEMO, overrides)
    run_dir = Path(summary["output_dir"])
    assert run_dir.parent == output  # ms-swift's v<N>-<time> folder
    records = h.step_records(summary["logging_jsonl"])
    assert summary["global_step"] == 6 and records[-1]["epoch"] == pytest.approx(2.0)
    assert counter.prompts == 6  # six rows, two epochs: each answer generated once
    answers = sorted((cache / tt.ROWS_DIR).rglob("*.json"))
    assert len(answers) == 6
    args = json.loads((run_dir / "args.json").read_text())
    assert [Path(p).parent for p in args["dataset"]] == [cache / tt.DATASETS_DIR]

    resumed = h.run_training(
        h.STAGE2_GKD_DEMO, [*overrides, f"training.resume_from_checkpoint={run_dir / 'checkpoint-3'}"]
    )
    assert Path(resumed["output_dir"]) == run_dir and resumed["global_step"] == 6
    assert counter.prompts == 6  # nothing generated again
    assert sorted((cache / tt.ROWS_DIR).rglob("*.json")) == answers
