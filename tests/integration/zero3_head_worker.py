"""torchrun worker for ``test_sharded_engines``: the fused loss on a ZeRO-3-partitioned LM head that trains.

Every rank builds the same small "student" (a body and a trainable LM head) and a frozen teacher head, all
partitioned by ``deepspeed.initialize`` (stage 3, gloo, CPU); once with a head of its own, once with the
head tied to an input embedding (as in Qwen3-VL 2B / 4B), whose module also uses it in the backward. Rank ``r`` gets the ``r``-th slice of one
global batch, with a different number of supervised tokens per rank. The loss is computed the way the
KD trainer does it: heads gathered with ``sharding.gathered_params``, tokens counted over all ranks, the
loss multiplied by the number of ranks. The reference is one process holding the whole batch on an
unsharded copy. Rank 0 writes the measured loss, LM-head / body gradients (as ZeRO-3 assembles them from
the partitions) and the weights after one SGD step, compared with the reference's, to ``argv[1]`` as JSON.
"""

from __future__ import annotations

import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from torch import nn

from anchorkd.losses.fused import fused_ce_jsd
from anchorkd.trainers.sharding import ddp_loss_scale, gathered_params, global_window_tokens, is_sharded

VOCAB, HIDDEN, TOKENS = 1000, 16, 24
LR = 0.1
LOSS_KW = {"beta": 0.5, "temperature": 1.0, "chunk_size": 16, "compute_ce": True, "compute_jsd": True}


class Student(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN) if tied else None
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.teacher_head = nn.Linear(HIDDEN, VOCAB, bias=False)  # frozen, partitioned as well
        self.teacher_head.requires_grad_(False)

    def forward(self, x, ids):
        if self.embed is not None:
            x = x + self.embed(ids)
        return torch.tanh(self.body(x))


def batch(world: int):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(world, TOKENS, HIDDEN, generator=generator)
    teacher_hidden = torch.randn(world, TOKENS, HIDDEN, generator=generator)
    ids = torch.randint(0, VOCAB, (world, TOKENS), generator=generator)
    labels = torch.randint(0, VOCAB, (world, TOKENS), generator=generator)
    for rank in range(world):  # rank r supervises TOKENS - 5 r tokens: the ranks' counts differ
        labels[rank, TOKENS - 5 * rank :] = -100
    return hidden, teacher_hidden, ids, labels


def reference(model: Student, hidden, teacher_hidden, ids, labels) -> dict:
    """One process, every rank's samples, normalised by all supervised tokens."""
    out = fused_ce_jsd(
        model(hidden.reshape(-1, HIDDEN), ids.reshape(-1)),
        model.lm_head.weight,
        labels.reshape(-1),
        teacher_hidden.reshape(-1, HIDDEN),
        model.teacher_head.weight,
        num_items=int((labels != -100).sum()),
        **LOSS_KW,
    )
    loss = out.ce + out.jsd
    loss.backward()
    with torch.no_grad():
        stepped = {n: p - LR * p.grad for n, p in model.named_parameters() if p.requires_grad}
        moved = {
            n: (LR * p.grad.norm() / p.norm()).item() for n, p in model.named_parameters() if p.requires_grad
        }
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss.item(), "grads": grads, "stepped": stepped, "moved": moved}


def run(tied: bool, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = Student(tied)
    hidden, teacher_hidden, ids, labels = batch(world)
    ref = reference(copy.deepcopy(model), hidden, teacher_hidden, ids, labels)

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips to 1.0 by default; the reference step does not clip
        # Partition every parameter, however small (the default keeps parameters under 1e5 elements whole).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    module = engine.module
    head, teacher_head = module.lm_head.weight, module.teacher_head.weight
    partitioned = is_sharded(head) and is_sharded(teacher_head) and head.numel() == 0

    student_hidden = engine(hidden[rank], ids[rank])
    (tokens,) = global_window_tokens([int((labels[rank] != -100).sum())])
    with gathered_params([head, teacher_head]) as (full_head, full_teacher_head):
        out = fused_ce_jsd(
            student_hidden,
            full_head,
            labels[rank],
            teacher_hidden[rank],
            full_teacher_head,
            num_items=tokens,
            **LOSS_KW,
        )
    loss = (out.ce + out.jsd) * ddp_loss_scale()
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p) for n, p in module.named_parameters() if p.requires_grad}
    grads = {n: g.detach().clone() for n, g in grads.items()}
    engine.step()
    trainable = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable):
        stepped = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    mean_loss = torch.tensor([loss.item() / world])
    dist.all_reduce(mean_loss)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {
        "partitioned": partitioned,
        "tokens": tokens,
        "loss": mean_loss.item(),
        "reference_loss": ref["loss"],
        "grad_rel": {n: rel(grads[n], ref["grads"][n]) for n in ref["grads"]},
        "step_rel": {n: rel(stepped[n], ref["stepped"][n]) for n in ref["stepped"]},
        "moved": ref["moved"],  # how far the step moves each weight (relative)
    }


def main(out_path: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world_size": world, "own_head": run(False, rank, world), "tied_head": run(True, rank, world)}
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
