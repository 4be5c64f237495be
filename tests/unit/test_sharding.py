"""``anchorkd.trainers.sharding``: rank helpers, window tokens over ranks, LM-head gathering (1 process)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from anchorkd.losses.fused import fused_ce_jsd
from anchorkd.trainers import sharding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_launch_rank_reads_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert sharding.launch_rank() == 3
    assert not sharding.is_launch_main_process()
    monkeypatch.delenv("RANK")
    assert sharding.launch_rank() == 0


def test_without_process_group_counts_pass_through():
    assert sharding.global_window_tokens([5, 7]) == [5, 7]
    assert sharding.ddp_loss_scale() == 1


def test_counts_all_reduced_in_group(gloo_group):
    assert sharding.global_window_tokens([5, 0]) == [5, 0]
    assert sharding.ddp_loss_scale() == 1


def test_a_torchrun_worker_releases_its_group_and_a_single_process_keeps_it(monkeypatch):
    assert not sharding.release_process_group()  # no group at all
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        assert not sharding.release_process_group() and dist.is_initialized()
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert sharding.release_process_group() and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_plain_parameter_is_not_copied():
    head = torch.nn.Linear(4, 10, bias=True)
    with sharding.gathered_lm_head(head) as (weight, bias):
        assert weight is head.weight and bias is head.bias


def test_fsdp2_head_gathered_with_gradient_into_shard(gloo_group):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    reference = head.weight.detach().clone().requires_grad_(True)
    hidden, labels = torch.randn(6, 8), torch.randint(0, 50, (6,))
    expected = fused_ce_jsd(
        hidden, reference, labels, beta=0.0, num_items=6, compute_ce=True, compute_jsd=False
    ).ce
    expected.backward()

    fully_shard(head)
    assert sharding.is_sharded(head.weight)
    with sharding.gathered_lm_head(head) as (weight, _):
        assert not sharding.is_sharded(weight) and weight.shape == (50, 8)
        got = fused_ce_jsd(
            hidden, weight, labels, beta=0.0, num_items=6, compute_ce=True, compute_jsd=False
        ).ce
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(head.weight.grad.full_tensor(), reference.grad, rtol=1e-5, atol=1e-7)
