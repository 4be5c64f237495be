"""Continuing a run from a checkpoint: its folder as it was at the checkpoint, and GKD batches that survive a restart.

Which checkpoint, and the ``training`` keys that make ms-swift write into the checkpoint's own run folder,
come from :mod:`anchorkd.checkpoints`. Two more things make a resume continue the *same* run:

1. **One history.** Whatever the run wrote after the checkpoint's step belongs to a continuation that
   is now redone: :func:`prepare_run_dir` removes the ``logging.jsonl`` and ``alerts.jsonl`` records of
   later steps (and end-of-run summaries), atomically, before training continues, and moves later
   checkpoint folders to ``<run>/superseded/``. The redone steps then append their records, so the log
   holds every step once. (The alert monitor's state is rebuilt from the checkpoint's ``log_history``:
   see ``anchorkd.monitor.callback``.)
2. **The same batches.** ms-swift 4.6.0's GKD trainer samples with TRL's ``RepeatSampler``, which
   shuffles with its own ``torch.Generator``, seeded once when the sampler is built and advanced by one
   permutation per pass. It has no ``set_epoch``: a restarted process starts again from the seed, so
   every epoch after a resume replays the *first* epoch's order (a run resumed at the end of epoch 0
   trains epoch 1 on epoch 0's batches). :class:`EpochSeededSampler` gives the sampler a ``set_epoch``
   that re-seeds it and replays ``epoch`` passes, so epoch ``e`` has the order a straight run gives it.
   HF's ``skip_first_batches`` then skips the batches already trained in that epoch, and HF restores
   the RNG state (so on-policy sampling, ``lmbda > 0``, draws the same completions).
   :class:`ResumableGKDMixin` installs it and also puts ms-swift's generation-buffer counter (``_step``)
   where a straight run would have it.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import swift_seam as seam
from ..checkpoints import LAST_CHECKPOINT_LINK, ResumePlan, checkpoint_step, list_checkpoints
from ..errors import DataError

logger = logging.getLogger("anchorkd")

SUPERSEDED_DIR = "superseded"
LOG_FILES = ("logging.jsonl", "alerts.jsonl")


@dataclass
class RunDirPreparation:
    """What :func:`prepare_run_dir` changed: records dropped per log file, checkpoints moved aside."""

    dropped_records: dict[str, int] = field(default_factory=dict)
    superseded: list[Path] = field(default_factory=list)


def trim_log_after(path: str | Path, step: int) -> tuple[int, int]:
    """Keep the records of a JSONL log (``logging.jsonl``, ``alerts.jsonl``) up to ``step``; atomically.

    Dropped: records of later steps, run summaries (end-of-training records: the run goes on), and a
    last line cut short by a kill. Records without a step are kept. Kept lines are copied byte for byte
    (they are not re-serialised), which is why this does not go through the JSONL reader. Returns
    ``(kept, dropped)``. A malformed line before the last raises :class:`DataError` (``file:line``) and
    changes nothing.
    """
    from ..io import atomic_write_bytes
    from ..monitor.report import RUN_END_MARKERS, parse_step

    path = Path(path)
    if not path.is_file():
        return 0, 0
    lines = path.read_bytes().splitlines(keepends=True)
    kept: list[bytes] = []
    dropped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines) and not line.endswith(b"\n"):
                dropped += 1  # the write a kill interrupted
                continue
            raise DataError(
                str(path), "not a JSON record; cannot trim the log for the resume", number
            ) from None
        if not isinstance(record, dict):
            raise DataError(str(path), "not a JSON object; cannot trim the log for the resume", number)
        record_step, _ = parse_step(record, path, number)
        if any(key in record for key in RUN_END_MARKERS) or (record_step is not None and record_step > step):
            dropped += 1
            continue
        kept.append(line if line.endswith(b"\n") else line + b"\n")
    if dropped:
        atomic_write_bytes(path, b"".join(kept))
    return len(kept), dropped


def _superseded_target(run_dir: Path, name: str) -> Path:
    target = run_dir / SUPERSEDED_DIR / name
    copy = 1
    while target.exists():
        copy += 1
        target = run_dir / SUPERSEDED_DIR / f"{name}.{copy}"
    return target


def prepare_run_dir(plan: ResumePlan) -> RunDirPreparation:
    """Make ``plan.run_dir`` hold the run as it was at ``plan.step``, before training continues.

    Trims ``logging.jsonl`` and ``alerts.jsonl`` (:func:`trim_log_after`), moves every checkpoint folder
    of a later step (complete or half-written) to ``<run>/superseded/`` (kept, not deleted) and points
    ``last-checkpoint`` at the resumed checkpoint. Idempotent. Call it in the one process that writes the
    run's files, before the trainer starts.
    """
    result = RunDirPreparation()
    if not plan.continues_run:
        return result
    run_dir = plan.run_dir
    for name in LOG_FILES:
        kept, dropped = trim_log_after(run_dir / name, plan.step)
        if dropped:
            result.dropped_records[name] = dropped
            logger.info("resume at step %d: dropped %d later record(s) from %s", plan.step, dropped, name)
    for checkpoint in list_checkpoints(run_dir):
        if checkpoint_step(checkpoint) > plan.step:
            target = _superseded_target(run_dir, checkpoint.name)
            target.parent.mkdir(exist_ok=True)
            os.replace(checkpoint, target)
            result.superseded.append(target)
            logger.warning("resume at step %d: moved %s to %s", plan.step, checkpoint.name, target)
    link = run_dir / LAST_CHECKPOINT_LINK
    if link.is_symlink() and link.resolve() != plan.checkpoint.resolve():
        seam.update_last_checkpoint_link(plan.checkpoint)
    return result


# --- GKD: the same batches after a restart -------------------------------------------------------------


class EpochSeededSampler:
    """A shuffling sampler whose epoch ``e`` order depends only on its seed and ``e``.

    Wraps a sampler that shuffles with its own seeded ``generator`` and draws a new order on each pass
    (TRL's ``RepeatSampler``, used by ms-swift's GKD trainer). :meth:`set_epoch` re-seeds that generator
    and replays ``epoch`` passes, so the next pass is the one a straight run makes in that epoch, and a
    straight run's order is unchanged. The generator object itself is kept: accelerate synchronises it
    across ranks. Without a seed (or without shuffling) the order cannot be rebuilt and stays as it is.
    """

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    @property
    def generator(self):
        return seam.sampler_generator(self.sampler)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        seed = seam.sampler_shuffle_seed(self.sampler)
        if seed is None:
            return
        self.generator.manual_seed(seed)
        for _ in range(int(epoch)):
            for _ in self.sampler:  # a whole pass draws exactly what a pass draws, whatever the sampler
                pass


def generation_buffer_position(
    global_step: int, accumulation: int, steps_per_generation: int
) -> tuple[int, bool]:
    """ms-swift's GKD micro-batch counter (``_step``) at ``global_step``, and whether a resume there is exact.

    ``_step`` counts the micro-batches trained: ``global_step * accumulation`` (each epoch of
    ``RepeatSampler`` batches is a whole number of generation buffers). ms-swift refills its buffer of
    ``steps_per_generation`` micro-batches when ``_step % steps_per_generation == 0``; resuming inside a
    buffer rebuilds it from the same data (exact for forward-only KD) but regenerates on-policy samples
    from a later RNG state, so with ``lmbda > 0`` only a resume on a buffer boundary is exact.
    """
    position = int(global_step) * int(accumulation)
    return position, position % max(int(steps_per_generation), 1) == 0


def _gkd_resume_callback(trainer):
    from transformers import TrainerCallback

    trainer_ref = weakref.ref(trainer)

    class GKDResumeAlignment(TrainerCallback):
        """Puts the sampler's epoch and ms-swift's buffer counter where a straight run has them."""

        def on_train_begin(self, args, state, control, **kwargs):
            trainer = trainer_ref()
            if trainer is None or not state.global_step:
                return  # a fresh run starts where ms-swift starts
            steps_per_generation = args.steps_per_generation
            position, exact = generation_buffer_position(
                state.global_step, args.gradient_accumulation_steps, steps_per_generation
            )
            seam.restart_generation_buffer(trainer, position)
            if not exact and trainer.lmbda > 0:
                logger.warning(
                    "resumed at step %d inside a generation buffer (steps_per_generation %d): the on-policy "
                    "samples of the rest of that buffer are drawn again, so they differ from a straight run",
                    state.global_step,
                    steps_per_generation,
                )

        def on_epoch_begin(self, args, state, control, **kwargs):
            trainer = trainer_ref()
            sampler = getattr(trainer, "_anchorkd_epoch_sampler", None)
            if sampler is not None:
                # HF: "the integer part is the number of epochs completed" (exact at epoch starts).
                sampler.set_epoch(int(state.epoch or 0))

    return GKDResumeAlignment()


class ResumableGKDMixin:
    """Mixin for ms-swift's ``GKDTrainer`` (put it before ``GKDTrainer`` in the bases): a resumed run
    trains the batches a straight run trains, with :class:`EpochSeededSampler` and the buffer counter.

    Why a callback and not only the sampler's ``set_epoch``: HF reaches a sampler's ``set_epoch``
    through the dataloader, which does not reach this deep once ``skip_first_batches`` and accelerate's
    per-rank shard both wrap it (a resume inside an epoch under torchrun).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_gkd_resume_callback(self))

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        self._anchorkd_epoch_sampler = EpochSeededSampler(sampler) if sampler is not None else None
        return self._anchorkd_epoch_sampler
