"""Data-parallel and sharded-engine helpers for the KD trainer: token counts over ranks, loss scale, LM heads.

Every data-parallel engine (DDP, DeepSpeed ZeRO-1/2/3, FSDP2) averages gradients over ranks. A token
term normalised by the supervised tokens of the whole window *over all ranks* and multiplied by the
number of ranks therefore gives, after that average, exactly the gradient of one process holding every
rank's samples: ``mean_r(W * sum_r / N) = sum_all / N`` (HF does the same with ``num_items_in_batch`` when
``average_tokens_across_devices`` is on).

Under ZeRO-3 and FSDP full-shard a parameter holds only this rank's shard outside its module's forward;
a loss that reads the LM-head weight after the forward (the fused loss) must gather it first.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .. import deepspeed_seam as zero3
from .. import swift_seam as seam
from ..waits import collective_limit_s, wait_for_collective

logger = logging.getLogger("anchorkd")


def launch_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside torchrun).

    Usable before the process group exists, e.g. to let one rank write a run-level file.
    """
    return int(os.environ.get("RANK", "0"))


def is_launch_main_process() -> bool:
    return launch_rank() == 0


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def data_parallel_size() -> int:
    """Number of ranks whose gradients the engine averages (1 without a process group)."""
    return torch.distributed.get_world_size() if _distributed() else 1


def global_window_tokens(counts: Sequence[int], device: torch.device | str = "cpu") -> list[int]:
    """``counts`` summed over all ranks (one collective; every rank must call it with as many counts)."""
    if not _distributed():
        return [int(c) for c in counts]
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    totals = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=device)
    bounded_all_reduce(totals, "the accumulation window's token counts")
    return [int(t) for t in totals.tolist()]


def bounded_all_reduce(tensor: torch.Tensor, what: str) -> None:
    """Sum ``tensor`` over all ranks in place, waiting at most ``ANCHORKD_COLLECTIVE_LIMIT_S`` for the others.

    The process group's own timeout does not bound it: ms-swift's ``ddp_timeout`` default is 18000000 s
    (208 days). On running out, the error names ``what`` was summed and where the ranks' output is.
    """
    limit = collective_limit_s()
    work = torch.distributed.all_reduce(tensor, async_op=True)
    wait_for_collective(
        work,
        what=f"{what} (an all-reduce over {torch.distributed.get_world_size()} ranks)",
        limit_s=limit,
    )


def release_process_group() -> bool:
    """Tear down a finished torchrun worker's process group (``WORLD_SIZE`` > 1) while Python is whole; True if
    there was one. A single process (tests, the demo) keeps its group.

    Why: a finished run's trainer, DDP wrapper and optimizer sit in reference cycles (trainer, callbacks,
    accelerator, model), so reference counting never frees them; left alone, they are collected during
    interpreter finalisation. Then the DDP reducer drops the last reference to the Gloo group there, and a
    Gloo worker thread that frees a tensor owned by Python needs the GIL of an interpreter that is going
    away: CPython ends such a thread with a forced unwind, which hits a ``noexcept`` C++ frame and the
    process dies with SIGABRT ("terminate called without an active exception") after training finished.
    ``destroy_process_group`` alone does not prevent it: it only forgets the group, which the reducer keeps
    alive. So: collect the cycles first (the group's only owner left is torch's registry), destroy the group
    (its threads are joined now), and warn if a DDP wrapper is still alive, since that would mean someone
    still holds the run's model.

    Call it only after a successful run: on an error other ranks may still be in a collective, and a
    collective destroy would hang them.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not _distributed():
        return False
    gc.collect()
    torch.distributed.destroy_process_group()
    survivors = live_data_parallel_wrappers()
    if survivors:
        logger.warning(
            "anchorkd: %d DistributedDataParallel wrapper(s) still alive after the run; the process group "
            "they hold is freed only at interpreter exit",
            survivors,
        )
    return True


def live_data_parallel_wrappers() -> int:
    """How many ``DistributedDataParallel`` modules are alive after a full collection (each owns a reference
    to its process group)."""
    gc.collect()
    wrapper = torch.nn.parallel.DistributedDataParallel
    return sum(1 for obj in gc.get_objects() if isinstance(obj, wrapper))


def ddp_loss_scale() -> int:
    """Factor for a loss normalised by the window's tokens over all ranks: undoes the engine's mean."""
    return data_parallel_size()


# --- sharded parameters --------------------------------------------------------------------------------


def _is_dtensor(param: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(param, DTensor)


def is_sharded(param: torch.Tensor | None) -> bool:
    """True when ``param`` holds only a shard outside its module's forward (ZeRO-3 or FSDP2)."""
    return param is not None and (zero3.is_zero3_param(param) or _is_dtensor(param))


class _Zero3Full(torch.autograd.Function):
    """A full copy of a ZeRO-3 parameter that stays valid after the engine re-partitions it.

    The fused loss reads the weight again in its backward, when ZeRO-3 has long released the gathered
    parameter, so it gets a copy. Its gradient must still reach the parameter, where ZeRO-3's gradient hook
    reduce-scatters it into this rank's partition as for any module parameter. But by then the parameter
    holds an empty tensor, and autograd would copy the full gradient into a gradient shaped like it (a size
    error): so the backward gathers the parameter again, and a hook that runs after ZeRO-3's own (which has
    taken the gradient for reduction by then) partitions it once the gradient is in.
    """

    @staticmethod
    def forward(ctx, param):
        ctx.param = param
        return param.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        _gather_for_accumulation(ctx.param)
        return grad


_REGATHERED = "_anchorkd_regathered"


def _gather_for_accumulation(param: torch.Tensor) -> None:
    if zero3.is_gathered(param):  # the module's own backward has gathered it
        return
    if not hasattr(param, _REGATHERED):
        param.register_post_accumulate_grad_hook(_partition_regathered)
    setattr(param, _REGATHERED, True)
    zero3.gather(param)


def _partition_regathered(param: torch.Tensor) -> None:
    if getattr(param, _REGATHERED, False):
        setattr(param, _REGATHERED, False)
        # A module that also uses the parameter (an input embedding tied to the head) may still hold it for
        # its backward; ZeRO-3 releases it with that module then.
        if not zero3.held_by_a_module(param):
            zero3.release(param)


def _full(param: torch.Tensor) -> torch.Tensor:
    """Full tensor of a plain, ZeRO-3 (must be gathered by the caller) or FSDP2 parameter."""
    if _is_dtensor(param):
        from torch.distributed.tensor import Partial

        # The gradient of a full tensor differs per rank (different data): reduce it back into the shard as
        # a mean over ranks, the way FSDP2 reduces every other gradient.
        placements = [Partial("avg")] * param.device_mesh.ndim
        return param.full_tensor(grad_placements=placements)
    if zero3.is_zero3_param(param):
        return _Zero3Full.apply(param) if param.requires_grad else param.detach().clone()
    return param


@contextlib.contextmanager
def gathered_params(params: Sequence[torch.Tensor | None]) -> Iterator[list[torch.Tensor | None]]:
    """Yields full tensors for ``params`` (``None`` passes through); a gradient on a yielded tensor reaches
    the parameter (its shard) when the parameter trains.

    - plain parameters (DDP, ZeRO-0/1/2, one process): yielded as they are, nothing is gathered;
    - ZeRO-3: gathered with ``deepspeed.zero.GatheredParameters(modifier_rank=None)`` (read-only) and copied,
      because a loss that reads the weight in its backward runs after ZeRO-3 re-partitioned it;
    - FSDP2 (DTensor): ``full_tensor()``, a differentiable all-gather whose backward reduce-scatters the
      gradient into the shard.
    """
    zero3_params = [p for p in params if p is not None and zero3.is_zero3_param(p)]
    with contextlib.ExitStack() as stack:
        if zero3_params:
            stack.enter_context(zero3.gathered_for_reading(zero3_params))
        by_id: dict[int, torch.Tensor] = {}  # one copy when student and teacher share the head
        for p in params:
            if p is not None and id(p) not in by_id:
                by_id[id(p)] = _full(p)
        full = [None if p is None else by_id[id(p)] for p in params]
        stack.close()
        yield full


def lm_head_params(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) parameters of an LM head (a Linear, or a PEFT wrapper around one, whose base is read)."""
    base = seam.peft_base_layer(head)
    return base.weight, getattr(base, "bias", None)


@contextlib.contextmanager
def gathered_lm_head(head: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of ``head`` as full tensors for the duration of the block (see ``gathered_params``)."""
    weight, bias = lm_head_params(head)
    with gathered_params([weight, bias]) as (full_weight, full_bias):
        yield full_weight, full_bias
