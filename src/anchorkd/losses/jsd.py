"""Reference (full-logits) generalised JSD and cross-entropy.

These functions materialise ``[..., V]`` log-probabilities and are the ground truth that the
fused path (:mod:`anchorkd.losses.fused`) is tested against. They follow the GKD paper
(Agarwal et al., 2023, Eq. 1) with the conventions of ms-swift 4.6 ``gkd_loss.jsd_loss`` and
trl 0.29 ``GKDTrainer.generalized_jsd_loss``:

* ``beta == 0``: forward KL, ``KL(teacher || student) = sum_v q (log q - log p)``.
* ``beta == 1``: reverse KL, ``KL(student || teacher) = sum_v p (log p - log q)``.
* ``0 < beta < 1``: with the mixture ``m = (1 - beta) p + beta q``,
  ``beta KL(q || m) + (1 - beta) KL(p || m)``.

The 0/1 cases are special-cased (as in both upstreams) because the mixture formula tends to 0,
not to the KL, as ``beta`` approaches 0 or 1. ``p`` and ``q`` are the softmax of the
student/teacher logits divided by ``temperature``.

Reduction conventions (both upstreams agree on the per-position divergence, not on every
reduction):

==================  ===============================  ======================================
reduction           ``convention="swift"`` (default)   ``convention="trl"``
==================  ===============================  ======================================
``"batchmean"``     sum / #valid positions; no labels  as swift when labels are given; without
                    -> all leading positions ``B*T``   labels trl divides by ``size(0)`` (= B)
``"sum"``           sum over valid positions           same
``"mean"``          sum / (#valid positions * V)       same (element-wise mean of ``kl_div``)
``"none"``          per-position ``[B, T]`` (0 where   element-wise ``[N_valid, V]`` (or
                    masked) or ``[N]``                 ``[B, T, V]`` without labels)
no valid position   0 (ms-swift ``total * 0``)         NaN (trl's 0/0)
==================  ===============================  ======================================

ms-swift's GKD trainer uses sum / #valid positions (``gkd_loss`` total / ``num_valid``), i.e.
``"batchmean"`` with labels; that is the default here.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

Reduction = Literal["batchmean", "sum", "mean", "none"]
Convention = Literal["swift", "trl"]

__all__ = [
    "IGNORE_INDEX",
    "generalized_jsd",
    "generalized_jsd_per_position",
    "masked_ce",
]


def generalized_jsd_per_position(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position generalised JSD, computed in fp32.

    Args:
        student_logits: ``[..., V]`` raw (un-tempered) student logits, any float dtype.
        teacher_logits: ``[..., V]`` raw teacher logits (no gradient needed).
        beta: interpolation in ``[0, 1]``; 0 = forward KL, 1 = reverse KL (see module doc).
        temperature: both logit tensors are divided by it before the softmax.

    Returns:
        ``[...]`` divergence per position (fp32; fp64 for fp64 inputs).
    """
    _check_beta_temperature(beta, temperature)
    student_logp = F.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)
    teacher_logp = F.log_softmax(_at_least_fp32(teacher_logits) / temperature, dim=-1)
    return _per_vocab_divergence(student_logp, teacher_logp, beta).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
    num_items: int | torch.Tensor | None = None,
    *,
    convention: Convention = "swift",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Generalised JSD loss on full logits (reference implementation).

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]`` student logits, already aligned with
            ``labels`` (the caller shifts). Computation is fp32 for fp32/bf16/fp16 inputs
            (fp64 inputs stay fp64).
        teacher_logits: same shape as ``student_logits``.
        labels: ``[B, T]`` or ``[N]``; positions equal to ``ignore_index`` are excluded.
            ``None`` means every position counts.
        beta: see module doc; 0 and 1 are the exact forward / reverse KL.
        temperature: logits are divided by it before the softmax (both sides).
        reduction: ``"batchmean" | "sum" | "mean" | "none"``; see the module table.
        num_items: optional normaliser overriding the ``"batchmean"`` denominator: the loss is
            then ``sum over valid positions / num_items``, so summing the losses of
            micro-batches that share the same ``num_items`` (total valid positions of the
            accumulated batch) equals the full-batch loss. Only valid with ``"batchmean"``.
        convention: ``"swift"`` (default, ms-swift GKD trainer) or ``"trl"``; they differ only
            in the corner cases listed in the module table.

    Returns:
        fp32 scalar, or per-position / element-wise tensor for ``reduction="none"``.
    """
    _check_beta_temperature(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    if num_items is not None and reduction != "batchmean":
        raise ValueError("num_items only applies to reduction='batchmean'")
    mask = None if labels is None else labels != ignore_index
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} vs logits {tuple(student_logits.shape)}")

    student_logp = F.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)
    teacher_logp = F.log_softmax(_at_least_fp32(teacher_logits) / temperature, dim=-1)
    per_vocab = _per_vocab_divergence(student_logp, teacher_logp, beta)  # [..., V]

    if convention == "trl":
        # trl keeps the element-wise tensor, masks it to [N_valid, V], then reduces.
        valid = per_vocab if mask is None else per_vocab[mask]
        if reduction == "none":
            return valid
        if reduction == "sum":
            return valid.sum()
        if reduction == "mean":
            return valid.mean()
        if reduction == "batchmean":
            if num_items is not None:
                return valid.sum() / num_items
            denominator = valid.size(0) if mask is None else mask.sum()
            return valid.sum() / denominator
        raise ValueError(f"unknown reduction {reduction!r}")
    if convention != "swift":
        raise ValueError(f"unknown convention {convention!r}")

    per_position = per_vocab.sum(-1)  # [...]
    if mask is not None:
        per_position = per_position.masked_fill(~mask, 0.0)
    if reduction == "none":
        return per_position
    n_valid = per_position.numel() if mask is None else mask.sum()
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return _safe_divide(total, n_valid * student_logits.size(-1))
    if reduction == "batchmean":
        return _safe_divide(total, n_valid if num_items is None else num_items)
    raise ValueError(f"unknown reduction {reduction!r}")


def masked_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Token cross-entropy on un-tempered logits, in fp32.

    Matches transformers' ``ForCausalLMLoss`` (which ms-swift's ``sft_alpha`` term uses) on
    already-shifted labels: mean over valid positions, or ``sum / num_items`` when
    ``num_items`` is given. Returns 0 (not NaN) when no position is valid.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``.
        labels: ``[B, T]`` or ``[N]`` aligned with ``logits``.
        num_items: optional normaliser (see :func:`generalized_jsd`).

    Returns:
        fp32 scalar.
    """
    total = F.cross_entropy(
        _at_least_fp32(logits).reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    denominator = (labels != ignore_index).sum() if num_items is None else num_items
    return _safe_divide(total, denominator)


def _per_vocab_divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float
) -> torch.Tensor:
    """Element-wise ``[..., V]`` terms whose sum over V is the generalised JSD."""
    if beta == 0:
        return _kl_terms(teacher_logp, student_logp)  # KL(teacher || student)
    if beta == 1:
        return _kl_terms(student_logp, teacher_logp)  # KL(student || teacher)
    # log m = log((1 - beta) p + beta q), evaluated stably in log space.
    mixture_logp = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
    return beta * _kl_terms(teacher_logp, mixture_logp) + (1 - beta) * _kl_terms(student_logp, mixture_logp)


def _kl_terms(target_logp: torch.Tensor, input_logp: torch.Tensor) -> torch.Tensor:
    """Element-wise terms of ``KL(target || input)``: ``exp(target) * (target - input)``."""
    return target_logp.exp() * (target_logp - input_logp)


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast half / bfloat16 to fp32; fp64 stays fp64 (handy for high-precision references)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _safe_divide(total: torch.Tensor, denominator: int | torch.Tensor) -> torch.Tensor:
    """``total / denominator`` with a zero denominator giving 0 (total is 0 then) instead of NaN."""
    if isinstance(denominator, torch.Tensor):
        return total / denominator.to(total.device).clamp_min(1)
    return total / max(denominator, 1)


def _check_beta_temperature(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
