"""Feature-level visual KD: distance between student and teacher vision-merger outputs (spec 004).

Qwen3-VL's vision tower ends in a merger that projects patch features into the language model's
embedding space, plus one "deepstack" merger per selected vision layer whose outputs are added into
early language layers. Anchoring these outputs to the frozen teacher keeps the multimodal pathway from
drifting while LoRA heads on the language side adapt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Distance = Literal["mse", "cosine"]


def feature_distance(
    student: torch.Tensor, teacher: torch.Tensor, distance: Distance = "mse"
) -> torch.Tensor:
    """Mean per-token distance between two feature matrices.

    Args:
        student: ``[N, D]`` visual-token features of the student (requires grad).
        teacher: ``[N, D]`` the teacher's features for the same tokens (treated as constant).
        distance: ``"mse"``: mean over tokens of the mean squared difference over ``D``;
            ``"cosine"``: mean over tokens of ``1 - cos(student, teacher)``.

    Returns:
        fp32 scalar, normalised per token (and, for mse, per feature) so that the value does not grow
        with image resolution or hidden size. 0 when ``N == 0``.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student features {tuple(student.shape)} != teacher features {tuple(teacher.shape)}"
        )
    if student.numel() == 0:
        return student.float().sum() * 0.0
    student = student.float().reshape(-1, student.shape[-1])
    teacher = teacher.detach().float().reshape(-1, teacher.shape[-1])
    if distance == "mse":
        return (student - teacher).pow(2).mean(dim=-1).mean()
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()
    raise ValueError(f"unknown visual KD distance {distance!r}; choose mse or cosine")


def visual_kd_loss(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    distance: Distance = "mse",
) -> torch.Tensor:
    """Average of :func:`feature_distance` over matched feature sets (merger, deepstack mergers, ...).

    Averaging rather than summing keeps the scale of ``custom.visual_kd.weight`` independent of how
    many deepstack layers a checkpoint has.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"{len(student_features)} student feature sets vs {len(teacher_features)} teacher sets"
        )
    if not student_features:
        raise ValueError("no visual features captured: were there images in the batch?")
    terms = [
        feature_distance(s, t, distance) for s, t in zip(student_features, teacher_features, strict=True)
    ]
    return torch.stack(terms).mean()
