"""The anchored loss split (``anchorkd.losses.anchor``) against the reference JSD / CE computed by hand per row
subset: anchor rows add no CE, only their JSD over their own tokens; domain rows are unchanged by them."""

from __future__ import annotations

import pytest
import torch

from anchorkd.losses import IGNORE_INDEX, generalized_jsd, masked_ce
from anchorkd.losses.anchor import (
    fused_anchored_ce_jsd,
    reference_anchored_ce_jsd,
    split_rows,
    supervised_counts,
)

B, T, H, V = 4, 6, 8, 53
ANCHORS = torch.tensor([False, True, False, True])


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    teacher_hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :2] = IGNORE_INDEX  # prompts
    labels[1, -1] = IGNORE_INDEX  # rows of different lengths
    return hidden, weight, teacher_hidden, labels


def test_split_rows_puts_every_supervised_position_in_exactly_one_mask():
    labels = inputs()[3]
    domain, anchor = split_rows(labels, ANCHORS)
    assert torch.equal(domain[ANCHORS], torch.full_like(domain[ANCHORS], IGNORE_INDEX))
    assert torch.equal(anchor[~ANCHORS], torch.full_like(anchor[~ANCHORS], IGNORE_INDEX))
    assert torch.equal(domain[~ANCHORS], labels[~ANCHORS]) and torch.equal(anchor[ANCHORS], labels[ANCHORS])
    assert supervised_counts(labels, ANCHORS) == (8, 7)
    assert supervised_counts(labels, None) == (15, 0)
    with pytest.raises(ValueError, match="must be \\[B\\]"):
        split_rows(labels, ANCHORS[:3])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_reference_terms_equal_the_jsd_and_ce_of_each_row_subset(beta):
    hidden, weight, teacher_hidden, labels = inputs()
    student, teacher = hidden @ weight.T, teacher_hidden @ weight.T
    terms = reference_anchored_ce_jsd(
        student, teacher, labels, ANCHORS, beta=beta, temperature=0.9, domain_items=10, anchor_items=9
    )
    domain_rows, anchor_rows = ~ANCHORS, ANCHORS
    expected_ce = masked_ce(student[domain_rows], labels[domain_rows], num_items=10)
    expected_jsd = generalized_jsd(
        student[domain_rows], teacher[domain_rows], labels[domain_rows], beta, 0.9, num_items=10
    )
    expected_anchor = generalized_jsd(
        student[anchor_rows], teacher[anchor_rows], labels[anchor_rows], beta, 0.9, num_items=9
    )
    torch.testing.assert_close(terms.ce, expected_ce)
    torch.testing.assert_close(terms.jsd, expected_jsd)
    torch.testing.assert_close(terms.anchor_jsd, expected_anchor)
    assert float(terms.anchor_jsd) > 0 and float(terms.jsd) > 0


def test_anchor_rows_contribute_no_ce_and_leave_the_domain_terms_alone():
    """Changing only the anchor rows' labels (their targets) changes the anchor JSD and nothing else."""
    hidden, weight, teacher_hidden, labels = inputs()
    student, teacher = hidden @ weight.T, teacher_hidden @ weight.T
    relabelled = labels.clone()
    relabelled[ANCHORS] = torch.where(
        labels[ANCHORS] == IGNORE_INDEX, IGNORE_INDEX, (labels[ANCHORS] + 1) % V
    )
    kwargs = {"beta": 0.5, "domain_items": 8, "anchor_items": 7}
    a = reference_anchored_ce_jsd(student, teacher, labels, ANCHORS, **kwargs)
    b = reference_anchored_ce_jsd(student, teacher, relabelled, ANCHORS, **kwargs)
    assert (
        float(a.ce) == float(b.ce) and float(a.jsd) == float(b.jsd) and a.correct_tokens == b.correct_tokens
    )
    # Every anchor row counts only through the JSD: the total with CE weight 1 equals the domain CE plus it.
    unsplit_ce = masked_ce(student, labels, num_items=8)
    assert float(unsplit_ce) > float(a.ce)  # the unsplit CE would include the anchor rows' tokens


@pytest.mark.parametrize("domain_jsd", [True, False])
def test_fused_terms_and_gradients_match_the_reference(domain_jsd):
    hidden, weight, teacher_hidden, labels = inputs(seed=3)
    hidden = hidden.float().requires_grad_()
    weight = weight.float().requires_grad_()
    teacher_hidden = teacher_hidden.float()
    kwargs = {"beta": 0.1, "temperature": 1.0, "domain_items": 8, "anchor_items": 7, "domain_jsd": domain_jsd}
    fused = fused_anchored_ce_jsd(hidden, weight, labels, ANCHORS, teacher_hidden, chunk_size=5, **kwargs)
    (0.3 * fused.ce + 0.5 * fused.jsd + 2.0 * fused.anchor_jsd).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = reference_anchored_ce_jsd(
        hidden @ weight.T, teacher_hidden @ weight.detach().T, labels, ANCHORS, **kwargs
    )
    (0.3 * reference.ce + 0.5 * reference.jsd + 2.0 * reference.anchor_jsd).backward()
    for got, want in zip(fused[:3], reference[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fused.correct_tokens == reference.correct_tokens
    torch.testing.assert_close(fused_grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_grads[1], weight.grad, rtol=1e-4, atol=1e-6)
    if not domain_jsd:
        assert float(fused.jsd) == 0.0


def test_a_micro_batch_without_anchor_rows_has_a_zero_anchor_term():
    hidden, weight, teacher_hidden, labels = inputs()
    terms = fused_anchored_ce_jsd(
        hidden.float(),
        weight.float(),
        labels,
        None,
        teacher_hidden.float(),
        beta=0.5,
        domain_items=15,
        anchor_items=0,
    )
    assert float(terms.anchor_jsd) == 0.0
    torch.testing.assert_close(
        terms.ce, masked_ce(hidden.float() @ weight.float().T, labels), rtol=1e-5, atol=1e-6
    )
