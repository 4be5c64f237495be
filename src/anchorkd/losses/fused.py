"""Fused, chunked cross-entropy + generalised JSD straight from hidden states.

With Qwen3-VL's 151,936-token vocabulary the ``[B, T, V]`` logits (and their gradient, and
ms-swift's fp32 log-softmax copies of student and teacher) dominate memory and time of the
loss. :func:`fused_ce_jsd` never builds a logits tensor for all positions:

1. only valid positions (``labels != ignore_index``) are kept: ``[N, H]``;
2. positions are processed in chunks of ``chunk_size`` rows: one fp32 GEMM per side gives
   ``[chunk, V]`` logits, the loss terms are reduced to per-row scalars, and the chunk's
   logits are dropped;
3. backward recomputes each chunk's logits from the saved hidden states / weights and turns
   the per-row statistics saved by the forward (log-sum-exps, KL terms; ``[N]`` each) into
   ``d loss / d logits`` for the chunk, which two GEMMs turn into grads for the hidden states
   and the LM head (and bias). ``grad_ce`` and ``grad_jsd`` are combined per chunk, so
   ``a * ce + w * jsd`` costs one recompute pass.

The math is the one of :mod:`anchorkd.losses.jsd` (ms-swift / trl conventions): CE on raw
logits (the model's ``sft_alpha`` loss), JSD on ``logits / temperature``. Everything is fp32
whatever the input dtype; returned grads are cast back to the input dtypes.

Gradients w.r.t. the logits ``z`` (``s``/``t`` student/teacher log-probs at temperature
``tau``, ``p = exp(s)``, ``q = exp(t)``, ``m = (1 - beta) p + beta q``, ``D`` = the row's
divergence, ``K_s = KL(p || m)``)::

    CE               softmax(z) - onehot(y)
    beta = 0         (p - q) / tau
    beta = 1         p (s - t - D) / tau
    0 < beta < 1     (1 - beta) p (s - log m - K_s) / tau
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .jsd import IGNORE_INDEX, _check_beta_temperature, _safe_divide

__all__ = ["DEFAULT_CHUNK_SIZE", "FusedLossOutput", "fused_ce_jsd"]

# Rows per GEMM chunk. A chunk holds two [chunk, V] fp32 logit buffers (student, teacher):
# 2 x 156 MB at V=151,936. Measured with bench-style inputs (N=1800, H=64, CPU): 128-512 rows
# cost the same (the [chunk, H] x [H, V] GEMMs re-read the LM head per chunk, so much smaller
# chunks get bandwidth bound), while 1024 was ~10% slower: 0.6 GB buffers are page-faulted in
# fresh on every call. On GPU, 256 x 151,936 element ops are already far above launch overhead.
DEFAULT_CHUNK_SIZE = 256

# Rows per element-wise block inside a chunk (CPU only): ~25 element-wise passes run on
# [block, V] slices and scratch buffers; at ~5 MB each (8 rows of V=151,936) the block's
# working set mostly stays in L3 between passes. 4-16 rows measured within noise of each
# other, 32-48 rows ~5-10% slower. On accelerators the whole chunk is one block.
_CPU_BLOCK_BYTES = 5 * 2**20

# Largest ``u = log q - log p`` in a block for the divergence written with ``q / p - 1 = expm1(u)``: well
# below fp32's exp overflow (u ~ 88), and with p >= q e^-20 the student's probability is never a denormal
# where the teacher's matters. A block beyond it uses the plain form (its divergence is large anyway).
_NEAR_LOG_RATIO = 20.0


class FusedLossOutput(NamedTuple):
    """Result of :func:`fused_ce_jsd`.

    Attributes:
        ce: fp32 scalar, sum of token CE over valid positions / normaliser (0 if disabled).
        jsd: fp32 scalar, sum of the generalised JSD over valid positions / normaliser.
        n_valid: int64 scalar, number of positions with ``labels != ignore_index``.
        correct_tokens: int64 scalar, valid positions where the label has the highest student
            logit (the argmax, up to exact ties).
    """

    ce: torch.Tensor
    jsd: torch.Tensor
    n_valid: torch.Tensor
    correct_tokens: torch.Tensor


@dataclass(frozen=True)
class _Config:
    beta: float
    temperature: float
    chunk_size: int
    block_rows: int | None
    compute_ce: bool
    compute_jsd: bool


def fused_ce_jsd(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None,
    *,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_items: int | torch.Tensor | None = None,
    compute_ce: bool = True,
    compute_jsd: bool = True,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    block_rows: int | None = None,
) -> FusedLossOutput:
    """CE and generalised JSD of the LM head applied to hidden states, without full logits.

    Args:
        student_hidden: ``[B, T, H]`` or ``[N, H]`` final hidden states, already aligned with
            ``labels`` (row ``i`` predicts ``labels[i]``; the caller shifts).
        lm_head_weight: ``[V, H]`` student LM head.
        labels: ``[B, T]`` or ``[N]`` target ids, ``ignore_index`` for positions to skip.
        teacher_hidden: ``[B, T, H_t]`` / ``[N, H_t]`` teacher hidden states on the same
            positions; required when ``compute_jsd``. Treated as a constant.
        teacher_lm_head_weight: ``[V, H_t]`` teacher LM head (constant); ``None`` reuses
            ``lm_head_weight`` (detached) for the teacher side.
        beta: generalised JSD interpolation in ``[0, 1]`` (0 forward KL, 1 reverse KL).
        temperature: JSD uses ``logits / temperature``; CE uses raw logits (as ms-swift).
        chunk_size: positions per GEMM chunk (see ``DEFAULT_CHUNK_SIZE``).
        num_items: normaliser for both losses; default ``n_valid``. Pass the valid-token count
            of the whole accumulated batch to make micro-batch losses sum to the batch loss.
        compute_ce / compute_jsd: skip a term entirely (its output is then 0).
        student_lm_head_bias / teacher_lm_head_bias: optional ``[V]`` biases.
        ignore_index: label value of masked positions.
        block_rows: rows per element-wise block; ``None`` = automatic (see module constants).

    Returns:
        :class:`FusedLossOutput` ``(ce, jsd, n_valid, correct_tokens)``; ``ce``/``jsd`` are
        differentiable w.r.t. ``student_hidden``, ``lm_head_weight`` and its bias.
    """
    _check_beta_temperature(beta, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden_size = student_hidden.size(-1)
    vocab_size = lm_head_weight.size(0)
    if lm_head_weight.size(1) != hidden_size:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} vs hidden size {hidden_size}")
    if student_hidden.shape[:-1] != labels.shape:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} vs labels {tuple(labels.shape)}")

    flat_labels = labels.reshape(-1)
    valid_rows = (flat_labels != ignore_index).nonzero().squeeze(1)  # [N]
    hidden_valid = student_hidden.reshape(-1, hidden_size).index_select(0, valid_rows)
    labels_valid = flat_labels.index_select(0, valid_rows)

    teacher_valid = teacher_weight = teacher_bias = None
    if compute_jsd:
        if teacher_hidden is None:
            raise ValueError("compute_jsd=True needs teacher_hidden")
        if teacher_hidden.shape[:-1] != labels.shape:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} vs labels {tuple(labels.shape)}")
        teacher_weight = lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight
        teacher_bias = student_lm_head_bias if teacher_lm_head_weight is None else teacher_lm_head_bias
        if teacher_weight.shape != (vocab_size, teacher_hidden.size(-1)):
            raise ValueError(
                f"teacher LM head {tuple(teacher_weight.shape)} must be [V={vocab_size}, H_t={teacher_hidden.size(-1)}]"
            )
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
        teacher_valid = (
            teacher_hidden.detach().reshape(-1, teacher_hidden.size(-1)).index_select(0, valid_rows)
        )

    config = _Config(beta, temperature, chunk_size, block_rows, compute_ce, compute_jsd)
    ce_sum, jsd_sum, correct = _FusedCEJSD.apply(
        hidden_valid,
        lm_head_weight,
        student_lm_head_bias,
        teacher_valid,
        teacher_weight,
        teacher_bias,
        labels_valid,
        config,
    )
    n_valid = torch.tensor(valid_rows.numel(), dtype=torch.int64, device=labels.device)
    denominator = n_valid if num_items is None else num_items
    return FusedLossOutput(
        _safe_divide(ce_sum, denominator), _safe_divide(jsd_sum, denominator), n_valid, correct
    )


class _FusedCEJSD(torch.autograd.Function):
    """Sums of CE and JSD over rows; saves only inputs and ``[N]`` row statistics."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        teacher_hidden: torch.Tensor | None,  # [N, H_t]
        teacher_weight: torch.Tensor | None,  # [V, H_t]
        teacher_bias: torch.Tensor | None,  # [V]
        labels: torch.Tensor,  # [N]
        config: _Config,
    ):
        ctx.set_materialize_grads(False)
        n_rows = hidden.size(0)
        device = hidden.device
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        jsd_sum = torch.zeros((), dtype=torch.float32, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        stats = _RowStats.allocate(n_rows, config, device)

        if n_rows > 0:
            sweep = _Sweep.plan(
                config, n_rows, weight, bias, teacher_weight, teacher_bias, config.compute_jsd, 3, device
            )
            for start in range(0, n_rows, sweep.chunk):
                end = min(start + sweep.chunk, n_rows)
                logits = sweep.student_head.logits(hidden[start:end], sweep.student_buf)  # raw z
                teacher_logits = sweep.teacher_logits(teacher_hidden, start, end)
                for offset in range(0, end - start, sweep.block):
                    local = slice(offset, min(offset + sweep.block, end - start))
                    rows = slice(start + local.start, start + local.stop)
                    ce_part, jsd_part, correct_part = _forward_block(
                        logits[local],
                        None if teacher_logits is None else teacher_logits[local],
                        labels[rows],
                        stats,
                        rows,
                        config,
                        sweep.workspace,
                    )
                    ce_sum += ce_part
                    jsd_sum += jsd_part
                    correct += correct_part

        ctx.config = config
        ctx.save_for_backward(
            hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, *stats.as_tuple()
        )
        ctx.mark_non_differentiable(correct)
        if not config.compute_ce:
            ctx.mark_non_differentiable(ce_sum)
        if not config.compute_jsd:
            ctx.mark_non_differentiable(jsd_sum)
        return ce_sum, jsd_sum, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, grad_jsd, _grad_correct):
        config: _Config = ctx.config
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, *stat_tensors = (
            ctx.saved_tensors
        )
        stats = _RowStats(*stat_tensors)
        # Python floats: one host sync per backward, then cheap scalar arithmetic per block;
        # a zero weight (e.g. sft_alpha = 0) skips its term entirely.
        ce_scale = _as_scale(grad_ce) if config.compute_ce else None
        jsd_scale = _as_scale(grad_jsd) if config.compute_jsd else None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]

        n_rows, vocab_size = hidden.size(0), weight.size(0)
        device = hidden.device
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight else None
        grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device) if need_bias else None

        if n_rows > 0 and (ce_scale is not None or jsd_scale is not None):
            sweep = _Sweep.plan(
                config, n_rows, weight, bias, teacher_weight, teacher_bias, jsd_scale is not None, 2, device
            )
            for start in range(0, n_rows, sweep.chunk):
                end = min(start + sweep.chunk, n_rows)
                hidden_chunk = hidden[start:end].float()
                # The recomputed logits are overwritten, block by block, with d total / d logits.
                grad_logits = sweep.student_head.logits(hidden_chunk, sweep.student_buf)
                teacher_logits = sweep.teacher_logits(teacher_hidden, start, end)
                for offset in range(0, end - start, sweep.block):
                    local = slice(offset, min(offset + sweep.block, end - start))
                    rows = slice(start + local.start, start + local.stop)
                    _backward_block(
                        grad_logits[local],
                        None if teacher_logits is None else teacher_logits[local],
                        labels[rows],
                        stats,
                        rows,
                        ce_scale,
                        jsd_scale,
                        config,
                        sweep.workspace,
                    )
                if need_hidden:
                    torch.mm(grad_logits, sweep.student_head.weight, out=grad_hidden[start:end])
                if need_weight:
                    grad_weight.addmm_(grad_logits.T, hidden_chunk)
                if need_bias:
                    grad_bias += grad_logits.sum(0)

        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


class _Head:
    """LM head upcast to fp32 once per call (not per chunk); ``scale`` folds 1/temperature in."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: float):
        self.weight = weight.float()  # [V, H], no copy when already fp32
        self.bias = None if bias is None else bias.float()
        self.scale = scale

    def logits(self, hidden: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """``[rows, H] -> [rows, V]`` fp32 ``scale * (hidden @ W.T + b)`` written into ``buffer``."""
        out = buffer[: hidden.size(0)]
        hidden = hidden.float()
        if self.scale != 1.0:
            hidden = hidden * self.scale  # scaling [rows, H] is free next to scaling [rows, V]
        if self.bias is None:
            return torch.mm(hidden, self.weight.T, out=out)
        return torch.addmm(self.bias, hidden, self.weight.T, beta=self.scale, out=out)


@dataclass
class _Sweep:
    """What one pass over the rows (forward, or backward's recompute) uses: the LM heads, the chunk
    and block sizes, and fp32 buffers allocated once and reused by every chunk."""

    student_head: _Head
    teacher_head: _Head | None
    chunk: int
    block: int
    student_buf: torch.Tensor  # [chunk, V]
    teacher_buf: torch.Tensor | None  # [chunk, V]
    workspace: list[torch.Tensor]  # [block, V] scratch, only with a teacher

    @staticmethod
    def plan(
        config: _Config,
        n_rows: int,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        teacher_bias: torch.Tensor | None,
        with_teacher: bool,
        workspace_blocks: int,
        device: torch.device,
    ) -> _Sweep:
        vocab_size = weight.size(0)
        chunk = min(config.chunk_size, n_rows)
        block = min(_block_rows(config, vocab_size, device), chunk)
        return _Sweep(
            student_head=_Head(weight, bias, scale=1.0),
            teacher_head=(
                _Head(teacher_weight, teacher_bias, 1.0 / config.temperature) if with_teacher else None
            ),
            chunk=chunk,
            block=block,
            student_buf=_new_buffer(chunk, vocab_size, device),
            teacher_buf=_new_buffer(chunk, vocab_size, device) if with_teacher else None,
            workspace=[
                _new_buffer(block, vocab_size, device) for _ in range(workspace_blocks if with_teacher else 0)
            ],
        )

    def teacher_logits(
        self, teacher_hidden: torch.Tensor | None, start: int, end: int
    ) -> torch.Tensor | None:
        """Tempered teacher logits of rows ``start:end`` (``None`` without a teacher)."""
        if self.teacher_head is None:
            return None
        return self.teacher_head.logits(teacher_hidden[start:end], self.teacher_buf)


@dataclass
class _RowStats:
    """Per-row ``[N]`` fp32 statistics carried from forward to backward (``None`` = unused).

    ``lse_raw``: logsumexp of raw student logits (CE softmax; also the JSD one at temperature
    1). ``lse_tempered``: logsumexp of ``student logits / temperature`` (temperature != 1).
    ``lse_teacher``: logsumexp of tempered teacher logits. ``kl_term``: the row divergence
    ``D`` for beta=1, ``K_s = KL(p || m)`` for 0<beta<1.
    """

    lse_raw: torch.Tensor | None
    lse_tempered: torch.Tensor | None
    lse_teacher: torch.Tensor | None
    kl_term: torch.Tensor | None

    @staticmethod
    def allocate(n_rows: int, config: _Config, device: torch.device) -> _RowStats:
        def new(needed: bool) -> torch.Tensor | None:
            return torch.empty(n_rows, dtype=torch.float32, device=device) if needed else None

        tempered = config.temperature != 1.0
        jsd = config.compute_jsd
        return _RowStats(
            lse_raw=new(config.compute_ce or (jsd and not tempered)),
            lse_tempered=new(jsd and tempered),
            lse_teacher=new(jsd),
            kl_term=new(jsd and config.beta > 0),
        )

    def as_tuple(self) -> tuple[torch.Tensor | None, ...]:
        return (self.lse_raw, self.lse_tempered, self.lse_teacher, self.kl_term)

    def student_lse(self) -> torch.Tensor:
        """LSE of the logits behind the JSD's student softmax."""
        return self.lse_raw if self.lse_tempered is None else self.lse_tempered


def _softmax_parts(shifted: torch.Tensor, prob_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``x - max(x)`` (``[r, V]``, left as it is) write ``softmax(x)`` into ``prob_out``; return
    ``(prob, log_normaliser [r, 1])``."""
    prob = torch.exp(shifted, out=prob_out)
    normaliser = prob.sum(-1, keepdim=True)
    log_normaliser = normaliser.log()
    prob.mul_(normaliser.reciprocal_())
    return prob, log_normaliser


def _forward_block(
    logits: torch.Tensor,  # [r, V] raw student logits z (scratch: overwritten)
    teacher_logits: torch.Tensor | None,  # [r, V] tempered teacher logits (scratch: overwritten)
    labels: torch.Tensor,  # [r]
    stats: _RowStats,
    rows: slice,
    config: _Config,
    workspace: list[torch.Tensor],  # [block, V] scratch buffers
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce_sum, jsd_sum, correct)`` for one block of rows; fills ``stats[rows]``."""
    n = logits.size(0)
    zero = logits.new_zeros(())
    inv_temperature = 1.0 / config.temperature
    log_ratio = None
    if config.compute_jsd:
        # Tempered teacher minus student logits, before either is shifted: the row's log q - log p up to
        # a constant (see _log_ratio_terms).
        log_ratio = torch.sub(teacher_logits, logits, alpha=inv_temperature, out=workspace[0][:n])
    max_logit = logits.amax(dim=-1, keepdim=True)  # [r, 1]
    label_logit = logits.gather(1, labels.unsqueeze(1))  # [r, 1]
    # Token accuracy without an argmax pass: the label is "the argmax" iff it attains the max
    # (differs from argmax only on exact ties, where argmax picks the lowest id).
    correct = (label_logit >= max_logit).sum()
    shifted = logits.sub_(max_logit)  # z - max, in place

    ce = zero
    if not config.compute_jsd:  # CE only: just the normaliser
        lse_raw = max_logit + shifted.exp_().sum(-1, keepdim=True).log_()
        stats.lse_raw[rows] = lse_raw.squeeze(1)
        return (lse_raw - label_logit).sum(), zero, correct

    student_prob_buf = workspace[1][:n]
    if stats.lse_tempered is None:  # temperature 1: CE and JSD share one softmax
        student_prob, log_norm = _softmax_parts(shifted, student_prob_buf)
        student_lse = max_logit + log_norm
        stats.lse_raw[rows] = student_lse.squeeze(1)
        if config.compute_ce:
            ce = (student_lse - label_logit).sum()
    else:
        if config.compute_ce:
            log_norm_raw = torch.exp(shifted, out=student_prob_buf).sum(-1, keepdim=True).log_()
            stats.lse_raw[rows] = (max_logit + log_norm_raw).squeeze(1)
            ce = (max_logit + log_norm_raw - label_logit).sum()
        student_prob, log_norm = _softmax_parts(shifted.mul_(inv_temperature), student_prob_buf)
        student_lse = max_logit * inv_temperature + log_norm
        stats.lse_tempered[rows] = student_lse.squeeze(1)

    teacher_max = teacher_logits.amax(dim=-1, keepdim=True)
    teacher_lse = teacher_max + teacher_logits.sub_(teacher_max).exp_().sum(-1, keepdim=True).log_()
    stats.lse_teacher[rows] = teacher_lse.squeeze(1)

    log_ratio.sub_(teacher_lse - student_lse)  # u = log q - log p
    if float(log_ratio.amax()) <= _NEAR_LOG_RATIO:
        # The logit blocks are spent (only p and u are needed from here): they serve as scratch.
        scratch = [teacher_logits, shifted, workspace[2][:n]]
        divergence, row_term = _divergence_from_log_ratio(student_prob, log_ratio, config.beta, scratch)
    else:
        student_logp = shifted.sub_(log_norm)
        divergence, row_term = _divergence_far_apart(student_logp, student_prob, log_ratio, config.beta)
    if stats.kl_term is not None:
        stats.kl_term[rows] = row_term
    return ce, divergence.sum(), correct


def _divergence_far_apart(
    student_logp: torch.Tensor,  # [r, V] s
    student_prob: torch.Tensor,  # [r, V] p
    log_ratio: torch.Tensor,  # [r, V] u = t - s
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_divergence_from_log_ratio` for a block where the teacher puts far more mass on some token than
    the student (``u > _NEAR_LOG_RATIO``): there ``q / p - 1`` may overflow, while the divergence is large
    enough that the plain form (sums of ``p (s - log m)``, log m by ``logaddexp``) loses nothing to
    rounding. Allocates its temporaries (rare)."""
    teacher_logp = student_logp + log_ratio
    if beta == 0:
        return (teacher_logp.exp() * log_ratio).sum(-1), None
    if beta == 1:
        divergence = -(student_prob * log_ratio).sum(-1)
        return divergence, divergence
    log_mixture = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
    kl_student = (student_prob * (student_logp - log_mixture)).sum(-1)
    kl_teacher = (teacher_logp.exp() * (teacher_logp - log_mixture)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student, kl_student


def _divergence_from_log_ratio(
    student_prob: torch.Tensor,  # [r, V] p
    log_ratio: torch.Tensor,  # [r, V] u = log q - log p (scratch: overwritten)
    beta: float,
    scratch: list[torch.Tensor],  # three [r, V] buffers
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row divergences ``D`` (``[r]``) and the row term the backward needs (``[r]``: ``D`` for beta = 1,
    ``K_s = KL(p || m)`` for 0 < beta < 1, ``None`` for beta = 0).

    Written with ``u = log q - log p``, ``x = q / p - 1 = expm1(u)`` and ``L = log(m / p) = log1p(beta x)``
    (``q = p (1 + x)``, ``m / p = 1 + beta x``)::

        beta = 0      KL(q || p) = sum p [(1 + x) u - x]
        beta = 1      KL(p || q) = sum p (x - u)
        0 < beta < 1  D = sum p [beta (1 + x)(u - L) - (1 - beta) L],   K_s = -sum p L

    Where student and teacher nearly agree, ``u``, ``x`` and ``L`` are small and each is computed to full
    relative precision: ``u`` from the logit difference (exact where the logits are close) minus the
    difference of the two log-normalisers, ``x`` and ``L`` by ``expm1`` and ``log1p``. The sums then
    cancel terms of size ``|u|``, not of size ``log V``: written as ``sum p (s - log m)`` with ``s`` and
    ``log m`` both near ``-log V``, fp32 rounding swamps the JSD of nearly equal distributions
    (``bench/jsd_accuracy.py``). The two KLs carry ``sum p x = sum q - sum p = 0``: it makes each entry
    second order in ``u``, so an error in either log-normaliser (a constant added to ``u``) moves them only
    to second order; the JSD needs no such term (its first-order terms cancel between its two halves).
    """
    ratio_m1, log_mixture_ratio, product = scratch
    torch.expm1(log_ratio, out=ratio_m1)  # x
    if beta == 1:
        divergence = ratio_m1.sub_(log_ratio).mul_(student_prob).sum(-1)  # sum p (x - u)
        return divergence, divergence
    if beta == 0:
        terms = torch.addcmul(log_ratio, ratio_m1, log_ratio, out=product).sub_(ratio_m1)  # (1 + x) u - x
        return terms.mul_(student_prob).sum(-1), None
    torch.mul(ratio_m1, beta, out=log_mixture_ratio).log1p_()  # L
    log_ratio.sub_(log_mixture_ratio)  # u - L
    teacher_terms = torch.addcmul(log_ratio, ratio_m1, log_ratio, out=product)  # (1 + x)(u - L)
    teacher_terms.sub_(log_mixture_ratio, alpha=(1.0 - beta) / beta)
    divergence = teacher_terms.mul_(student_prob).sum(-1).mul_(beta)
    kl_student = log_mixture_ratio.mul_(student_prob).sum(-1).neg_()
    return divergence, kl_student


def _backward_block(
    logits: torch.Tensor,  # [r, V] raw student logits in, d total / d logits out
    teacher_logits: torch.Tensor | None,  # [r, V] tempered teacher logits (scratch)
    labels: torch.Tensor,  # [r]
    stats: _RowStats,
    rows: slice,
    ce_scale: float | None,  # d total / d ce_sum (None: term unused)
    jsd_scale: float | None,  # d total / d jsd_sum (None: term unused)
    config: _Config,
    workspace: list[torch.Tensor],  # [block, V] scratch buffers
) -> None:
    """Overwrite ``logits`` with the gradient of ``ce_scale * ce_sum + jsd_scale * jsd_sum``."""

    def per_row(stat: torch.Tensor) -> torch.Tensor:
        return stat[rows].unsqueeze(1)  # [r, 1]

    if jsd_scale is None:  # CE only: (softmax(z) - onehot) * ce_scale, in place
        logits.sub_(per_row(stats.lse_raw)).exp_().mul_(ce_scale)
        _subtract_at_labels(logits, labels, ce_scale)
        return

    n = logits.size(0)
    ce_prob_buf, student_prob_buf = (buf[:n] for buf in workspace)
    inv_temperature = 1.0 / config.temperature
    tempered = stats.lse_tempered is not None
    # u = log q - log p from the logit difference (see _divergence_from_log_ratio), in the teacher's buffer.
    log_ratio = teacher_logits.sub_(logits, alpha=inv_temperature)
    log_ratio.sub_(per_row(stats.lse_teacher) - per_row(stats.student_lse()))
    # At temperature 1 the CE softmax is the JSD's p and folds into the same product (as the
    # additive ``folded_ce`` below); otherwise it needs its own exp pass.
    ce_prob = None
    if ce_scale is not None and tempered:
        ce_prob = torch.sub(logits, per_row(stats.lse_raw), out=ce_prob_buf).exp_()
    folded_ce = ce_scale if ce_scale is not None and not tempered else 0.0

    if tempered:
        logits.mul_(inv_temperature)
    student_prob = torch.exp(logits.sub_(per_row(stats.student_lse())), out=student_prob_buf)  # p
    beta = config.beta
    near = beta == 1 or float(log_ratio.amax()) <= _NEAR_LOG_RATIO  # else q / p - 1 may overflow
    if beta == 0 and not near:  # grad = p (c + folded_ce) - c q
        scale = jsd_scale * inv_temperature
        teacher_prob = torch.add(logits, log_ratio).exp_()
        torch.sub(student_prob * (scale + folded_ce), teacher_prob, alpha=scale, out=logits)
    elif beta == 0:  # grad = (p - q) c + p folded_ce = p (folded_ce - c x), c = jsd_scale / tau
        scale = jsd_scale * inv_temperature
        factor = log_ratio.expm1_().mul_(-scale).add_(folded_ce)
    elif beta == 1:  # grad = p (c (s - t - D) + folded_ce), s - t = -u
        scale = jsd_scale * inv_temperature
        factor = log_ratio.mul_(-scale).add_(folded_ce - scale * per_row(stats.kl_term))
    else:  # grad = p (c (s - log m - K_s) + folded_ce), s - log m = -L, c = jsd_scale (1 - beta) / tau
        scale = jsd_scale * (1.0 - beta) * inv_temperature
        if near:  # L = log(m / p) = log1p(beta x)
            log_mixture_ratio = log_ratio.expm1_().mul_(beta).log1p_()
        else:  # the same, overflow-free: log((1 - beta) + beta e^u)
            log_mixture_ratio = torch.logaddexp(
                log_ratio.add_(math.log(beta)), log_ratio.new_tensor(math.log1p(-beta))
            )
        factor = log_mixture_ratio.mul_(-scale).add_(folded_ce - scale * per_row(stats.kl_term))
    if beta != 0 or near:
        torch.mul(factor, student_prob, out=logits)
    if ce_prob is not None:
        logits.add_(ce_prob, alpha=ce_scale)
    if ce_scale is not None:
        _subtract_at_labels(logits, labels, ce_scale)


def _subtract_at_labels(grad: torch.Tensor, labels: torch.Tensor, value: float) -> None:
    """``grad[i, labels[i]] -= value`` (the ``-onehot`` part of the CE gradient)."""
    grad.scatter_add_(1, labels.unsqueeze(1), grad.new_full((labels.size(0), 1), -value))


def _new_buffer(rows: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    return torch.empty(rows, vocab_size, dtype=torch.float32, device=device)


def _block_rows(config: _Config, vocab_size: int, device: torch.device) -> int:
    if config.block_rows is not None:
        return max(1, config.block_rows)
    if device.type != "cpu":
        return config.chunk_size
    return max(1, _CPU_BLOCK_BYTES // (4 * vocab_size))


def _as_scale(grad: torch.Tensor | None) -> float | None:
    """Upstream grad of a summed loss as a Python float; ``None`` if missing or zero."""
    if grad is None:
        return None
    value = float(grad)
    return value if value != 0.0 else None
