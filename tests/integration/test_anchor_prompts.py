"""KD-only anchor prompts (``custom.anchor``) on the tiny model, through ms-swift's real pipeline and GKD trainer.

- every buffer holds the data-set rows plus the anchor rows the ratio asks for, flagged per row;
- an anchor row without an assistant turn trains on the teacher's answer (written before training);
- the CE term is the one of the domain rows alone; the anchor rows add ``weight x`` their JSD and nothing
  else; ``llm_kd_loss`` stays the domain rows' term;
- a real run logs ``anchor_kd_loss`` beside ``llm_kd_loss`` in ``logging.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

import gkd_harness as h
import pytest
import torch
import torch.nn.functional as F

from anchorkd import swift_seam as seam
from anchorkd.trainers.gkd_monitor import ANCHOR_ROWS
from anchorkd.trainers.teacher_targets import PROVENANCE_KEY

pytestmark = pytest.mark.integration

MAX_NEW = 6
ANCHOR_WEIGHT = 2.0
END_OF_TURN = "<|im_end|>"
TEXT_ROW = {
    "messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]
}


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def anchor_file(env) -> Path:
    """Two general-caption prompts on the data's images without an answer, one text-only chat with one."""
    rows = h.read_jsonl(env.data_dir / "train.jsonl")
    prompts = [
        {
            "messages": [{"role": "user", "content": "<image>Describe this picture in a sentence."}],
            "images": row["images"],
        }
        for row in rows[:2]
    ]
    path = env.work / "anchor" / "general_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in [*prompts, TEXT_ROW]))
    return path


def anchor_extra(env, anchor_file: Path) -> tuple[str, ...]:
    return (
        *h.ANCHOR_EXTRA,
        f"custom.anchor.dataset=[{anchor_file}]",
        f"custom.anchor.weight={ANCHOR_WEIGHT}",
        "custom.anchor.ratio=0.5",
        f"rlhf.max_completion_length={MAX_NEW}",
        f"custom.teacher_targets.cache_dir={env.work / 'anchor-cache'}",
    )


@pytest.fixture(scope="module")
def built(env, anchor_file):
    built = h.build(
        h.STAGE2_GKD_DEMO, env.overrides("anchor-prompts", batch=2, extra=anchor_extra(env, anchor_file))
    )
    if not built.ready:
        model = h.unwrap(built.trainer)
        h.scale_lm_head(model, h.LM_HEAD_SCALE)
        assert h.perturb_lora(model, seed=1, scale=h.LORA_SCALE) > 0
        built.ready = True
    return built


def test_a_buffer_holds_the_anchor_rows_the_ratio_asks_for(built):
    trainer = built.trainer
    batch = h.prepare(trainer, h.dataset_rows(trainer, [0, 1]))
    flags = batch[ANCHOR_ROWS].tolist()
    assert flags == [False, False, True, True]  # ratio 0.5 of a step of 2 data-set rows
    assert batch[seam.MODEL_INPUTS]["labels"].shape[0] == 4


def test_anchor_rows_without_an_answer_train_on_the_teachers(built, anchor_file):
    """The anchor set the trainer draws from is the anchor file with the teacher's answers filled in (the
    text-only row keeps its own), and the supervised tokens of an anchor row are its answer."""
    trainer = built.trainer
    (completed,) = built.settings.config.custom.anchor.dataset
    written = h.read_jsonl(Path(completed))
    answered = [r for r in written if PROVENANCE_KEY in r]
    assert [r[PROVENANCE_KEY]["line"] for r in answered] == [1, 2]
    assert all(r[PROVENANCE_KEY]["source"] == str(anchor_file) for r in answered)
    assert all(r[PROVENANCE_KEY]["generated_tokens"] <= MAX_NEW for r in answered)
    assert written[2] == TEXT_ROW
    rows = [trainer.anchor_rows[i] for i in range(len(trainer.anchor_rows))]
    assert [r["messages"] for r in rows] == [r["messages"] for r in written]

    tokenizer = trainer.template.tokenizer
    batch = h.prepare(trainer, h.dataset_rows(trainer, [0, 1]))
    labels = batch[seam.MODEL_INPUTS]["labels"]
    answers = {r["messages"][-1]["content"] for r in written}
    for row in torch.nonzero(batch[ANCHOR_ROWS]).flatten().tolist():
        text = tokenizer.decode(labels[row][labels[row] != h.IGNORE_INDEX].tolist()).removesuffix("\n")
        assert text.endswith(END_OF_TURN) and text.removesuffix(END_OF_TURN) in answers


def test_on_policy_buffers_sample_the_domain_rows_and_keep_the_anchor_answers(built):
    """With lmbda 1 every buffer is the student's: its data-set rows get the student's samples, while an
    anchor row keeps its own answer or the teacher's (which take precedence over a student sample)."""
    trainer = built.trainer
    (completed,) = built.settings.config.custom.anchor.dataset
    answers = {r["messages"][-1]["content"] for r in h.read_jsonl(Path(completed))}
    rows = h.dataset_rows(trainer, [0, 1])
    captions = {r["messages"][-1]["content"] for r in rows}
    lmbda, trainer.lmbda = trainer.lmbda, 1.0
    try:
        batch = h.prepare(trainer, rows)
    finally:
        trainer.lmbda = lmbda
    assert not seam.batch_from_dataset(batch)
    flags = batch[ANCHOR_ROWS].tolist()
    assert any(flags) and not all(flags)
    tokenizer = trainer.template.tokenizer
    labels = batch[seam.MODEL_INPUTS]["labels"]
    for row, anchor in enumerate(batch[ANCHOR_ROWS].tolist()):
        supervised = labels[row][labels[row] != h.IGNORE_INDEX].tolist()
        text = tokenizer.decode(supervised).removesuffix("\n").removesuffix(END_OF_TURN)
        if anchor:
            assert text in answers
        else:  # sampled: at most max_completion_length tokens (+ the end of turn), not the data set's caption
            assert len(supervised) <= MAX_NEW + 2 and text not in captions


def test_ce_is_the_domain_rows_and_the_anchor_rows_add_only_their_weighted_jsd(built):
    trainer = built.trainer
    with h.configured(trainer):
        batch = h.prepare(trainer, h.dataset_rows(trainer, [2, 3]))
        anchors = batch[ANCHOR_ROWS]
        student, teacher = h.student_logits(trainer, batch), h.teacher_logits(trainer, batch)
        labels = batch[seam.MODEL_INPUTS]["labels"]
        domain = h.token_terms(
            student[~anchors], teacher[~anchors], labels[~anchors], trainer.beta, trainer.temperature
        )
        anchor = h.token_terms(
            student[anchors], teacher[anchors], labels[anchors], trainer.beta, trainer.temperature
        )
        loss = trainer.compute_loss(trainer.model, h.copy_batch(batch))
        logs = h.log_now(trainer)
    sft_alpha, kd_weight = 0.3, 0.5
    assert logs["sft_loss"] == pytest.approx(sft_alpha * domain.ce, rel=1e-4)
    assert logs["llm_kd_loss"] == pytest.approx(kd_weight * domain.jsd, rel=1e-3)
    assert logs["anchor_kd_loss"] == pytest.approx(ANCHOR_WEIGHT * anchor.jsd, rel=1e-3)
    assert anchor.jsd > 1e-6 and anchor.tokens > 0
    expected = sft_alpha * domain.ce + kd_weight * domain.jsd + ANCHOR_WEIGHT * anchor.jsd
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-3)
    # The CE with the anchor rows included would differ: they are really left out of it.
    everything = F.cross_entropy(student[:, :-1][labels[:, 1:] != -100], labels[:, 1:][labels[:, 1:] != -100])
    assert abs(float(everything) - domain.ce) > 1e-3
    assert logs["token_count"] == domain.tokens + anchor.tokens


def test_a_run_logs_anchor_kd_loss(env, anchor_file):
    overrides = env.overrides("anchor-run", steps=2, batch=2, extra=anchor_extra(env, anchor_file))
    result = h.run_training(h.STAGE2_GKD_DEMO, overrides)
    records = h.step_records(Path(result["logging_jsonl"]))
    assert len(records) == 2
    for record in records:
        assert record["anchor_kd_loss"] >= 0 and record["llm_kd_loss"] >= 0 and record["sft_loss"] > 0
    assert any(record["anchor_kd_loss"] > 0 for record in records)
