"""Unit tests of the trainer's small helpers (no model, no ms-swift pipeline).

Label shifting and token counting, the feature-capture hooks that file outputs under the active role, and
reading the LM-head weight through a PEFT wrapper.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from anchorkd.trainers.features import (
    STUDENT,
    TEACHER,
    FeatureCapture,
    find_language_body,
    find_lm_head,
    find_visual_module,
    lm_head_weight,
)
from anchorkd.trainers.gkd_monitor import shift_labels, supervised_tokens, visual_tokens

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
