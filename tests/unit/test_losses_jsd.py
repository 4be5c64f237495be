"""Reference generalised JSD / CE against ms-swift 4.6 and trl 0.29 (values and gradients)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # before trl.experimental is imported

import swift.rlhf_trainers.gkd_loss as swift_gkd  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402

from anchorkd.losses import IGNORE_INDEX, generalized_jsd, generalized_jsd_per_position, masked_ce  # noqa: E402

trl_generalized_jsd = GKDTrainer.generalized_jsd_loss

BETAS = [0.0, 0.1, 0.5, 1.0]
TEMPERATURES = [1.0, 0.9]
B, T, V = 3, 6, 64


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=gen)).to(dtype)
    teacher = (2 * torch.randn(B, T, V, generator=gen)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = IGNORE_INDEX  # prompt-like prefix
    labels[1, 4:] = IGNORE_INDEX  # padding-like suffix
    labels[2, 3] = IGNORE_INDEX
    return student, teacher, labels


def _value_and_grad(loss_fn, student: torch.Tensor):
    student = student.detach().clone().requires_grad_()
    loss = loss_fn(student)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def _swift_trainer_jsd(student, teacher, labels, beta, temperature):
    """What ms-swift's GKDTrainer._compute_jsd_loss does after its label roll."""
    teacher_output = swift_gkd.TeacherOutput(full_logits=teacher, labels=labels)
    total, num_valid = swift_gkd.gkd_loss(student, teacher_output, labels, beta, temperature)
    return total * 0 if num_valid == 0 else total / num_valid


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_swift_gkd_loss(beta, temperature):
    student, teacher, labels = _inputs()
    ours = _value_and_grad(lambda s: generalized_jsd(s, teacher, labels, beta, temperature), student)
    swift = _value_and_grad(lambda s: _swift_trainer_jsd(s, teacher, labels, beta, temperature), student)
    _assert_close(ours[0], swift[0])
    _assert_close(ours[1], swift[1])


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_swift_jsd_loss_primitive(beta, temperature):
    """ms-swift's ``jsd_loss`` takes masked, tempered [N, V] logits and returns the sum."""
    student, teacher, labels = _inputs(seed=1)
    mask = labels != IGNORE_INDEX
    ours = _value_and_grad(lambda s: generalized_jsd(s, teacher, labels, beta, temperature, "sum"), student)
    swift = _value_and_grad(
        lambda s: swift_gkd.jsd_loss(s[mask] / temperature, teacher[mask] / temperature, beta, chunk_size=5),
        student,
    )
    _assert_close(ours[0], swift[0])
    _assert_close(ours[1], swift[1])


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_matches_trl_with_labels(beta, temperature, reduction):
    student, teacher, labels = _inputs(seed=2)

    def ours_fn(s):
        out = generalized_jsd(s, teacher, labels, beta, temperature, reduction, convention="trl")
        return out.square().sum() if reduction == "none" else out  # scalar for autograd

    def trl_fn(s):
        out = trl_generalized_jsd(s, teacher, labels, beta=beta, temperature=temperature, reduction=reduction)
        return out.square().sum() if reduction == "none" else out

    ours, trl = _value_and_grad(ours_fn, student), _value_and_grad(trl_fn, student)
    _assert_close(ours[0], trl[0])
    _assert_close(ours[1], trl[1])


@pytest.mark.parametrize("beta", BETAS)
def test_default_convention_equals_trl_batchmean_with_labels(beta):
    """The default (ms-swift) reduction agrees with trl's default whenever labels are given."""
    student, teacher, labels = _inputs(seed=3)
    ours = _value_and_grad(lambda s: generalized_jsd(s, teacher, labels, beta, 0.9), student)
    trl = _value_and_grad(
        lambda s: trl_generalized_jsd(s, teacher, labels, beta=beta, temperature=0.9), student
    )
    _assert_close(ours[0], trl[0])
    _assert_close(ours[1], trl[1])


def test_conventions_differ_only_in_documented_corner_cases():
    student, teacher, labels = _inputs(seed=4)
    per_position = generalized_jsd_per_position(student, teacher, 0.5)  # [B, T]
    # No labels: swift averages over all B*T positions, trl divides by size(0) == B.
    _assert_close(generalized_jsd(student, teacher, None, 0.5), per_position.mean())
    trl_no_labels = trl_generalized_jsd(student, teacher, None, beta=0.5)
    _assert_close(generalized_jsd(student, teacher, None, 0.5, convention="trl"), trl_no_labels)
    _assert_close(trl_no_labels, per_position.sum() / B)
    # 'none': swift gives per-position [B, T] (0 where masked), trl element-wise [N_valid, V].
    mask = labels != IGNORE_INDEX
    swift_none = generalized_jsd(student, teacher, labels, 0.5, reduction="none")
    assert swift_none.shape == (B, T)
    _assert_close(swift_none, per_position.masked_fill(~mask, 0))
    assert generalized_jsd(student, teacher, labels, 0.5, reduction="none", convention="trl").shape == (
        int(mask.sum()),
        V,
    )
    # No valid position: swift gives 0 (and zero grads), trl 0/0 = NaN.
    all_masked = torch.full_like(labels, IGNORE_INDEX)
    loss, grad = _value_and_grad(lambda s: generalized_jsd(s, teacher, all_masked, 0.5), student)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert torch.isnan(generalized_jsd(student, teacher, all_masked, 0.5, convention="trl"))
    assert torch.isnan(trl_generalized_jsd(student, teacher, all_masked, beta=0.5))


def test_beta_edges_are_forward_and_reverse_kl():
    student, teacher, _ = _inputs(seed=5)
    s_logp, t_logp = F.log_softmax(student / 0.9, -1), F.log_softmax(teacher / 0.9, -1)
    forward_kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    reverse_kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    _assert_close(generalized_jsd_per_position(student, teacher, 0.0, 0.9), forward_kl)
    _assert_close(generalized_jsd_per_position(student, teacher, 1.0, 0.9), reverse_kl)
    # The mixture formula is continuous inside (0, 1) but tends to 0 at the ends.
    assert generalized_jsd(student, teacher, beta=1e-6).item() < 1e-4 * forward_kl.mean().item()


def test_num_items_makes_micro_batches_sum_to_the_full_batch():
    student, teacher, labels = _inputs(seed=6)
    num_items = int((labels != IGNORE_INDEX).sum())
    full = _value_and_grad(lambda s: generalized_jsd(s, teacher, labels, 0.1, 0.9), student)

    def accumulated(s):
        parts = [
            generalized_jsd(s[rows], teacher[rows], labels[rows], 0.1, 0.9, num_items=num_items)
            for rows in (slice(0, 1), slice(1, 3))
        ]
        return sum(parts)

    _assert_close(accumulated(student), full[0])
    _assert_close(_value_and_grad(accumulated, student)[1], full[1])


def test_masked_ce_matches_cross_entropy_and_num_items():
    student, _, labels = _inputs(seed=7)
    expected = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    _assert_close(masked_ce(student, labels), expected)
    num_items = int((labels != IGNORE_INDEX).sum())
    parts = masked_ce(student[:1], labels[:1], num_items) + masked_ce(student[1:], labels[1:], num_items)
    _assert_close(parts, expected)
    all_masked = torch.full_like(labels, IGNORE_INDEX)
    loss, grad = _value_and_grad(lambda s: masked_ce(s, all_masked), student)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_low_precision_inputs_are_computed_in_fp32():
    student, teacher, labels = _inputs(seed=8, dtype=torch.bfloat16)
    loss = generalized_jsd(student, teacher, labels, 0.5, 0.9)
    assert loss.dtype == torch.float32
    _assert_close(loss, generalized_jsd(student.float(), teacher.float(), labels, 0.5, 0.9))
    assert masked_ce(student, labels).dtype == torch.float32
    # fp64 is kept (used for high-precision references), never downcast.
    assert generalized_jsd(student.double(), teacher.double(), labels).dtype == torch.float64


def test_rejects_bad_arguments():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher, labels, beta=1.5)
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher, labels, temperature=0.0)
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher, labels, reduction="sum", num_items=3)
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher[:, :-1], labels[:, :-1])
