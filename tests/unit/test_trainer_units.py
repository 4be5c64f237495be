"""Unit tests of the trainer's small helpers (no model, no ms-swift pipeline).

Label shifting and token counting, the feature-capture hooks that file outputs under the active role,
reading the LM-head weight through a PEFT wrapper, and the loss as named terms: ``compute_loss`` on a fake
batch against the pure loss functions.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from swift.rlhf_trainers.gkd_loss import DataSource
from torch import nn

from anchorkd import swift_seam as seam
from anchorkd.losses import generalized_jsd, masked_ce
from anchorkd.losses.terms import LossTerm, LossTerms
from anchorkd.losses.visual import visual_kd_loss
from anchorkd.monitor.terms import METRIC_NAMES
from anchorkd.trainers.anchor_mix import interleave
from anchorkd.trainers.features import (
    STUDENT,
    TEACHER,
    FeatureCapture,
    find_language_body,
    find_lm_head,
    find_visual_module,
    lm_head_weight,
)
from anchorkd.trainers.gkd_monitor import (
    ANCHOR_ROWS,
    WINDOW_ANCHOR_TOKENS,
    WINDOW_TOKENS,
    WINDOW_VISUAL_TOKENS,
    GKDTrainerWithMetrics,
    anchor_row_flags,
    shift_labels,
    supervised_tokens,
    visual_tokens,
)

IGNORE = -100


# --- labels and token counts -----------------------------------------------------------------------------


def test_shift_labels_aligns_each_logit_with_the_next_token():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7], [IGNORE, 8, 9, IGNORE, IGNORE]])
    original = labels.clone()
    shifted = shift_labels(labels)
    assert shifted.tolist() == [[IGNORE, 5, 6, 7, IGNORE], [8, 9, IGNORE, IGNORE, IGNORE]]
    assert torch.equal(labels, original), "the input must not be modified"
    # the last position predicts nothing, whatever the label there was
    assert shift_labels(torch.tensor([[1, 2, 3]])).tolist() == [[2, 3, IGNORE]]


def test_supervised_tokens_counts_predicted_positions():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7], [IGNORE, 8, 9, IGNORE, IGNORE]])
    assert supervised_tokens({"labels": labels}) == 5
    # a label at position 0 is never predicted (no logit before it)
    assert supervised_tokens({"labels": torch.tensor([[4, IGNORE, IGNORE]])}) == 0
    assert supervised_tokens({"labels": torch.full((2, 3), IGNORE)}) == 0


def test_visual_tokens_from_grid_thw():
    inputs = {
        "image_grid_thw": torch.tensor([[1, 8, 8], [1, 4, 6]]),  # 64 + 24 patches
        "video_grid_thw": torch.tensor([[2, 4, 4]]),  # 32 patches
    }
    assert visual_tokens(inputs, merge_size=2) == (64 + 24 + 32) // 4
    assert visual_tokens({"image_grid_thw": torch.tensor([[1, 8, 8]])}, merge_size=1) == 64
    assert visual_tokens({"image_grid_thw": None}, merge_size=2) == 0
    assert visual_tokens({}, merge_size=2) == 0


# --- FeatureCapture ------------------------------------------------------------------------------------------


class _Output:
    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden


class _Body(nn.Module):
    def forward(self, x):
        return _Output(x * 2)


class _Pair(nn.Module):
    def forward(self, x):
        return x + 1, x - 1


def test_feature_capture_files_outputs_under_the_active_role():
    student_module, teacher_module, shared = nn.Linear(3, 3), nn.Linear(3, 3), _Body()
    capture = FeatureCapture()
    capture.watch({"student_only": student_module}, roles=(STUDENT,))
    capture.watch({"teacher_only": teacher_module}, roles=(TEACHER,))
    capture.watch({"shared": shared})  # both roles: the base-anchor case (one module tree, two roles)
    x = torch.randn(2, 3)

    # calls outside any role (e.g. generation while sampling) are ignored
    student_module(x), teacher_module(x), shared(x)
    assert capture.features == {STUDENT: {}, TEACHER: {}}

    with capture.role(STUDENT) as student_features:
        expected_student = student_module(x)
        teacher_module(x)  # not watched for the student role
        shared(x)
    assert set(student_features) == {"student_only", "shared"}
    assert student_features["student_only"] is expected_student
    assert torch.equal(student_features["shared"], x * 2)  # last_hidden_state of a model output

    with capture.role(TEACHER) as teacher_features:
        student_module(x)
        expected_teacher = teacher_module(x)
        shared(x + 1)
    assert set(teacher_features) == {"teacher_only", "shared"}
    assert teacher_features["teacher_only"] is expected_teacher
    assert torch.equal(teacher_features["shared"], (x + 1) * 2)
    assert capture.features[STUDENT] is student_features  # the student's entries were kept

    with capture.role(STUDENT) as again:
        pass
    assert again == {}, "entering a role starts it afresh"

    capture.clear()
    assert capture.features == {STUDENT: {}, TEACHER: {}}
    capture.remove()
    with capture.role(STUDENT) as after_remove:
        student_module(x), shared(x)
    assert after_remove == {}


def test_feature_capture_roles_nest_and_tuple_outputs_keep_the_first():
    pair = _Pair()
    capture = FeatureCapture()
    capture.watch({"pair": pair})
    x = torch.zeros(1, 2)
    with capture.role(STUDENT) as student_features:
        with capture.role(TEACHER) as teacher_features:
            pair(x)
        pair(x + 10)  # back in the student role after the inner block
    assert torch.equal(teacher_features["pair"], x + 1)
    assert torch.equal(student_features["pair"], x + 11)
    assert capture._role is None


def test_feature_capture_restores_role_after_an_error():
    capture = FeatureCapture()
    with pytest.raises(RuntimeError), capture.role(TEACHER):
        raise RuntimeError("teacher forward failed")
    assert capture._role is None


# --- finding modules and the LM-head weight -------------------------------------------------------------------


class _VisualTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.merger = nn.Linear(4, 4)


class _VLBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = _VisualTower()
        self.language_model = nn.Linear(4, 4)


class _VLModel(nn.Module):
    """Shaped like Qwen3VLForConditionalGeneration: model.{visual, language_model} + lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _VLBody()
        self.lm_head = nn.Linear(4, 10, bias=True)

    @property
    def language_model(self):
        return self.model.language_model

    @property
    def visual(self):
        return self.model.visual

    def get_output_embeddings(self):
        return self.lm_head


def test_find_modules_on_a_vl_shaped_model():
    model = _VLModel()
    assert find_language_body(model) is model.model
    assert find_lm_head(model) is model.lm_head
    name, visual = find_visual_module(model)
    assert name == "model.visual" and visual is model.model.visual
    with pytest.raises(ValueError):
        find_language_body(nn.Linear(2, 2))
    with pytest.raises(ValueError):
        find_lm_head(SimpleNamespace(get_output_embeddings=lambda: None))


def test_lm_head_weight_reads_through_a_peft_base_layer():
    from peft import LoraConfig, get_peft_model

    model = _VLModel()
    base_weight, base_bias = model.lm_head.weight, model.lm_head.bias
    assert lm_head_weight(model.lm_head) == (base_weight, base_bias)

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    head = find_lm_head(peft_model)
    assert hasattr(head, "base_layer")
    weight, bias = lm_head_weight(head, use_base=True)
    assert weight is head.base_layer.weight and bias is head.base_layer.bias
    assert weight is base_weight and bias is base_bias
    # the frozen base is what a base-anchor teacher uses; the adapter does change the head's output
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert not torch.allclose(head(x), nn.functional.linear(x, weight, bias))
        with peft_model.disable_adapter():
            assert torch.allclose(head(x), nn.functional.linear(x, weight, bias))


# --- the loss as named terms ----------------------------------------------------------------------------------


def test_loss_terms_add_the_terms_that_are_on_in_field_order():
    ce = LossTerm(torch.tensor(1.5), 3.0, 4)
    anchor = LossTerm(torch.tensor(0.25), None, 0)  # a micro-batch without anchor tokens logs nothing
    terms = LossTerms(sft_loss=ce, anchor_kd_loss=anchor)
    assert [name for name, _ in terms.present()] == ["sft_loss", "anchor_kd_loss"]
    assert float(terms.total()) == 1.75
    # the field names are the telemetry keys the monitor knows
    assert set(LossTerms._fields) <= set(METRIC_NAMES)


@pytest.mark.parametrize(
    ("domain_chunks", "anchors"), [([2, 2], 2), ([2, 2, 2], 2), ([1], 3), ([3, 1, 2], 5), ([2, 0], 1)]
)
def test_anchor_row_flags_read_the_layout_interleave_makes(domain_chunks, anchors):
    chunks, flags = interleave([[f"d{i}"] * size for i, size in enumerate(domain_chunks)], ["a"] * anchors)
    assert anchor_row_flags([len(chunk) for chunk in chunks], anchors) == flags
    assert [[row == "a" for row in chunk] for chunk in chunks] == flags


V, H, PATCH = 23, 8, 6
GRID = torch.tensor([[1, 2, 2], [1, 2, 2]])  # one 4-patch image per row; merge size 1: 4 visual tokens each


class _FakeVisual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.merger = nn.Linear(PATCH, H)
        self.deepstack_merger_list = nn.ModuleList([nn.Linear(PATCH, H)])

    def forward(self, pixel_values):
        return self.merger(pixel_values), [merger(pixel_values) for merger in self.deepstack_merger_list]


class _FakeVLBody(nn.Module):
    """Shaped like Qwen3VLModel for the trainer's lookups: ``language_model`` and ``visual``, no LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.language_model = nn.Embedding(V, H)
        self.visual = _FakeVisual()
        self.mix = nn.Linear(H, H)

    def get_image_features(self, pixel_values, image_grid_thw):
        return self.visual(pixel_values)

    def forward(self, input_ids, pixel_values, image_grid_thw, attention_mask=None):
        merged, deepstack = self.visual(pixel_values)
        per_row = (merged + deepstack[0]).reshape(input_ids.shape[0], -1, H).mean(1)
        hidden = torch.tanh(self.mix(self.language_model(input_ids) + per_row[:, None]))
        return SimpleNamespace(last_hidden_state=hidden)


class _FakeVLModel(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = _FakeVLBody()
        self.lm_head = nn.Linear(H, V)
        self.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=1))

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, logits_to_keep: int = 0, **inputs):
        hidden = self.model(**inputs).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden))


def _fake_trainer(impl: str) -> GKDTrainerWithMetrics:
    """The trainer's own loss code around two fake VL models (student, separate teacher), without ms-swift's
    set-up: the attributes ``compute_loss`` reads, then the trainer's own hooks."""
    from anchorkd.config.schema import AnchorPromptsConfig, MonitorConfig, VisualKDConfig
    from anchorkd.config.settings import AnchorSettings

    trainer = GKDTrainerWithMetrics.__new__(GKDTrainerWithMetrics)
    trainer.model, trainer.teacher_model = _FakeVLModel(seed=0), _FakeVLModel(seed=1).requires_grad_(False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda model: model, device=torch.device("cpu"))
    trainer.args = SimpleNamespace(
        sft_alpha=0.3, offload_teacher_model=False, gradient_checkpointing_kwargs=None
    )
    trainer.beta, trainer.temperature = 0.5, 0.9
    trainer.state = SimpleNamespace(global_step=0)
    trainer.anchor = AnchorSettings(
        mode="gkd",
        trainer_variant="gkd_monitor",
        llm_kd_weight=0.5,
        visual_kd=VisualKDConfig(enabled=True, weight=0.7),
        kd_loss_impl=impl,
        kd_chunk_size=3,
        monitor=MonitorConfig(),
        teacher_mode="separate",
        seq_kd=False,
        anchor_prompts=AnchorPromptsConfig(dataset=["anchors.jsonl"], weight=2.0, ratio=0.5),
        teacher_cache=None,
    )
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._metric_weights = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._warned_nonfinite = set()
    trainer._capture = FeatureCapture()
    trainer._register_hooks()
    trainer.model.train()
    return trainer


def _fake_batch(data_source: DataSource) -> dict:
    """Row 0 a data-set row, row 1 an anchor row; the window counts say more micro-batches share the step."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, V, (2, 7), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = IGNORE  # prompts
    labels[1, -1] = IGNORE  # rows of different lengths
    model_inputs = {
        seam.LABELS: labels,
        "input_ids": input_ids,
        seam.PIXEL_VALUES: torch.randn(8, PATCH, generator=generator),
        seam.IMAGE_GRID_THW: GRID,
    }
    return {
        seam.MODEL_INPUTS: model_inputs,
        seam.TEACHER_INPUTS: dict(model_inputs),
        seam.GKD_BATCH: SimpleNamespace(data_source=data_source),
        ANCHOR_ROWS: torch.tensor([False, True]),
        WINDOW_TOKENS: 8,  # this micro-batch: 4 domain tokens, 3 anchor tokens, 8 visual tokens
        WINDOW_ANCHOR_TOKENS: 5,
        WINDOW_VISUAL_TOKENS: 16,
    }


def _oracle(trainer, batch: dict, from_dataset: bool):
    """The loss and the logged values straight from the pure functions, on each kind of row apart."""
    student, teacher = trainer.model, trainer.teacher_model
    inputs = {k: v for k, v in batch[seam.MODEL_INPUTS].items() if k != seam.LABELS}
    labels = shift_labels(batch[seam.MODEL_INPUTS][seam.LABELS])
    student_logits = student(**inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    beta, temperature = trainer.beta, trainer.temperature
    domain, anchor = [0], [1]
    ce = masked_ce(student_logits[domain], labels[domain], num_items=8)
    jsd = generalized_jsd(
        student_logits[domain], teacher_logits[domain], labels[domain], beta, temperature, num_items=8
    )
    anchor_jsd = generalized_jsd(
        student_logits[anchor], teacher_logits[anchor], labels[anchor], beta, temperature, num_items=5
    )
    pixels = inputs[seam.PIXEL_VALUES]
    student_visual = [
        student.model.visual.merger(pixels),
        student.model.visual.deepstack_merger_list[0](pixels),
    ]
    with torch.no_grad():
        teacher_visual = [
            teacher.model.visual.merger(pixels),
            teacher.model.visual.deepstack_merger_list[0](pixels),
        ]
    visual = visual_kd_loss(student_visual, teacher_visual, "mse")
    sft_weight = 0.3 if from_dataset else 0.0
    loss = sft_weight * ce + 0.5 * jsd + 2.0 * anchor_jsd + 0.7 * visual * 8 / 16
    valid = labels[domain] != IGNORE
    correct = int((student_logits[domain].argmax(-1)[valid] == labels[domain][valid]).sum())
    logged = {
        "sft_loss": (sft_weight * float(ce) * 8 / 4, 4),
        "llm_kd_loss": (0.5 * float(jsd) * 8 / 4, 4),
        "anchor_kd_loss": (2.0 * float(anchor_jsd) * 5 / 3, 3),
        "vision_kd_loss": (0.7 * float(visual), 8),
        "token_accuracy": (correct / 4, 4),
    }
    return loss, logged


@pytest.mark.parametrize("from_dataset", [True, False], ids=["data-set rows", "student samples"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_compute_loss_is_the_sum_of_the_named_terms_each_logged(impl, from_dataset):
    """``compute_loss`` on a fake batch (a domain row and an anchor row, one image each, window counts of a
    larger step) equals the pure functions' values on each kind of row: CE and LM KD of the domain row, the
    anchor row's KD, the visual distance weighted by the micro-batch's share of visual tokens; each term is
    logged as its mean over this micro-batch's own tokens, weighted by them; gradients agree."""
    trainer = _fake_trainer(impl)
    batch = _fake_batch(DataSource.DATASET if from_dataset else DataSource.STUDENT)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()

    expected_loss, expected_logged = _oracle(trainer, batch, from_dataset)
    expected_loss.backward()
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-5)
    assert (
        float(expected_logged["llm_kd_loss"][0]) > 0.01 and float(expected_logged["anchor_kd_loss"][0]) > 0.01
    )
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)

    metrics, weights = seam.metric_store(trainer)["train"], trainer._metric_weights["train"]
    for name, (value, tokens) in expected_logged.items():
        assert metrics[name] == [pytest.approx(value, rel=1e-5, abs=1e-12)], name
        assert weights[name] == [tokens], name
    assert metrics["token_count"] == [7.0]  # every supervised token, the anchor row's included
    assert trainer._capture.features == {STUDENT: {}, TEACHER: {}}, "captures are dropped after the loss"
