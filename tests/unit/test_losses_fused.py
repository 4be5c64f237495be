"""Fused chunked CE + JSD against the full-logits reference (values, grads, memory)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import swift.rlhf_trainers.gkd_loss as swift_gkd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anchorkd.losses import IGNORE_INDEX, fused_ce_jsd, generalized_jsd, masked_ce

BETAS = [0.0, 0.1, 0.5, 1.0]
TEMPERATURES = [1.0, 0.9]
MIXES = list(itertools.product([0.0, 0.5, 1.0], [0.0, 0.2, 1.0]))  # (jsd weight w, ce weight a)


@dataclass
class Batch:
    hidden: torch.Tensor  # [B, T, H]
    weight: torch.Tensor  # [V, H]
    teacher_hidden: torch.Tensor  # [B, T, H_t]
    teacher_weight: torch.Tensor  # [V, H_t]
    labels: torch.Tensor  # [B, T]
    bias: torch.Tensor | None = None
    teacher_bias: torch.Tensor | None = None


def _batch(
    batch=3, seq=7, hidden=16, vocab=97, teacher_hidden=24, seed=0, dtype=torch.float32, with_bias=False
) -> Batch:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    labels[-1, -2:] = IGNORE_INDEX
    return Batch(
        hidden=randn(batch, seq, hidden).requires_grad_(),
        weight=randn(vocab, hidden, scale=hidden**-0.5 * 2).requires_grad_(),
        teacher_hidden=randn(batch, seq, teacher_hidden),
        teacher_weight=randn(vocab, teacher_hidden, scale=teacher_hidden**-0.5 * 2),
        labels=labels,
        bias=randn(vocab).requires_grad_() if with_bias else None,
        teacher_bias=randn(vocab) if with_bias else None,
    )


def _student_logits(b: Batch, hidden=None, weight=None, bias=None):
    hidden = b.hidden if hidden is None else hidden
    logits = hidden.float() @ (b.weight if weight is None else weight).float().T
    bias = b.bias if bias is None else bias
    return logits if bias is None else logits + bias.float()


def _teacher_logits(b: Batch):
    logits = b.teacher_hidden.float() @ b.teacher_weight.float().T
    return logits if b.teacher_bias is None else logits + b.teacher_bias.float()


def _params(b: Batch):
    return [p for p in (b.hidden, b.weight, b.bias) if p is not None]


def _reference(b: Batch, beta, temperature, w, a, num_items=None):
    """(jsd, ce, grads of w*jsd + a*ce) on full logits."""
    logits = _student_logits(b)
    jsd = generalized_jsd(logits, _teacher_logits(b), b.labels, beta, temperature, num_items=num_items)
    ce = masked_ce(logits, b.labels, num_items)
    grads = torch.autograd.grad(w * jsd + a * ce, _params(b), allow_unused=True)
    return jsd.detach(), ce.detach(), grads


def _fused(b: Batch, beta, temperature, w, a, **kwargs):
    out = fused_ce_jsd(
        b.hidden,
        b.weight,
        b.labels,
        b.teacher_hidden,
        b.teacher_weight,
        beta=beta,
        temperature=temperature,
        student_lm_head_bias=b.bias,
        teacher_lm_head_bias=b.teacher_bias,
        **kwargs,
    )
    total = w * out.jsd + a * out.ce
    grads = torch.autograd.grad(total, _params(b), allow_unused=True) if total.requires_grad else None
    return out, grads


def _assert_rel_close(actual, expected, rel=1e-5):
    """max |actual - expected| <= rel * max |expected| (or tiny absolute error if expected ~ 0)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-7, f"max abs err {err:.3e} vs scale {scale:.3e}"


def _assert_grads_close(actual, expected, rel=1e-5):
    for got, want in zip(actual, expected, strict=True):
        if want is None:  # param unused by the reference (weight 0 on both terms)
            assert got is None or torch.count_nonzero(got) == 0
        else:
            _assert_rel_close(got, want, rel)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(("w", "a"), MIXES)
def test_matches_reference_values_and_grads(beta, temperature, w, a):
    b = _batch(seed=int(10 * beta + 100 * temperature))
    ref_jsd, ref_ce, ref_grads = _reference(b, beta, temperature, w, a)
    out, grads = _fused(b, beta, temperature, w, a, chunk_size=5)  # 5 does not divide N=16
    _assert_rel_close(out.jsd, ref_jsd)
    _assert_rel_close(out.ce, ref_ce)
    if w == 0 and a == 0:
        assert grads is None or all(torch.count_nonzero(g) == 0 for g in grads if g is not None)
    else:
        _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("beta", BETAS)
def test_matches_swift_gkd_trainer_loss(beta):
    """Directly against ms-swift: gkd_loss total / num_valid + sft_alpha * mean token CE."""
    b = _batch(seed=15)
    sft_alpha = 0.2
    logits = _student_logits(b)
    teacher = swift_gkd.TeacherOutput(full_logits=_teacher_logits(b), labels=b.labels)
    total, num_valid = swift_gkd.gkd_loss(logits, teacher, b.labels, beta, 0.9)
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE_INDEX
    )
    swift_loss = total / num_valid + sft_alpha * ce
    swift_grads = torch.autograd.grad(swift_loss, _params(b))
    out, grads = _fused(b, beta, 0.9, 1.0, sft_alpha, chunk_size=4)
    _assert_rel_close(out.jsd + sft_alpha * out.ce, swift_loss.detach())
    _assert_grads_close(grads, swift_grads)


@pytest.mark.parametrize(
    ("chunk_size", "block_rows"), [(1, None), (3, None), (4, 3), (7, 2), (16, 16), (1000, 5)]
)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunking_and_blocking_do_not_change_results(chunk_size, block_rows, beta):
    b = _batch(seed=3)
    ref_jsd, ref_ce, ref_grads = _reference(b, beta, 0.9, 1.0, 0.3)
    out, grads = _fused(b, beta, 0.9, 1.0, 0.3, chunk_size=chunk_size, block_rows=block_rows)
    _assert_rel_close(out.jsd, ref_jsd)
    _assert_rel_close(out.ce, ref_ce)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_lm_head_biases(beta):
    b = _batch(seed=4, with_bias=True)
    ref_jsd, ref_ce, ref_grads = _reference(b, beta, 0.9, 0.5, 1.0)
    out, grads = _fused(b, beta, 0.9, 0.5, 1.0, chunk_size=6)
    _assert_rel_close(out.jsd, ref_jsd)
    _assert_rel_close(out.ce, ref_ce)
    _assert_grads_close(grads, ref_grads)


def test_counts_and_accuracy():
    b = _batch(seed=5, vocab=11)  # small vocab so that some argmaxes hit the label
    out, _ = _fused(b, 0.5, 1.0, 1.0, 1.0, chunk_size=4)
    mask = b.labels != IGNORE_INDEX
    correct = ((_student_logits(b).argmax(-1) == b.labels) & mask).sum()
    assert out.n_valid.item() == mask.sum().item()
    assert out.correct_tokens.item() == correct.item() > 0
    assert out.correct_tokens.dtype == out.n_valid.dtype == torch.int64


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_all_masked_batch_gives_zero_losses_and_zero_grads(beta):
    b = _batch(seed=6)
    b.labels = torch.full_like(b.labels, IGNORE_INDEX)
    out, grads = _fused(b, beta, 0.9, 1.0, 1.0)
    for value in (out.jsd, out.ce, out.n_valid, out.correct_tokens):
        assert value.item() == 0
    for grad in grads:
        assert torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0
    # Also with an explicit normaliser (e.g. other micro-batches carry the tokens).
    out, grads = _fused(b, beta, 0.9, 1.0, 1.0, num_items=0)
    assert out.jsd.item() == 0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_fully_masked_sequence_inside_a_batch():
    b = _batch(seed=7)
    b.labels[1] = IGNORE_INDEX
    ref_jsd, ref_ce, ref_grads = _reference(b, 0.1, 0.9, 1.0, 1.0)
    out, grads = _fused(b, 0.1, 0.9, 1.0, 1.0, chunk_size=2)
    _assert_rel_close(out.jsd, ref_jsd)
    _assert_rel_close(out.ce, ref_ce)
    _assert_grads_close(grads, ref_grads)
    assert torch.count_nonzero(grads[0][1]) == 0  # masked rows get no gradient


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_num_items_micro_batches_sum_to_full_batch(beta):
    b = _batch(batch=4, seed=8)
    full, full_grads = _fused(b, beta, 0.9, 1.0, 0.2)
    num_items = int(full.n_valid)
    micro = []
    for rows in (slice(0, 2), slice(2, 4)):
        part = Batch(b.hidden[rows], b.weight, b.teacher_hidden[rows], b.teacher_weight, b.labels[rows])
        out = fused_ce_jsd(
            part.hidden, b.weight, part.labels, part.teacher_hidden, b.teacher_weight,
            beta=beta, temperature=0.9, num_items=num_items,
        )  # fmt: skip
        micro.append(out)
    jsd = micro[0].jsd + micro[1].jsd
    ce = micro[0].ce + micro[1].ce
    grads = torch.autograd.grad(1.0 * jsd + 0.2 * ce, [b.hidden, b.weight])
    _assert_rel_close(jsd, full.jsd)
    _assert_rel_close(ce, full.ce)
    _assert_grads_close(grads, full_grads)
    # A tensor normaliser (what transformers passes as num_items_in_batch) works the same.
    out = fused_ce_jsd(
        b.hidden, b.weight, b.labels, b.teacher_hidden, b.teacher_weight,
        beta=beta, temperature=0.9, num_items=torch.tensor(2 * num_items),
    )  # fmt: skip
    _assert_rel_close(out.jsd, full.jsd / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_low_precision_inputs(dtype, beta):
    b = _batch(seed=9, dtype=dtype)
    out, grads = _fused(b, beta, 0.9, 1.0, 0.5, chunk_size=5)
    assert out.jsd.dtype == out.ce.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype, dtype]
    # Reference: the same (rounded) values in fp32; the fused math is fp32 too, so the losses
    # agree tightly and the grads up to their final rounding to the input dtype.
    b32 = Batch(
        b.hidden.detach().float().requires_grad_(),
        b.weight.detach().float().requires_grad_(),
        b.teacher_hidden.float(),
        b.teacher_weight.float(),
        b.labels,
    )
    ref_jsd, ref_ce, ref_grads = _reference(b32, beta, 0.9, 1.0, 0.5)
    _assert_rel_close(out.jsd, ref_jsd, rel=1e-5)
    _assert_rel_close(out.ce, ref_ce, rel=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        _assert_rel_close(got.float(), want, rel=1e-2)


def test_ce_only_and_jsd_only():
    b = _batch(seed=10)
    ref_jsd, ref_ce, ref_ce_grads = _reference(b, 0.1, 0.9, 0.0, 1.0)
    out = fused_ce_jsd(b.hidden, b.weight, b.labels, beta=0.1, compute_jsd=False)  # no teacher needed
    assert out.jsd.item() == 0 and not out.jsd.requires_grad
    _assert_rel_close(out.ce, ref_ce)
    _assert_grads_close(torch.autograd.grad(out.ce, [b.hidden, b.weight]), ref_ce_grads)

    _, _, ref_jsd_grads = _reference(b, 0.1, 0.9, 1.0, 0.0)
    out, grads = _fused(b, 0.1, 0.9, 1.0, 0.0, compute_ce=False)
    assert out.ce.item() == 0 and not out.ce.requires_grad
    _assert_rel_close(out.jsd, ref_jsd)
    _assert_grads_close(grads, ref_jsd_grads)


def test_one_output_unused_in_backward():
    """grad_ce / grad_jsd arrive as None when that output is not part of the graph."""
    b = _batch(seed=11)
    for w, a in [(1.0, 0.0), (0.0, 1.0)]:
        _, _, ref_grads = _reference(b, 0.5, 1.0, w, a)
        out = fused_ce_jsd(b.hidden, b.weight, b.labels, b.teacher_hidden, b.teacher_weight, beta=0.5)
        grads = torch.autograd.grad(out.jsd if w else out.ce, [b.hidden, b.weight])
        _assert_grads_close(grads, ref_grads)


def test_shared_head_and_frozen_weight():
    """teacher_lm_head_weight=None reuses the student head as a constant; frozen heads get no grad."""
    b = _batch(seed=12, teacher_hidden=16)
    b.teacher_weight = b.weight.detach()
    _, _, ref_grads = _reference(b, 0.5, 0.9, 1.0, 1.0)
    out = fused_ce_jsd(b.hidden, b.weight, b.labels, b.teacher_hidden, beta=0.5, temperature=0.9)
    _assert_grads_close(torch.autograd.grad(out.jsd + out.ce, [b.hidden, b.weight]), ref_grads)

    frozen = b.weight.detach()
    out = fused_ce_jsd(b.hidden, frozen, b.labels, b.teacher_hidden, beta=0.5, temperature=0.9)
    (grad_hidden,) = torch.autograd.grad(out.jsd + out.ce, [b.hidden])
    _assert_rel_close(grad_hidden, ref_grads[0])


def test_flat_inputs_equal_batched_inputs():
    b = _batch(seed=13)
    batched, _ = _fused(b, 0.1, 0.9, 1.0, 1.0)
    flat = fused_ce_jsd(
        b.hidden.reshape(-1, b.hidden.size(-1)), b.weight, b.labels.reshape(-1),
        b.teacher_hidden.reshape(-1, b.teacher_hidden.size(-1)), b.teacher_weight,
        beta=0.1, temperature=0.9,
    )  # fmt: skip
    _assert_rel_close(flat.jsd, batched.jsd)
    _assert_rel_close(flat.ce, batched.ce)


def test_rejects_bad_arguments():
    b = _batch()
    with pytest.raises(ValueError):
        fused_ce_jsd(b.hidden, b.weight, b.labels, beta=0.5)  # JSD without teacher
    with pytest.raises(ValueError):
        fused_ce_jsd(b.hidden, b.weight, b.labels, b.teacher_hidden, b.teacher_weight, beta=-0.1)
    with pytest.raises(ValueError):
        fused_ce_jsd(b.hidden, b.weight, b.labels, b.teacher_hidden, b.teacher_weight[:-1], beta=0.5)
    with pytest.raises(ValueError):
        fused_ce_jsd(b.hidden, b.weight, b.labels, b.teacher_hidden, b.teacher_weight, beta=0.5, chunk_size=0)


class _LargestTensorMode(TorchDispatchMode):
    """Records the largest numel among all tensors produced by aten ops."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_no_full_logits_tensor_is_saved_or_created(beta):
    """Neither the autograd graph nor any op in forward/backward holds an [N, V] tensor."""
    vocab, hidden, chunk = 500, 8, 4
    b = _batch(batch=4, seq=12, hidden=hidden, vocab=vocab, teacher_hidden=hidden, seed=14)
    n_valid = int((b.labels != IGNORE_INDEX).sum())
    full_logits_numel = n_valid * vocab
    assert full_logits_numel > 4 * max(chunk * vocab, vocab * hidden)  # the check is meaningful

    saved_numels = []

    def pack(tensor):
        saved_numels.append(tensor.numel())
        return tensor

    mode = _LargestTensorMode()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), mode:
        out = fused_ce_jsd(
            b.hidden, b.weight, b.labels, b.teacher_hidden, b.teacher_weight,
            beta=beta, temperature=0.9, chunk_size=chunk,
        )  # fmt: skip
        (out.jsd + out.ce).backward()
    assert max(saved_numels) == vocab * hidden  # the LM head itself is the largest saved tensor
    assert mode.largest <= max(chunk * vocab, vocab * hidden) < full_logits_numel
    assert b.weight.grad is not None and b.hidden.grad is not None

    # Positive control: the full-logits reference does trip both detectors.
    saved_numels.clear()
    mode = _LargestTensorMode()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), mode:
        logits = _student_logits(b)
        generalized_jsd(logits, _teacher_logits(b), b.labels, beta, 0.9).backward()
    assert max(saved_numels) >= full_logits_numel and mode.largest >= full_logits_numel


# --- accuracy where student and teacher nearly agree, and where they are far apart -------------------------


def _float64_jsd_and_grads(hidden, weight, teacher_hidden, teacher_weight, labels, beta, temperature):
    """Float64 oracle: the reference JSD (mean over valid positions) and its grads."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    student = h @ w.T
    teacher = teacher_hidden.double() @ teacher_weight.double().T
    loss = generalized_jsd(student, teacher, labels, beta=beta, temperature=temperature)
    loss.backward()
    return float(loss.detach()), h.grad, w.grad


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_of_nearly_equal_distributions_keeps_its_digits_in_fp32(beta):
    """A teacher that differs from the student by a 1e-4 perturbation of the LM head (the start of a LoRA
    run): the JSD is 1e-8 to 1e-7 per position, below the fp32 rounding of log-probabilities near -log V.
    Written from the logit difference, the fp32 value matches the float64 oracle to ~1e-4 (the floor set by
    the fp32 logits themselves); the fp32 reference, which sums ``p (s - log m)``, is off by 17-43 %
    (bench/jsd_accuracy.py). Gradients are O(u), not differences of nearly equal sums, so their accuracy
    is the fp32 logits' either way: checked where that floor is far below the tolerance (1e-3 apart)."""
    gen = torch.Generator().manual_seed(7)
    vocab, hidden_size, rows = 4096, 32, 24
    hidden = torch.randn(rows, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.5
    direction = torch.randn(vocab, hidden_size, generator=gen)
    labels = torch.randint(0, vocab, (rows,), generator=gen)

    teacher_weight = weight + 1e-4 * direction
    want, *_ = _float64_jsd_and_grads(hidden, weight, hidden, teacher_weight, labels, beta, 1.0)
    assert 1e-9 < want < 1e-6  # the regime this test is about
    out = fused_ce_jsd(
        hidden, weight, labels, hidden, teacher_weight, beta=beta, compute_ce=False, block_rows=4
    )
    assert float(out.jsd) == pytest.approx(want, rel=1e-3)
    reference = generalized_jsd(hidden @ weight.T, hidden @ teacher_weight.T, labels, beta=beta)
    assert float(reference) != pytest.approx(want, rel=1e-2)  # what the fp32 sum form gives up

    teacher_weight = weight + 1e-3 * direction
    want, want_grad_h, want_grad_w = _float64_jsd_and_grads(
        hidden, weight, hidden, teacher_weight, labels, beta, 1.0
    )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_ce_jsd(h, w, labels, hidden, teacher_weight, beta=beta, compute_ce=False, block_rows=4)
    out.jsd.backward()
    assert float(out.jsd) == pytest.approx(want, rel=1e-3)
    for got, expected in ((h.grad, want_grad_h), (w.grad, want_grad_w)):
        assert float((got.double() - expected).norm() / expected.norm()) < 5e-3


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_where_the_teacher_puts_mass_the_student_all_but_excludes(beta):
    """Rows whose log q - log p reaches far beyond exp's fp32 range (~120 here) use the plain form: values
    and grads stay finite and match the float64 oracle, including where p underflows to 0."""
    gen = torch.Generator().manual_seed(3)
    vocab, hidden_size, rows = 512, 16, 10
    hidden = torch.randn(rows, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen)
    teacher_weight = torch.randn(vocab, hidden_size, generator=gen)
    teacher_weight[5] = 40.0 * hidden.mean(0) / hidden.mean(0).norm()  # token 5: the teacher's favourite
    weight[5] = -teacher_weight[5]  # ... which the student rules out
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    teacher_logits = hidden @ teacher_weight.T
    student_logits = hidden @ weight.T
    gap = (teacher_logits.log_softmax(-1) - student_logits.log_softmax(-1)).amax()
    assert gap > 100  # beyond fp32 exp's range: q / p - 1 would overflow
    want, want_grad_h, want_grad_w = _float64_jsd_and_grads(
        hidden, weight, hidden, teacher_weight, labels, beta, 1.0
    )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_ce_jsd(h, w, labels, hidden, teacher_weight, beta=beta, compute_ce=False, block_rows=4)
    out.jsd.backward()
    assert torch.isfinite(out.jsd) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert float(out.jsd) == pytest.approx(want, rel=1e-4)
    for got, expected in ((h.grad, want_grad_h), (w.grad, want_grad_w)):
        # the fp32 logits bound it: up to 1e-3 in either form of the JSD (measured)
        assert float((got.double() - expected).norm() / expected.norm()) < 3e-3
