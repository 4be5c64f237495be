"""The generalised JSD against a teacher known only by its top-k tokens and the mass of the rest.

A cached teacher (``anchorkd.trainers.teacher_cache``) keeps, per supervised position, the log-probabilities
``t_1..t_k`` of its ``k`` most likely tokens ``S`` (at the KD temperature ``tau``), their ids, and the log of
the mass outside them, ``log R = log(1 - sum_{i in S} q_i)``. The student still has its full distribution
``p = softmax(z / tau)`` over the ``V`` tokens.

Buckets
-------
Both distributions are pushed through the same map ``b: V -> {1..k, tail}``: token ``S_i`` to bucket ``i``,
every other token to the tail. The bucket distributions are::

    teacher   Q_i = q_{S_i},  Q_tail = R
    student   P_i = p_{S_i},  P_tail = sum_{v not in S} p_v

``P_tail`` is summed over the tail tokens (not ``1 - sum P_i``, which cancels catastrophically when the
student is confident). The loss is the generalised JSD of :mod:`anchorkd.losses.jsd` (same ``beta`` cases,
same ms-swift / trl reductions) between ``P`` and ``Q`` over these ``k + 1`` buckets. With ``k = V`` the
tail is empty and the value is the exact JSD. The stored teacher log-probs are 16-bit: the loss renormalises
``Q`` over the ``k + 1`` buckets (one log-sum-exp per position) so that it sums to one exactly.

Gradient
--------
Let ``f(P)`` be the bucket divergence and ``g_b = df / dP_b``. Since ``dp_u / dz_v = p_u (1[u = v] - p_v) / tau``,

    d f / d z_v = p_v (g_{b(v)} - gbar) / tau,     gbar = sum_b P_b g_b,

so every tail token shares one coefficient ``G_tail = g_tail - gbar``, and the gradient over the whole
vocabulary is ``p * G_tail / tau`` with the ``k`` entries of ``S`` replaced by ``p_{S_i} G_i / tau``. With
``s_b = log P_b``, ``t_b = log Q_b`` and ``m = (1 - beta) P + beta Q``::

    beta = 0        f = KL(Q || P)               G_b = 1 - Q_b / P_b
    beta = 1        f = KL(P || Q)               G_b = s_b - t_b - f
    0 < beta < 1    f = beta KL(Q||m) + (1-beta) KL(P||m)
                                                 G_b = (1 - beta) (s_b - log m_b - KL(P || m))

(the ``beta = 0`` case reduces to ``(p_v - q_v) / tau`` on ``S``, as for the full JSD). The forward keeps
``G`` (``[N, k + 1]``) and two log-sum-exps per position; the backward recomputes each chunk's logits and
turns them into the gradient with one exp, one multiply and a ``k``-entry scatter: never a ``[B, T, V]``
tensor, as in :mod:`anchorkd.losses.fused`.

Error against the full JSD
--------------------------
The generalised JSD is an f-divergence (``f(u) = beta u log(u / m(u)) + (1 - beta) log(1 / m(u))`` with
``m(u) = 1 - beta + beta u`` is convex), so by the data-processing inequality merging tokens can only lower
it: ``0 <= JSD(p, q) - JSD(P, Q)``. The gap is exactly the tail's share of the chain rule of KL. With
``p'`` / ``q'`` / ``m'`` the distributions *inside* the tail (``p'_v = p_v / P_tail`` etc.)::

    beta = 0        gap = R KL(q' || p')
    beta = 1        gap = P_tail KL(p' || q')
    0 < beta < 1    gap = beta R KL(q' || m') + (1 - beta) P_tail KL(p' || m')
                        <= M h(beta R / M) <= M log 2,     M = (1 - beta) P_tail + beta R,

where ``h`` is the binary entropy in nats (because ``m' >= beta R q' / M`` and ``m' >= (1 - beta) P_tail p'
/ M`` pointwise). So for ``0 < beta < 1`` the per-position error is at most ``log 2`` times the mixture's
tail mass, known at training time from ``P_tail`` and ``R``. The two KL ends carry no bound from the masses
alone (the within-tail KL can be large where the student's tail misses the teacher's), but they vanish with
the tail mass of the side that weights them. ``docs/teacher_cache.md`` has the measured errors of values and
gradients for k = 1 ... 128.

Numerics
--------
Everything is fp32 (fp64 for fp64 inputs, for gradient checks). A bucket with no student mass (the empty
tail at ``k = V``) contributes 0 and gets no gradient; a student tail mass that underflows the shifted
exponentials is recomputed with its own log-sum-exp; gradient coefficients that overflow (a student tail
``e^-88`` times smaller than the teacher's) are clipped to ``+-1e20``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .anchor import AnchoredTerms, split_rows
from .fused import DEFAULT_CHUNK_SIZE, FusedLossOutput, _as_scale, _subtract_at_labels
from .jsd import IGNORE_INDEX, Reduction, _at_least_fp32, _check_beta_temperature, _safe_divide, masked_ce

__all__ = [
    "TeacherTopK",
    "bucket_jsd",
    "fused_ce_topk_jsd",
    "reference_topk_jsd",
    "student_buckets",
    "teacher_buckets",
    "teacher_topk",
    "topk_token_losses",
    "reference_topk_token_losses",
]

# Rows per element-wise block inside a chunk on CPU (as anchorkd.losses.fused): ~5 MB slices stay in cache.
_CPU_BLOCK_BYTES = 5 * 2**20
# |gradient coefficient| limit where a student bucket mass underflows next to the teacher's (see Numerics).
_COEFFICIENT_LIMIT = 1e20
# A tail sum of shifted exponentials below this has lost precision (fp32 subnormals start at 1.2e-38): its
# log-sum-exp is recomputed from the logits.
_TAIL_RECOMPUTE_BELOW = {torch.float32: 1e-30, torch.float64: 1e-290}


class TeacherTopK(NamedTuple):
    """A teacher distribution at temperature ``tau`` by its top ``k`` tokens, per position ``[...]``.

    Attributes:
        logprobs: ``[..., k]`` log-probabilities of the top-k tokens (any float dtype; the cache keeps fp16).
        ids: ``[..., k]`` their token ids (any integer dtype; the cache keeps int32).
        log_tail: ``[...]`` log of the mass outside the top k (``-inf`` when ``k = V``).
    """

    logprobs: torch.Tensor
    ids: torch.Tensor
    log_tail: torch.Tensor


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    """The top-k log-probs, ids and tail log-mass of ``softmax(teacher_logits / temperature)``.

    Args:
        teacher_logits: ``[..., V]`` raw teacher logits.
        k: ``1 <= k <= V``.
        temperature: the KD temperature (the one the loss divides the student's logits by).

    Returns:
        :class:`TeacherTopK` in fp32 (fp64 for fp64 logits), ids int64; ``log_tail`` is computed from the
        tail's own logits, not as ``log(1 - sum)``.
    """
    vocab_size = teacher_logits.size(-1)
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, V={vocab_size}], got {k}")
    _check_beta_temperature(0.0, temperature)
    tempered = _at_least_fp32(teacher_logits) / temperature
    normaliser = tempered.logsumexp(-1, keepdim=True)
    top = tempered.topk(k, dim=-1)
    tail = tempered.scatter(-1, top.indices, float("-inf"))
    log_tail = (tail.logsumexp(-1, keepdim=True) - normaliser).squeeze(-1)
    return TeacherTopK(top.values - normaliser, top.indices, log_tail)


def teacher_buckets(teacher: TeacherTopK, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., k + 1]`` log-probabilities ``t_b`` of the teacher's buckets (tail last), renormalised."""
    log_probs = torch.cat([teacher.logprobs.to(dtype), teacher.log_tail.to(dtype).unsqueeze(-1)], dim=-1)
    return log_probs - log_probs.logsumexp(-1, keepdim=True)


def student_buckets(
    student_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[..., k + 1]`` log-probabilities ``s_b`` of the student's buckets (tail last), from full logits.

    Differentiable; materialises ``[..., V]`` (reference path and tests).
    """
    tempered = _at_least_fp32(student_logits) / temperature
    normaliser = tempered.logsumexp(-1, keepdim=True)
    ids = ids.long()
    top = tempered.gather(-1, ids)
    tail = tempered.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1) - normaliser


def bucket_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD between bucket distributions given as ``[..., K]`` log-probs; ``[...]`` per position.

    Differentiable in ``student_logp`` (finite gradients also where a bucket is empty, ``-inf``).
    """
    _check_beta_temperature(beta, 1.0)
    return _bucket_divergence(student_logp, teacher_logp, beta)[0]


def reference_topk_jsd(
    student_logits: torch.Tensor,
    teacher: TeacherTopK,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
    num_items: int | torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The top-k + tail JSD from full student logits (the ground truth of :func:`fused_ce_topk_jsd`).

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]`` raw student logits aligned with ``labels``.
        teacher: :class:`TeacherTopK` on the same positions (``[B, T, k]`` / ``[B, T]``).
        labels, beta, temperature, num_items, ignore_index: as :func:`anchorkd.losses.jsd.generalized_jsd`
            (ms-swift convention). ``reduction``: ``"batchmean" | "sum" | "none"`` (``"mean"`` divides by
            ``V`` as there).
    """
    _check_beta_temperature(beta, temperature)
    if num_items is not None and reduction != "batchmean":
        raise ValueError("num_items only applies to reduction='batchmean'")
    student_logp = student_buckets(student_logits, teacher.ids, temperature)
    per_position = bucket_jsd(student_logp, teacher_buckets(teacher, student_logp.dtype), beta)
    mask = None if labels is None else labels != ignore_index
    if mask is not None:
        per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    n_valid = per_position.numel() if mask is None else mask.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return _safe_divide(total, n_valid * student_logits.size(-1))
    if reduction == "batchmean":
        return _safe_divide(total, n_valid if num_items is None else num_items)
    raise ValueError(f"unknown reduction {reduction!r}")


def fused_ce_topk_jsd(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherTopK | None = None,
    *,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_items: int | torch.Tensor | None = None,
    compute_ce: bool = True,
    compute_jsd: bool = True,
    student_lm_head_bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    block_rows: int | None = None,
) -> FusedLossOutput:
    """CE and the top-k + tail JSD of the LM head applied to hidden states, without full logits.

    The counterpart of :func:`anchorkd.losses.fused.fused_ce_jsd` for a cached teacher: same arguments and
    result, with ``teacher`` (constant) in place of the teacher's hidden states and LM head.

    Args:
        student_hidden: ``[B, T, H]`` or ``[N, H]`` final hidden states aligned with ``labels``.
        lm_head_weight: ``[V, H]`` student LM head (and ``student_lm_head_bias`` ``[V]``).
        labels: ``[B, T]`` or ``[N]`` target ids, ``ignore_index`` where nothing is supervised.
        teacher: :class:`TeacherTopK` with leading shape ``labels.shape``; its values at unsupervised
            positions are never read. Required when ``compute_jsd``.
        beta, temperature, chunk_size, num_items, compute_ce, compute_jsd, block_rows: as ``fused_ce_jsd``.

    Returns:
        :class:`~anchorkd.losses.fused.FusedLossOutput`; ``ce`` / ``jsd`` are differentiable w.r.t. the
        hidden states, the head and its bias.
    """
    _check_beta_temperature(beta, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden_size = student_hidden.size(-1)
    if lm_head_weight.size(1) != hidden_size:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} vs hidden size {hidden_size}")
    if student_hidden.shape[:-1] != labels.shape:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} vs labels {tuple(labels.shape)}")

    flat_labels = labels.reshape(-1)
    valid_rows = (flat_labels != ignore_index).nonzero().squeeze(1)  # [N]
    hidden_valid = student_hidden.reshape(-1, hidden_size).index_select(0, valid_rows)
    labels_valid = flat_labels.index_select(0, valid_rows)
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32

    ids = teacher_logp = None
    if compute_jsd:
        if teacher is None:
            raise ValueError("compute_jsd=True needs the teacher's top-k")
        if teacher.ids.shape[:-1] != labels.shape or teacher.logprobs.shape != teacher.ids.shape:
            raise ValueError(
                f"teacher top-k {tuple(teacher.logprobs.shape)} / ids {tuple(teacher.ids.shape)} "
                f"vs labels {tuple(labels.shape)}"
            )
        if teacher.ids.size(-1) > lm_head_weight.size(0):
            raise ValueError(f"k={teacher.ids.size(-1)} exceeds the vocabulary {lm_head_weight.size(0)}")
        k = teacher.ids.size(-1)
        ids = teacher.ids.reshape(-1, k).index_select(0, valid_rows).long()
        valid_teacher = TeacherTopK(
            teacher.logprobs.detach().reshape(-1, k).index_select(0, valid_rows),
            ids,
            teacher.log_tail.detach().reshape(-1).index_select(0, valid_rows),
        )
        teacher_logp = teacher_buckets(valid_teacher, dtype)

    config = _Config(beta, temperature, chunk_size, block_rows, compute_ce, compute_jsd)
    ce_sum, jsd_sum, correct = _FusedCETopKJSD.apply(
        hidden_valid, lm_head_weight, student_lm_head_bias, ids, teacher_logp, labels_valid, config
    )
    n_valid = torch.tensor(valid_rows.numel(), dtype=torch.int64, device=labels.device)
    denominator = n_valid if num_items is None else num_items
    return FusedLossOutput(
        _safe_divide(ce_sum, denominator), _safe_divide(jsd_sum, denominator), n_valid, correct
    )


def topk_token_losses(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    anchor_rows: torch.Tensor | None,
    teacher: TeacherTopK,
    *,
    beta: float,
    temperature: float,
    domain_items: int,
    anchor_items: int,
    lm_kd: bool,
    anchored: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_lm_head_bias: torch.Tensor | None = None,
) -> AnchoredTerms:
    """Domain CE, domain JSD and anchor-row JSD against a cached teacher: :func:`fused_ce_topk_jsd` on each
    kind of row (the counterpart of ``anchorkd.losses.terms.fused_token_losses``).

    Args:
        student_hidden: ``[B, T, H]``; lm_head_weight ``[V, H]``; labels ``[B, T]`` shifted.
        anchor_rows: ``[B]`` bool, or None. teacher: ``[B, T, k]`` / ``[B, T]`` on the same positions.
        domain_items / anchor_items / lm_kd / anchored: as in ``fused_token_losses``.
    """
    domain_labels, anchor_labels = split_rows(labels, anchor_rows)
    common = {
        "beta": beta,
        "temperature": temperature,
        "chunk_size": chunk_size,
        "student_lm_head_bias": student_lm_head_bias,
    }
    domain = fused_ce_topk_jsd(
        student_hidden,
        lm_head_weight,
        domain_labels,
        teacher if lm_kd else None,
        num_items=domain_items,
        compute_ce=True,
        compute_jsd=lm_kd,
        **common,
    )
    anchor_jsd = domain.jsd.new_zeros(())
    if anchored:
        anchor_jsd = fused_ce_topk_jsd(
            student_hidden,
            lm_head_weight,
            anchor_labels,
            teacher,
            num_items=anchor_items,
            compute_ce=False,
            compute_jsd=True,
            **common,
        ).jsd
    return AnchoredTerms(domain.ce, domain.jsd, anchor_jsd, int(domain.correct_tokens))


def reference_topk_token_losses(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    anchor_rows: torch.Tensor | None,
    teacher: TeacherTopK,
    *,
    beta: float,
    temperature: float,
    domain_items: int,
    anchor_items: int,
    lm_kd: bool,
    anchored: bool,
) -> AnchoredTerms:
    """The same terms from full ``[B, T, V]`` student logits (``kd_loss_impl: reference``)."""
    domain_labels, anchor_labels = split_rows(labels, anchor_rows)
    ce = masked_ce(student_logits, domain_labels, num_items=domain_items)
    zero = ce.new_zeros(())
    settings = {"beta": beta, "temperature": temperature}
    jsd = (
        reference_topk_jsd(student_logits, teacher, domain_labels, num_items=domain_items, **settings)
        if lm_kd
        else zero
    )
    anchor_jsd = (
        reference_topk_jsd(student_logits, teacher, anchor_labels, num_items=anchor_items, **settings)
        if anchored
        else zero
    )
    valid = domain_labels != IGNORE_INDEX
    correct = int((student_logits.argmax(-1)[valid] == domain_labels[valid]).sum())
    return AnchoredTerms(ce, jsd, anchor_jsd, correct)


@dataclass(frozen=True)
class _Config:
    beta: float
    temperature: float
    chunk_size: int
    block_rows: int | None
    compute_ce: bool
    compute_jsd: bool


class _FusedCETopKJSD(torch.autograd.Function):
    """Sums of CE and top-k JSD over rows; saves the inputs, two ``[N]`` log-sum-exps and ``G [N, k+1]``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, teacher_logp, labels, config: _Config):
        ctx.set_materialize_grads(False)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n_rows, vocab_size, device = hidden.size(0), weight.size(0), hidden.device
        tempered = config.temperature != 1.0
        ce_sum = torch.zeros((), dtype=dtype, device=device)
        jsd_sum = torch.zeros((), dtype=dtype, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        lse_raw = torch.zeros(n_rows, dtype=dtype, device=device)
        lse_tempered = torch.zeros(n_rows, dtype=dtype, device=device) if tempered else lse_raw
        coefficients = None
        if config.compute_jsd:
            coefficients = torch.zeros(n_rows, ids.size(1) + 1, dtype=dtype, device=device)

        if n_rows > 0:
            head = _Head(weight, bias, dtype)
            chunk = min(config.chunk_size, n_rows)
            block = min(_block_rows(config, vocab_size, device, dtype), chunk)
            logits_buf = torch.empty(chunk, vocab_size, dtype=dtype, device=device)
            exp_buf = torch.empty(block, vocab_size, dtype=dtype, device=device)
            for start in range(0, n_rows, chunk):
                end = min(start + chunk, n_rows)
                logits = head.logits(hidden[start:end], logits_buf)
                for offset in range(0, end - start, block):
                    rows = slice(start + offset, min(start + offset + block, end))
                    ce, jsd, hits = _forward_block(
                        logits[offset : offset + rows.stop - rows.start],
                        exp_buf,
                        labels[rows],
                        None if ids is None else ids[rows],
                        None if teacher_logp is None else teacher_logp[rows],
                        lse_raw[rows],
                        lse_tempered[rows],
                        None if coefficients is None else coefficients[rows],
                        config,
                    )
                    ce_sum += ce
                    jsd_sum += jsd
                    correct += hits

        ctx.config = config
        ctx.save_for_backward(hidden, weight, bias, ids, labels, lse_raw, lse_tempered, coefficients)
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
        hidden, weight, bias, ids, labels, lse_raw, lse_tempered, coefficients = ctx.saved_tensors
        ce_scale = _as_scale(grad_ce) if config.compute_ce else None
        jsd_scale = _as_scale(grad_jsd) if config.compute_jsd else None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n_rows, vocab_size, device = hidden.size(0), weight.size(0), hidden.device
        grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=device) if need_weight else None
        grad_bias = torch.zeros(vocab_size, dtype=dtype, device=device) if need_bias else None

        if n_rows > 0 and (ce_scale is not None or jsd_scale is not None):
            head = _Head(weight, bias, dtype)
            chunk = min(config.chunk_size, n_rows)
            block = min(_block_rows(config, vocab_size, device, dtype), chunk)
            logits_buf = torch.empty(chunk, vocab_size, dtype=dtype, device=device)
            ce_buf = None
            if ce_scale is not None and jsd_scale is not None and config.temperature != 1.0:
                ce_buf = torch.empty(block, vocab_size, dtype=dtype, device=device)
            for start in range(0, n_rows, chunk):
                end = min(start + chunk, n_rows)
                hidden_chunk = hidden[start:end].to(dtype)
                grad_logits = head.logits(hidden_chunk, logits_buf)  # overwritten with d total / d logits
                for offset in range(0, end - start, block):
                    rows = slice(start + offset, min(start + offset + block, end))
                    _backward_block(
                        grad_logits[offset : offset + rows.stop - rows.start],
                        ce_buf,
                        labels[rows],
                        None if ids is None else ids[rows],
                        lse_raw[rows],
                        lse_tempered[rows],
                        None if coefficients is None else coefficients[rows],
                        ce_scale,
                        jsd_scale,
                        config,
                    )
                if need_hidden:
                    torch.mm(grad_logits, head.weight, out=grad_hidden[start:end])
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
        )


class _Head:
    """The LM head in the compute dtype, converted once per call (not per chunk)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight = weight.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)
        self.dtype = dtype

    def logits(self, hidden: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        out = buffer[: hidden.size(0)]
        hidden = hidden.to(self.dtype)
        if self.bias is None:
            return torch.mm(hidden, self.weight.T, out=out)
        return torch.addmm(self.bias, hidden, self.weight.T, out=out)


def _forward_block(
    logits: torch.Tensor,  # [r, V] raw student logits z (left intact)
    exp_buf: torch.Tensor,  # [block, V] scratch
    labels: torch.Tensor,  # [r]
    ids: torch.Tensor | None,  # [r, k]
    teacher_logp: torch.Tensor | None,  # [r, k + 1]
    lse_raw: torch.Tensor,  # [r] out
    lse_tempered: torch.Tensor,  # [r] out (aliases lse_raw at temperature 1)
    coefficients: torch.Tensor | None,  # [r, k + 1] out: G
    config: _Config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce_sum, jsd_sum, correct)`` of one block of rows; fills the row statistics."""
    n = logits.size(0)
    zero = logits.new_zeros(())
    max_logit = logits.amax(dim=-1, keepdim=True)  # [r, 1]
    label_logit = logits.gather(1, labels.unsqueeze(1))
    correct = (label_logit >= max_logit).sum()  # the argmax up to exact ties, as fused.py
    exps = exp_buf[:n]

    ce = zero
    inv_temperature = 1.0 / config.temperature
    if config.compute_ce or not config.compute_jsd or config.temperature == 1.0:
        log_norm = torch.sub(logits, max_logit, out=exps).exp_().sum(-1, keepdim=True).log_()
        lse_raw.copy_((max_logit + log_norm).squeeze(1))
        if config.compute_ce:
            ce = (max_logit + log_norm - label_logit).sum()
    if not config.compute_jsd:
        return ce, zero, correct

    tempered_max = max_logit * inv_temperature
    if config.temperature != 1.0:  # exps still hold exp(z - max): the tempered softmax needs its own
        log_norm = torch.sub(logits, max_logit, out=exps).mul_(inv_temperature).exp_()
        log_norm = log_norm.sum(-1, keepdim=True).log_()
        lse_tempered.copy_((tempered_max + log_norm).squeeze(1))
    # The tail's sum of the same shifted exponentials: zero the top-k entries and sum again.
    tail_sum = exps.scatter_(1, ids, 0.0).sum(-1, keepdim=True)
    log_tail = tail_sum.log() - log_norm  # [r, 1]
    if ids.size(1) < logits.size(1):
        lost = (tail_sum.squeeze(1) < _TAIL_RECOMPUTE_BELOW[logits.dtype]).nonzero().squeeze(1)
        if lost.numel():
            tail_logits = (logits.index_select(0, lost) * inv_temperature).scatter_(
                1, ids.index_select(0, lost), float("-inf")
            )
            log_tail[lost] = tail_logits.logsumexp(-1, keepdim=True) - lse_tempered[lost].unsqueeze(1)
    top_logp = logits.gather(1, ids) * inv_temperature - lse_tempered.unsqueeze(1)
    student_logp = torch.cat([top_logp, log_tail], dim=1)  # [r, k + 1]
    divergence, coefficient = _bucket_divergence(
        student_logp, teacher_logp, config.beta, with_coefficients=True
    )
    coefficients.copy_(coefficient)
    return ce, divergence.sum(), correct


def _backward_block(
    logits: torch.Tensor,  # [r, V] raw student logits in, d total / d logits out
    ce_buf: torch.Tensor | None,  # [block, V] scratch (CE beside a tempered JSD)
    labels: torch.Tensor,  # [r]
    ids: torch.Tensor | None,  # [r, k]
    lse_raw: torch.Tensor,  # [r]
    lse_tempered: torch.Tensor,  # [r]
    coefficients: torch.Tensor | None,  # [r, k + 1]
    ce_scale: float | None,
    jsd_scale: float | None,
    config: _Config,
) -> None:
    """Overwrite ``logits`` with the gradient of ``ce_scale * ce_sum + jsd_scale * jsd_sum``."""
    if jsd_scale is None:  # CE only: (softmax(z) - onehot) * ce_scale
        logits.sub_(lse_raw.unsqueeze(1)).exp_().mul_(ce_scale)
        _subtract_at_labels(logits, labels, ce_scale)
        return
    inv_temperature = 1.0 / config.temperature
    scale = jsd_scale * inv_temperature
    # At temperature 1 the CE softmax is the JSD's p: its gradient folds into the same product.
    folded_ce = ce_scale if ce_scale is not None and config.temperature == 1.0 else 0.0
    ce_prob = None
    if ce_scale is not None and config.temperature != 1.0:
        ce_prob = torch.sub(logits, lse_raw.unsqueeze(1), out=ce_buf[: logits.size(0)]).exp_()
    if config.temperature != 1.0:
        logits.mul_(inv_temperature)
    student_prob = logits.sub_(lse_tempered.unsqueeze(1)).exp_()  # p, in place
    top_prob = student_prob.gather(1, ids)
    row_coefficients = coefficients * scale + folded_ce  # [r, k + 1]
    student_prob.mul_(row_coefficients[:, -1:])  # every token as a tail token ...
    student_prob.scatter_(1, ids, top_prob * row_coefficients[:, :-1])  # ... then the top k
    if ce_prob is not None:
        student_prob.add_(ce_prob, alpha=ce_scale)
    if ce_scale is not None:
        _subtract_at_labels(student_prob, labels, ce_scale)


def _bucket_divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float, with_coefficients: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position divergence over the last dim, and (on request) ``G_b = g_b - gbar`` (module doc).

    Empty buckets (``-inf``) are masked with ``where`` on finite stand-ins, so autograd through this
    function (the reference path) never meets ``0 * inf``.
    """
    student_prob, teacher_prob = student_logp.exp(), teacher_logp.exp()
    student_has, teacher_has = student_prob > 0, teacher_prob > 0
    s = torch.where(student_has, student_logp, torch.zeros_like(student_logp))
    t = torch.where(teacher_has, teacher_logp, torch.zeros_like(teacher_logp))
    zero = torch.zeros_like(s)
    coefficient = None
    if beta == 0:  # KL(Q || P)
        divergence = torch.where(teacher_has, teacher_prob * (t - student_logp), zero).sum(-1)
        if with_coefficients:
            coefficient = 1.0 - torch.where(teacher_has, (t - s).exp(), zero)
    elif beta == 1:  # KL(P || Q)
        divergence = torch.where(student_has, student_prob * (s - teacher_logp), zero).sum(-1)
        if with_coefficients:
            coefficient = s - teacher_logp - divergence.unsqueeze(-1)
    else:
        # log m from the sides that have mass; where neither has, any finite value (both terms are masked).
        log_mixture = torch.logaddexp(
            torch.where(student_has | ~teacher_has, s, torch.full_like(s, -math.inf)) + math.log1p(-beta),
            torch.where(teacher_has, t, torch.full_like(t, -math.inf)) + math.log(beta),
        )
        kl_student = torch.where(student_has, student_prob * (s - log_mixture), zero).sum(-1)
        kl_teacher = torch.where(teacher_has, teacher_prob * (t - log_mixture), zero).sum(-1)
        divergence = beta * kl_teacher + (1.0 - beta) * kl_student
        if with_coefficients:
            coefficient = (1.0 - beta) * (s - log_mixture - kl_student.unsqueeze(-1))
    if coefficient is not None:
        coefficient = torch.where(student_has, coefficient, zero)  # no student mass: no token to move
        coefficient = coefficient.nan_to_num(0.0, _COEFFICIENT_LIMIT, -_COEFFICIENT_LIMIT)
        coefficient = coefficient.clamp(-_COEFFICIENT_LIMIT, _COEFFICIENT_LIMIT)
    return divergence, coefficient


def _block_rows(config: _Config, vocab_size: int, device: torch.device, dtype: torch.dtype) -> int:
    if config.block_rows is not None:
        return max(1, config.block_rows)
    if device.type != "cpu":
        return config.chunk_size
    return max(1, _CPU_BLOCK_BYTES // (torch.finfo(dtype).bits // 8 * vocab_size))
