"""``rlhf.offload_teacher_model`` with a separate teacher: the teacher is loaded onto the device for each
of its passes and offloaded after it (ms-swift's mechanism), the fused loss reads a copy of its LM head
made inside the pass, and the losses and gradients equal those of a teacher that stays put."""

from __future__ import annotations

import gkd_harness as h
import pytest
import torch
from pytest import approx

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def separate(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    env = h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())
    trainer = h.visual_build(env).trainer
    assert trainer.teacher_mode == "separate"
    return trainer


def loss_and_grads(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, h.copy_batch(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return float(loss), grads


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_offloaded_teacher_gives_the_same_loss_and_gradients(separate, monkeypatch, impl):
    trainer = separate
    calls: list[str] = []
    original_load, original_offload = trainer.load_model, trainer.offload_model

    def load(model):
        calls.append("load")
        return original_load(model)

    def offload(model):
        calls.append("offload")
        return original_offload(model)

    monkeypatch.setattr(trainer, "load_model", load)
    monkeypatch.setattr(trainer, "offload_model", offload)
    with h.configured(trainer, kd_loss_impl=impl):
        batch = h.prepare(trainer, h.dataset_rows(trainer, [0, 3]))
        kept_loss, kept_grads = loss_and_grads(trainer, batch)
        assert calls == []  # without offloading ms-swift's context does nothing
        with h.configured(trainer, kd_loss_impl=impl, offload_teacher_model=True):
            offloaded_loss, offloaded_grads = loss_and_grads(trainer, batch)
    assert calls == ["load", "offload"]  # on the device exactly for its one pass
    assert offloaded_loss == approx(kept_loss, rel=1e-6)
    assert offloaded_grads.keys() == kept_grads.keys() and kept_grads
    for name, grad in kept_grads.items():
        assert torch.allclose(offloaded_grads[name], grad, rtol=1e-5, atol=1e-8), name
    assert kept_loss > 0


def test_the_fused_loss_reads_the_teacher_head_copied_inside_the_pass(separate, monkeypatch):
    trainer = separate
    copies = []
    original = trainer._teacher_head_copy

    def spy():
        weight, bias = original()
        copies.append(weight)
        return weight, bias

    monkeypatch.setattr(trainer, "_teacher_head_copy", spy)
    with h.configured(trainer, kd_loss_impl="fused", offload_teacher_model=True):
        batch = h.prepare(trainer, h.dataset_rows(trainer, [1]))
        loss_and_grads(trainer, batch)
    teacher_head = trainer.teacher_model.get_output_embeddings().weight
    assert len(copies) == 1
    assert copies[0].data_ptr() != teacher_head.data_ptr() and torch.equal(copies[0], teacher_head)
