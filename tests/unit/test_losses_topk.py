"""The top-k + tail JSD (anchorkd.losses.topk) against float64 oracles: values, gradients, the error bound."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anchorkd.losses import IGNORE_INDEX, generalized_jsd, masked_ce
from anchorkd.losses.jsd import _per_vocab_divergence
from anchorkd.losses.topk import (
    TeacherTopK,
    bucket_jsd,
    fused_ce_topk_jsd,
    reference_topk_jsd,
    student_buckets,
    teacher_buckets,
    teacher_topk,
)

BETAS = [0.0, 0.1, 0.5, 1.0]
TEMPERATURES = [1.0, 0.8]


def _inputs(batch=3, seq=6, hidden=12, vocab=257, seed=0, dtype=torch.float32, with_bias=False):
    """Student hidden states / head / bias (leaf tensors), labels with masked positions, teacher logits."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :2] = IGNORE_INDEX
    labels[-1, -1] = IGNORE_INDEX
    student_hidden = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * (2 * hidden**-0.5)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    # A teacher near the student (as a fine-tuned student is near its teacher), peaked: std ~3.
    student_logits = student_hidden @ weight.T + (0 if bias is None else bias)
    teacher_logits = 1.5 * student_logits + torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64)
    leaves = [student_hidden, weight] + ([bias] if with_bias else [])
    return [leaf.to(dtype).requires_grad_() for leaf in leaves], labels, teacher_logits


def _logits(leaves):
    hidden, weight, *bias = leaves
    logits = hidden @ weight.T
    return logits + bias[0] if bias else logits


def _oracle_bucket_jsd(student_logits, teacher_logits, labels, k, beta, temperature):
    """fp64 oracle by another route: probabilities summed into buckets, the divergence of jsd.py."""
    p = torch.softmax(student_logits.double() / temperature, -1)
    q = torch.softmax(teacher_logits.double() / temperature, -1)
    ids = q.topk(k, -1).indices
    in_top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, ids, True)
    student = torch.cat([p.gather(-1, ids), (p * ~in_top).sum(-1, keepdim=True)], -1)
    teacher = torch.cat([q.gather(-1, ids), (q * ~in_top).sum(-1, keepdim=True)], -1)
    per_position = _per_vocab_divergence(student.log(), teacher.log(), beta).sum(-1)
    valid = labels != IGNORE_INDEX
    return per_position[valid].sum() / valid.sum()


def _fused(leaves, labels, teacher, beta, temperature, **kwargs):
    hidden, weight, *bias = leaves
    return fused_ce_topk_jsd(
        hidden,
        weight,
        labels,
        teacher,
        beta=beta,
        temperature=temperature,
        student_lm_head_bias=bias[0] if bias else None,
        **kwargs,
    )


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    ("beta", "temperature", "k"), list(itertools.product(BETAS, TEMPERATURES, [1, 8, 32, 128]))
)
def test_fused_topk_jsd_and_gradients_match_the_float64_bucket_oracle(beta, temperature, k):
    leaves, labels, teacher_logits = _inputs(seed=k, with_bias=k == 8)
    teacher = teacher_topk(teacher_logits.float(), k, temperature)
    jsd_weight, ce_weight = 0.7, 0.4
    out = _fused(leaves, labels, teacher, beta, temperature, chunk_size=5, block_rows=2)
    grads = _grads(jsd_weight * out.jsd + ce_weight * out.ce, leaves)

    exact_leaves = [leaf.detach().double().requires_grad_() for leaf in leaves]
    logits = _logits(exact_leaves)
    oracle = _oracle_bucket_jsd(logits, teacher_logits, labels, k, beta, temperature)
    oracle_ce = masked_ce(logits, labels)
    oracle_grads = _grads(jsd_weight * oracle + ce_weight * oracle_ce, exact_leaves)

    assert out.jsd.item() == pytest.approx(oracle.item(), rel=2e-5, abs=1e-7)
    assert out.ce.item() == pytest.approx(oracle_ce.item(), rel=1e-6)
    assert int(out.n_valid) == int((labels != IGNORE_INDEX).sum())
    for grad, oracle_grad in zip(grads, oracle_grads, strict=True):
        torch.testing.assert_close(grad.double(), oracle_grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize(("beta", "temperature"), list(itertools.product(BETAS, TEMPERATURES)))
def test_k_equal_to_the_vocabulary_is_the_exact_jsd(beta, temperature):
    vocab = 61
    leaves, labels, teacher_logits = _inputs(vocab=vocab, seed=3, dtype=torch.float64)
    teacher = teacher_topk(teacher_logits, vocab, temperature)
    assert torch.isneginf(teacher.log_tail).all()
    out = _fused(leaves, labels, teacher, beta, temperature, chunk_size=4)
    exact = generalized_jsd(_logits(leaves), teacher_logits, labels, beta, temperature)
    assert out.jsd.item() == pytest.approx(exact.item(), rel=1e-12)
    for grad, exact_grad in zip(_grads(out.jsd, leaves), _grads(exact, leaves), strict=True):
        torch.testing.assert_close(grad, exact_grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    ("beta", "temperature", "k"),
    [(0.0, 1.0, 1), (0.3, 0.7, 4), (1.0, 1.0, 4), (0.5, 1.0, 11), (1.0, 0.7, 1), (0.0, 0.7, 11)],
)
def test_gradcheck_in_float64(beta, temperature, k):
    leaves, labels, teacher_logits = _inputs(batch=2, seq=3, hidden=4, vocab=11, seed=5, dtype=torch.float64)
    leaves = [*leaves, torch.randn(11, dtype=torch.float64).requires_grad_()]  # with a bias too
    teacher = teacher_topk(teacher_logits, k, temperature)

    def loss(hidden, weight, bias):
        out = fused_ce_topk_jsd(
            hidden, weight, labels, teacher, beta=beta, temperature=temperature,
            chunk_size=2, student_lm_head_bias=bias,
        )  # fmt: skip
        return out.ce, out.jsd

    assert torch.autograd.gradcheck(loss, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("beta", "k"), list(itertools.product([0.0, 0.1, 0.5, 0.9, 1.0], [1, 8, 32, 128])))
def test_bucketed_jsd_is_below_the_full_jsd_and_within_the_documented_bound(beta, k):
    """Data-processing inequality (0 <= gap) and, for 0 < beta < 1, gap <= M h(beta R / M) <= M log 2."""
    gen = torch.Generator().manual_seed(k)
    teacher_logits = 3 * torch.randn(40, 1000, generator=gen, dtype=torch.float64)
    student_logits = teacher_logits + 1.5 * torch.randn(40, 1000, generator=gen, dtype=torch.float64)
    teacher = teacher_topk(teacher_logits, k)
    student_logp = student_buckets(student_logits, teacher.ids)
    bucketed = bucket_jsd(student_logp, teacher_buckets(teacher, torch.float64), beta)
    full = generalized_jsd(student_logits, teacher_logits, beta=beta, reduction="none")
    gap = full - bucketed
    assert (gap >= -1e-12).all()
    assert gap.max() > 1e-6  # the tail merges something: the check above is not vacuous
    if 0 < beta < 1:
        student_tail, teacher_tail = student_logp[:, -1].exp(), teacher.log_tail.exp()
        mixture = (1 - beta) * student_tail + beta * teacher_tail
        share = beta * teacher_tail / mixture
        binary_entropy = -(share * share.log() + (1 - share) * (1 - share).log())
        assert (gap <= mixture * binary_entropy + 1e-12).all()
        assert (mixture * binary_entropy <= mixture * math.log(2) + 1e-15).all()


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (0.5, 0.8), (1.0, 1.0)])
def test_reference_topk_jsd_matches_the_fused_loss(beta, temperature):
    leaves, labels, teacher_logits = _inputs(seed=9, dtype=torch.float64, with_bias=True)
    teacher = teacher_topk(teacher_logits, 8, temperature)
    fused = _fused(leaves, labels, teacher, beta, temperature, compute_ce=False, num_items=17).jsd
    reference = reference_topk_jsd(_logits(leaves), teacher, labels, beta, temperature, num_items=17)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-12)
    for grad, reference_grad in zip(_grads(fused, leaves), _grads(reference, leaves), strict=True):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-13)


def test_chunking_does_not_change_the_result():
    leaves, labels, teacher_logits = _inputs(batch=4, seq=9, seed=2)
    teacher = teacher_topk(teacher_logits.float(), 16, 0.9)
    results = []
    for chunk_size, block_rows in [(256, None), (7, 3), (1, 1)]:
        out = _fused(leaves, labels, teacher, 0.5, 0.9, chunk_size=chunk_size, block_rows=block_rows)
        results.append((out.ce.detach(), out.jsd.detach(), *_grads(out.ce + out.jsd, leaves)))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sixteen_bit_teacher_log_probs_are_renormalised_over_the_buckets():
    gen = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(5, 2000, generator=gen)
    teacher = teacher_topk(logits, 64)
    total = teacher.logprobs.exp().sum(-1) + teacher.log_tail.exp()
    torch.testing.assert_close(total, torch.ones(5), rtol=0, atol=1e-5)
    assert torch.equal(teacher.ids, logits.topk(64, -1).indices)
    stored = TeacherTopK(teacher.logprobs.half(), teacher.ids.int(), teacher.log_tail)
    buckets = teacher_buckets(stored)
    torch.testing.assert_close(buckets.exp().sum(-1), torch.ones(5, dtype=buckets.dtype), rtol=0, atol=1e-6)
    # fp16 keeps log-probs in [-8, 0] to 2^-9 at worst: each probability within 0.2 % of the exact one.
    torch.testing.assert_close(buckets[:, :-1].exp(), teacher.logprobs.exp(), rtol=2.5e-3, atol=1e-7)


def test_an_underflowing_student_tail_is_recomputed_from_its_logits():
    """All tail logits 200 below the top: the shifted exponentials underflow, the log-sum-exp does not. The
    forward KL weighs the student's tail by the teacher's (large) tail mass, so log(0) would give inf."""
    vocab, hidden = 8, 8
    weight = torch.eye(vocab, hidden, dtype=torch.float32).requires_grad_()
    student_hidden = torch.tensor([[300.0, 299.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0]]).requires_grad_()
    labels = torch.tensor([0])
    teacher = teacher_topk(torch.tensor([[5.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]), 2)
    out = fused_ce_topk_jsd(student_hidden, weight, labels, teacher, beta=0.0)
    expected = reference_topk_jsd(
        student_hidden.detach().double() @ weight.detach().double().T, teacher, beta=0.0
    )
    assert math.isfinite(out.jsd.item())
    assert out.jsd.item() == pytest.approx(expected.item(), rel=1e-5)  # fp32 logits of 300: eps * 300
    out.jsd.backward()
    assert torch.isfinite(student_hidden.grad).all()


def test_without_jsd_it_is_the_token_ce():
    leaves, labels, _ = _inputs(seed=1)
    out = _fused(leaves, labels, None, 0.5, 1.0, compute_jsd=False)
    assert out.jsd.item() == 0.0
    expected = masked_ce(_logits(leaves), labels)
    assert out.ce.item() == pytest.approx(expected.item(), rel=1e-6)
    for grad, expected_grad in zip(_grads(out.ce, leaves), _grads(expected, leaves), strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_bad_inputs_are_refused():
    leaves, labels, teacher_logits = _inputs(vocab=20)
    teacher = teacher_topk(teacher_logits, 4)
    with pytest.raises(ValueError, match="needs the teacher"):
        _fused(leaves, labels, None, 0.5, 1.0)
    with pytest.raises(ValueError, match="vs labels"):
        _fused(leaves, labels[:, :-1], teacher, 0.5, 1.0)
    with pytest.raises(ValueError, match="k must be in"):
        teacher_topk(teacher_logits, 21)
    with pytest.raises(ValueError, match="beta"):
        _fused(leaves, labels, teacher, 1.5, 1.0)


class _LargestTensorMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_full_logits_tensor_is_created():
    vocab, chunk = 500, 4
    leaves, labels, teacher_logits = _inputs(batch=4, seq=12, hidden=8, vocab=vocab, seed=6)
    teacher = teacher_topk(teacher_logits.float(), 32)
    n_valid = int((labels != IGNORE_INDEX).sum())
    allowed = max(chunk * vocab, vocab * 8)  # a chunk of logits, or the LM head's gradient
    assert n_valid * vocab > 4 * allowed  # the check is meaningful
    mode = _LargestTensorMode()
    with mode:
        out = _fused(leaves, labels, teacher, 0.5, 0.9, chunk_size=chunk)
        (out.ce + out.jsd).backward()
    assert mode.largest <= allowed
