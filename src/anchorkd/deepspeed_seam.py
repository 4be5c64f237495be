"""The one module that touches DeepSpeed ZeRO-3's parameter internals (DeepSpeed 0.19.8).

ZeRO-3 turns every parameter into a shard and hangs its bookkeeping on the tensor (``ds_status``,
``ds_active_sub_modules``) along with the methods that gather and re-partition it (``all_gather``,
``partition``). None of it is a documented API; anchorkd needs it only to give a loss that reads the
LM-head weight after the forward (the fused loss) a full copy (``trainers/sharding.py``). Each use sits
behind a function here, checked against the installed DeepSpeed by
``tests/unit/test_swift_seam_contract.py``. DeepSpeed is imported only when a ZeRO-3 parameter is met.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any


def is_zero3_param(param: Any) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (DeepSpeed's ``zero.Init`` gave it an id and a status)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def is_gathered(param: Any) -> bool:
    """Whether a ZeRO-3 parameter holds its full tensor now (inside its module's forward or backward)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


def gather(param: Any) -> None:
    """Gather a ZeRO-3 parameter's full tensor from every rank's shard (a collective: every rank calls it)."""
    param.all_gather()


def held_by_a_module(param: Any) -> bool:
    """Whether a module that uses the parameter still holds it gathered (ZeRO-3 releases it with that module)."""
    return bool(param.ds_active_sub_modules)


def release(param: Any) -> None:
    """Give a gathered ZeRO-3 parameter's full tensor back, keeping only this rank's shard (unchanged:
    nothing was written to it)."""
    param.partition(has_been_updated=False)


def gathered_for_reading(params: Sequence[Any]) -> AbstractContextManager:
    """DeepSpeed's context that gathers ``params`` for the block, read-only, and re-partitions them after."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
