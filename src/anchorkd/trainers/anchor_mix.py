"""Which anchor prompts (``custom.anchor``) go into which generation buffer: seeded, deterministic, resumable.

ms-swift's GKD trainer builds a buffer of ``steps_per_generation`` micro-batches from one dataloader batch
(``per_device_train_batch_size x steps_per_generation`` data-set rows per rank; with the default
``steps_per_generation = gradient_accumulation_steps`` one buffer is one optimizer step). The trainer adds
``AnchorMixer.per_buffer`` anchor rows to each buffer, spread over its micro-batches.

The anchor rows form an endless stream of passes over the anchor set, each pass a permutation seeded by
``(seed, pass)``: every anchor row is used once per pass. Buffer ``b`` of rank ``r`` (of ``R``) takes the
stream positions ``[(b * R + r) * k, (b * R + r + 1) * k)`` with ``k = per_buffer``, so the rows a buffer
gets depend only on the seed and the buffer's index. A resumed run, whose buffer counter is put back
where a straight run has it (``trainers.resume``), therefore draws the same anchor rows as a straight run,
and ranks never draw the same position.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..config.schema import anchor_rows_for
from ..errors import ConfigError


def spread(count: int, parts: int) -> list[int]:
    """``count`` items over ``parts`` micro-batches as evenly as possible (earlier ones take the remainder)."""
    base, extra = divmod(count, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class AnchorMixer:
    """Anchor-row indices per generation buffer (see the module doc)."""

    def __init__(self, num_rows: int, per_buffer: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_rows < 1:
            raise ValueError("the anchor set holds no rows")
        if per_buffer < 1:
            raise ValueError(f"per_buffer must be >= 1, got {per_buffer}")
        self.num_rows, self.per_buffer, self.seed = num_rows, per_buffer, seed
        self.rank, self.world_size = rank, world_size
        self._pass: tuple[int, list[int]] | None = None

    @classmethod
    def for_step(
        cls, num_rows: int, ratio: float, rows_per_buffer: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> AnchorMixer:
        """The mixer that makes anchor rows ``ratio`` of a buffer of ``rows_per_buffer`` data-set rows
        (rounded to the nearest row); a ConfigError when that rounds to no row at all."""
        per_buffer = anchor_rows_for(rows_per_buffer, ratio)
        if per_buffer < 1:
            raise ConfigError(
                "custom.anchor.ratio",
                f"{ratio} of a step of {rows_per_buffer} data-set rows per rank rounds to no anchor row: raise "
                "the ratio, training.per_device_train_batch_size or training.gradient_accumulation_steps",
            )
        return cls(num_rows, per_buffer, seed, rank, world_size)

    def permutation(self, pass_index: int) -> list[int]:
        """The order of the anchor set in pass ``pass_index`` of the stream."""
        if self._pass is None or self._pass[0] != pass_index:
            order = list(range(self.num_rows))
            random.Random(f"anchorkd-anchor:{self.seed}:{pass_index}").shuffle(order)
            self._pass = (pass_index, order)
        return self._pass[1]

    def index_at(self, position: int) -> int:
        pass_index, offset = divmod(position, self.num_rows)
        return self.permutation(pass_index)[offset]

    def draw(self, buffer_index: int) -> list[int]:
        """The anchor rows of this rank's buffer ``buffer_index`` (0 for the run's first buffer)."""
        start = (buffer_index * self.world_size + self.rank) * self.per_buffer
        return [self.index_at(start + j) for j in range(self.per_buffer)]

    def share(self, rows_per_buffer: int) -> float:
        """The anchor rows' actual share of a buffer of ``rows_per_buffer`` data-set rows."""
        return self.per_buffer / (self.per_buffer + rows_per_buffer)


def interleave(domain_chunks: Sequence[list], anchors: list) -> tuple[list[list], list[list[bool]]]:
    """Micro-batches of ``domain_chunks[i]`` followed by their share of ``anchors`` (see :func:`spread`), and
    each micro-batch's per-row anchor flags."""
    chunks, flags, start = [], [], 0
    for domain, count in zip(domain_chunks, spread(len(anchors), len(domain_chunks)), strict=True):
        chunks.append([*domain, *anchors[start : start + count]])
        flags.append([False] * len(domain) + [True] * count)
        start += count
    return chunks, flags
