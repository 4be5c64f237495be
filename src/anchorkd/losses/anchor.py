"""The loss of a micro-batch that mixes domain rows with KD-only anchor rows (``custom.anchor``).

A micro-batch's rows are split by a per-row flag into two label masks over the same positions:

- domain rows: token CE and the generalised JSD, each ``sum over the domain rows' supervised positions /
  domain_items``;
- anchor rows: the generalised JSD only (never CE), ``sum over the anchor rows' supervised positions /
  anchor_items``.

The caller weighs them (``sft_alpha * ce + llm_kd_weight * jsd + anchor.weight * anchor_jsd``). Both parts
use the conventions of :mod:`anchorkd.losses.jsd` (JSD on ``logits / temperature``, CE on raw logits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .fused import DEFAULT_CHUNK_SIZE, fused_ce_jsd
from .jsd import IGNORE_INDEX, generalized_jsd, masked_ce

__all__ = ["AnchoredTerms", "fused_anchored_ce_jsd", "reference_anchored_ce_jsd", "split_rows"]


class AnchoredTerms(NamedTuple):
    """Result of the anchored losses.

    Attributes:
        ce: fp32 scalar, domain rows' CE sum / ``domain_items``.
        jsd: fp32 scalar, domain rows' JSD sum / ``domain_items`` (0 when not computed).
        anchor_jsd: fp32 scalar, anchor rows' JSD sum / ``anchor_items``.
        correct_tokens: int, domain positions whose label is the student's argmax.
    """

    ce: torch.Tensor
    jsd: torch.Tensor
    anchor_jsd: torch.Tensor
    correct_tokens: int


def split_rows(
    labels: torch.Tensor, anchor_rows: torch.Tensor | None, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(domain_labels, anchor_labels)``: ``labels`` with the other kind of row masked out.

    Args:
        labels: ``[B, T]`` target ids (already shifted), ``ignore_index`` where nothing is supervised.
        anchor_rows: ``[B]`` bool, True for anchor rows; None means no anchor row.

    Returns:
        Two ``[B, T]`` tensors; every supervised position of ``labels`` is supervised in exactly one.
    """
    if anchor_rows is None:
        return labels, torch.full_like(labels, ignore_index)
    if anchor_rows.shape != labels.shape[:1]:
        raise ValueError(
            f"anchor_rows {tuple(anchor_rows.shape)} must be [B] for labels {tuple(labels.shape)}"
        )
    is_anchor = anchor_rows.to(device=labels.device, dtype=torch.bool)[:, None].expand_as(labels)
    ignored = torch.full_like(labels, ignore_index)
    return torch.where(is_anchor, ignored, labels), torch.where(is_anchor, labels, ignored)


def supervised_counts(
    labels: torch.Tensor, anchor_rows: torch.Tensor | None, ignore_index: int = IGNORE_INDEX
) -> tuple[int, int]:
    """``(domain, anchor)`` supervised positions of ``[B, T]`` shifted ``labels``."""
    domain, anchor = split_rows(labels, anchor_rows, ignore_index)
    return int((domain != ignore_index).sum()), int((anchor != ignore_index).sum())


def fused_anchored_ce_jsd(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    anchor_rows: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor | None = None,
    *,
    beta: float,
    temperature: float = 1.0,
    domain_items: int,
    anchor_items: int,
    domain_jsd: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
) -> AnchoredTerms:
    """Domain CE (+ JSD) and anchor-row JSD from hidden states (:func:`fused_ce_jsd` on each row subset).

    Args:
        student_hidden: ``[B, T, H]`` final hidden states aligned with ``labels``.
        lm_head_weight: ``[V, H]`` student LM head.
        labels: ``[B, T]`` shifted target ids.
        anchor_rows: ``[B]`` bool (True: anchor row), or None.
        teacher_hidden: ``[B, T, H_t]`` teacher hidden states on the same positions (constant).
        teacher_lm_head_weight: ``[V, H_t]``; None reuses the student's head (detached).
        domain_items / anchor_items: normalisers of the domain and anchor terms (supervised tokens of each
            kind over the accumulation window).
        domain_jsd: compute the domain rows' JSD (``llm_kd_weight > 0``).

    Returns:
        :class:`AnchoredTerms`, differentiable w.r.t. the student's hidden states, head and bias.
    """
    domain_labels, anchor_labels = split_rows(labels, anchor_rows)
    common = {
        "beta": beta,
        "temperature": temperature,
        "chunk_size": chunk_size,
        "student_lm_head_bias": student_lm_head_bias,
        "teacher_lm_head_bias": teacher_lm_head_bias,
    }
    domain = fused_ce_jsd(
        student_hidden,
        lm_head_weight,
        domain_labels,
        teacher_hidden if domain_jsd else None,
        teacher_lm_head_weight if domain_jsd else None,
        num_items=domain_items,
        compute_ce=True,
        compute_jsd=domain_jsd,
        **common,
    )
    anchor = fused_ce_jsd(
        student_hidden,
        lm_head_weight,
        anchor_labels,
        teacher_hidden,
        teacher_lm_head_weight,
        num_items=anchor_items,
        compute_ce=False,
        compute_jsd=True,
        **common,
    )
    return AnchoredTerms(domain.ce, domain.jsd, anchor.jsd, int(domain.correct_tokens))


def reference_anchored_ce_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    anchor_rows: torch.Tensor | None,
    *,
    beta: float,
    temperature: float = 1.0,
    domain_items: int,
    anchor_items: int,
    domain_jsd: bool = True,
) -> AnchoredTerms:
    """The same terms from full logits (``[B, T, V]`` each, aligned with ``[B, T]`` ``labels``)."""
    domain_labels, anchor_labels = split_rows(labels, anchor_rows)
    ce = masked_ce(student_logits, domain_labels, num_items=domain_items)
    if domain_jsd:
        jsd = generalized_jsd(
            student_logits, teacher_logits, domain_labels, beta, temperature, num_items=domain_items
        )
    else:
        jsd = student_logits.new_zeros((), dtype=torch.float32)
    anchor_jsd = generalized_jsd(
        student_logits, teacher_logits, anchor_labels, beta, temperature, num_items=anchor_items
    )
    valid = domain_labels != IGNORE_INDEX
    correct = int((student_logits.argmax(-1)[valid] == domain_labels[valid]).sum())
    return AnchoredTerms(ce, jsd, anchor_jsd, correct)
