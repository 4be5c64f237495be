"""The named terms of one micro-batch's loss (specs 003/004), each a pure function of tensors.

``GKDTrainerWithMetrics`` gathers the inputs (hidden states or logits of student and teacher, shifted
labels, per-row anchor flags, token counts of the accumulation window) and composes

    loss = sft_loss + llm_kd_loss + anchor_kd_loss + vision_kd_loss

from :class:`LossTerms`, whose field names are the telemetry keys (``anchorkd.monitor.terms``). Every term
arrives weighted and normalised over the accumulation window, and carries the value the telemetry logs
for it: its mean over this micro-batch's own tokens, with the tokens that mean is weighted by when
micro-batches and ranks are averaged.

Token terms come in two steps, because CE and JSD share one pass over the vocabulary (and, fused, one
backward): :func:`fused_token_losses` or :func:`reference_token_losses` compute the raw per-kind values,
and :func:`ce_term`, :func:`lm_kd_term`, :func:`anchor_kd_term` weigh them. :func:`visual_kd_term` is one
step. Symbols in the shapes: ``B`` rows, ``T`` positions, ``H`` / ``H_t`` student / teacher hidden size,
``V`` vocabulary, ``N_i`` / ``D_i`` tokens / width of visual feature set ``i``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from .anchor import AnchoredTerms, fused_anchored_ce_jsd, reference_anchored_ce_jsd
from .fused import DEFAULT_CHUNK_SIZE, fused_ce_jsd
from .jsd import IGNORE_INDEX, generalized_jsd, masked_ce
from .visual import Distance, visual_kd_loss

__all__ = [
    "LossTerm",
    "LossTerms",
    "TokenLosses",
    "TokenWindow",
    "anchor_kd_term",
    "ce_term",
    "fused_token_losses",
    "lm_kd_term",
    "reference_token_losses",
    "visual_kd_term",
]

# ``(ce, jsd, anchor_jsd, correct_tokens)`` of a micro-batch; see :class:`~anchorkd.losses.anchor.AnchoredTerms`
# (without anchor prompts ``anchor_jsd`` is 0).
TokenLosses = AnchoredTerms


class TokenWindow(NamedTuple):
    """Tokens of one kind (domain-row, anchor-row or visual tokens) in this micro-batch and in its whole
    accumulation window, over all ranks. ``window >= 1``."""

    micro: int
    window: int


class LossTerm(NamedTuple):
    """One term of the loss.

    Attributes:
        loss: fp32 scalar, weighted: this term's part of the micro-batch's loss (differentiable).
        logged: the micro-batch's value for the telemetry (weighted, a mean over its own tokens); None when
            the micro-batch has none of the term's tokens.
        tokens: how many tokens ``logged`` is a mean over (its weight in the token-weighted means).
    """

    loss: torch.Tensor
    logged: float | None
    tokens: int


class LossTerms(NamedTuple):
    """A micro-batch's loss by named term; a field is None when its feature is off."""

    sft_loss: LossTerm
    llm_kd_loss: LossTerm | None = None
    anchor_kd_loss: LossTerm | None = None
    vision_kd_loss: LossTerm | None = None

    def present(self) -> Iterator[tuple[str, LossTerm]]:
        """``(telemetry key, term)`` of every term that is on, in field order."""
        for name, term in zip(self._fields, self, strict=True):
            if term is not None:
                yield name, term

    def total(self) -> torch.Tensor:
        """The loss: the terms that are on, added in field order."""
        terms = [term.loss for _, term in self.present()]
        loss = terms[0]
        for term in terms[1:]:
            loss = loss + term
        return loss


# --- the token pass: CE and JSD over the vocabulary ---------------------------------------------------


def fused_token_losses(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    anchor_rows: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_lm_head_weight: torch.Tensor | None,
    *,
    beta: float,
    temperature: float,
    domain_items: int,
    anchor_items: int,
    lm_kd: bool,
    anchored: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
) -> TokenLosses:
    """Domain CE, domain JSD and anchor-row JSD from hidden states, without full logits.

    Args:
        student_hidden: ``[B, T, H]`` final hidden states aligned with ``labels``.
        lm_head_weight: ``[V, H]`` student LM head (and ``student_lm_head_bias`` ``[V]``).
        labels: ``[B, T]`` shifted target ids, ``IGNORE_INDEX`` where nothing is supervised.
        anchor_rows: ``[B]`` bool (True: a KD-only anchor row), or None.
        teacher_hidden: ``[B, T, H_t]`` teacher hidden states on the same positions; needed when ``lm_kd``
            or ``anchored``.
        teacher_lm_head_weight: ``[V, H_t]`` (and ``teacher_lm_head_bias`` ``[V]``); None reuses the
            student's head, detached.
        domain_items / anchor_items: supervised domain / anchor tokens of the accumulation window (the
            normalisers).
        lm_kd: compute the domain rows' JSD (``llm_kd_weight > 0``).
        anchored: anchor prompts are on: split the rows by ``anchor_rows`` and add the anchor rows' JSD.

    Returns:
        :data:`TokenLosses`; the losses are fp32 scalars, differentiable w.r.t. the student's hidden states,
        head and bias.
    """
    heads = {"student_lm_head_bias": student_lm_head_bias, "teacher_lm_head_bias": teacher_lm_head_bias}
    if anchored:
        return fused_anchored_ce_jsd(
            student_hidden,
            lm_head_weight,
            labels,
            anchor_rows,
            teacher_hidden,
            teacher_lm_head_weight,
            beta=beta,
            temperature=temperature,
            domain_items=domain_items,
            anchor_items=anchor_items,
            domain_jsd=lm_kd,
            chunk_size=chunk_size,
            **heads,
        )
    result = fused_ce_jsd(
        student_hidden,
        lm_head_weight,
        labels,
        teacher_hidden if lm_kd else None,
        teacher_lm_head_weight,
        beta=beta,
        temperature=temperature,
        chunk_size=chunk_size,
        num_items=domain_items,
        compute_ce=True,
        compute_jsd=lm_kd,
        **heads,
    )
    return TokenLosses(result.ce, result.jsd, result.jsd.new_zeros(()), int(result.correct_tokens))


def reference_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    anchor_rows: torch.Tensor | None,
    *,
    beta: float,
    temperature: float,
    domain_items: int,
    anchor_items: int,
    lm_kd: bool,
    anchored: bool,
) -> TokenLosses:
    """The same values from full logits (``kd_loss_impl: reference``, the ground truth of the fused path).

    Args:
        student_logits: ``[B, T, V]``, aligned with ``labels`` ``[B, T]``.
        teacher_logits: ``[B, T, V]`` on the same positions; needed when ``lm_kd`` or ``anchored``.
        anchor_rows, domain_items, anchor_items, lm_kd, anchored: as in :func:`fused_token_losses`.
    """
    if anchored:
        return reference_anchored_ce_jsd(
            student_logits,
            teacher_logits,
            labels,
            anchor_rows,
            beta=beta,
            temperature=temperature,
            domain_items=domain_items,
            anchor_items=anchor_items,
            domain_jsd=lm_kd,
        )
    ce = masked_ce(student_logits, labels, num_items=domain_items)
    if lm_kd:
        jsd = generalized_jsd(
            student_logits, teacher_logits, labels, beta, temperature, num_items=domain_items
        )
    else:
        jsd = student_logits.new_zeros((), dtype=torch.float32)
    valid = labels != IGNORE_INDEX
    correct = int((student_logits.argmax(-1)[valid] == labels[valid]).sum())
    return TokenLosses(ce, jsd, jsd.new_zeros(()), correct)


# --- the weighted terms ------------------------------------------------------------------------------


def ce_term(ce: torch.Tensor, weight: float, tokens: TokenWindow) -> LossTerm:
    """``sft_loss = weight * ce``.

    ``ce``: fp32 scalar, the domain rows' token CE summed over this micro-batch / ``tokens.window``.
    ``weight``: ``sft_alpha`` with LM-head KD on, 1 without, 0 for the student's own samples.
    """
    return _token_term(weight * ce, tokens)


def lm_kd_term(jsd: torch.Tensor, weight: float, tokens: TokenWindow) -> LossTerm:
    """``llm_kd_loss = weight * jsd`` (``weight``: ``rlhf.llm_kd_weight``).

    ``jsd``: fp32 scalar, the domain rows' generalised JSD summed over this micro-batch / ``tokens.window``.
    """
    return _token_term(weight * jsd, tokens)


def anchor_kd_term(anchor_jsd: torch.Tensor, weight: float, tokens: TokenWindow) -> LossTerm:
    """``anchor_kd_loss = weight * anchor_jsd`` (``weight``: ``custom.anchor.weight``); logged only by
    micro-batches that hold anchor tokens.

    ``anchor_jsd``: fp32 scalar, the anchor rows' JSD summed over this micro-batch / ``tokens.window``
    (anchor-row tokens).
    """
    logged = None
    if tokens.micro:
        # Multiplied in Python floats in this order (not as the other token terms): unchanged since the
        # term was introduced, so that logs stay comparable bit for bit.
        logged = weight * float(anchor_jsd.detach()) * tokens.window / tokens.micro
    return LossTerm(weight * anchor_jsd, logged, tokens.micro)


def visual_kd_term(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    distance: Distance,
    weight: float,
    tokens: TokenWindow,
) -> LossTerm:
    """``vision_kd_loss = weight * distance * tokens.micro / tokens.window`` (``weight``:
    ``custom.visual_kd.weight``).

    Args:
        student_features: per captured module (merger, deepstack mergers), ``[N_i, D_i]`` student features.
        teacher_features: the teacher's ``[N_i, D_i]`` features of the same modules (constant).
        distance: ``"mse"`` or ``"cosine"`` (:func:`anchorkd.losses.visual.visual_kd_loss`: a per-token mean,
            averaged over the modules).
        tokens: merged visual tokens of this micro-batch and of its window: the share turns the per-token
            mean into this micro-batch's part of the window's mean.

    Logged: ``weight * distance``, the micro-batch's per-token mean, weighted by its visual tokens.
    """
    weighted = weight * visual_kd_loss(student_features, teacher_features, distance)
    return LossTerm(weighted * (tokens.micro / tokens.window), float(weighted.detach()), tokens.micro)


def _token_term(weighted: torch.Tensor, tokens: TokenWindow) -> LossTerm:
    """A window-normalised token term; logged as the mean over the micro-batch's own tokens."""
    to_micro_mean = tokens.window / max(tokens.micro, 1)
    return LossTerm(weighted, float(weighted.detach()) * to_micro_mean, tokens.micro)
