"""Loss math: reference full-logits JSD / CE and the fused chunked CE + JSD path."""

from .fused import DEFAULT_CHUNK_SIZE, FusedLossOutput, fused_ce_jsd
from .jsd import IGNORE_INDEX, generalized_jsd, generalized_jsd_per_position, masked_ce

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IGNORE_INDEX",
    "FusedLossOutput",
    "fused_ce_jsd",
    "generalized_jsd",
    "generalized_jsd_per_position",
    "masked_ce",
]
