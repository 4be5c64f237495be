"""``anchorkd train`` with one extra trainer callback that holds the run at a known point until it is killed.

Usage: ``python kill_point_worker.py MARKER STEP <anchorkd train arguments>``. When step ``STEP + 1`` is about to
begin (steps 1..STEP done, their records logged, their checkpoints saved), the callback writes ``MARKER`` and
sleeps: the test's SIGKILL then lands at that point on any machine, however loaded, instead of somewhere in a
polling window.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import swift.trainers.patcher  # noqa: F401 - ms-swift replaces transformers' DEFAULT_CALLBACKS on import
import transformers.trainer as hf_trainer
from transformers import TrainerCallback


def hold_at(marker: Path, step: int) -> type[TrainerCallback]:
    class HoldForKill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                marker.write_text(str(step))
                while True:
                    time.sleep(3600)

    return HoldForKill


if __name__ == "__main__":
    marker, step, *train_args = sys.argv[1:]
    # Trainer builds its callbacks from this module-level list (as ms-swift left it), so the run's trainer
    # gets the hold.
    hf_trainer.DEFAULT_CALLBACKS.append(hold_at(Path(marker), int(step)))
    from anchorkd.cli import main

    sys.exit(main(["train", *train_args]))
