"""One short 2-rank gloo run that ends the way ``anchorkd train`` ends a torchrun worker (see test_teardown.py).

The run's DDP wrapper and optimizer sit in a reference cycle, as a trainer, its callbacks and the accelerator
make them, so reference counting alone never frees them; a few steps leave the DDP reducer's and an async
all-reduce's buffers with the Gloo group. Then ``release_process_group`` and a normal interpreter exit. Writes
``{"released": ..., "wrappers_alive": ...}`` for its rank to ``argv[1]``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from anchorkd.trainers.sharding import live_data_parallel_wrappers, release_process_group


class _Run:
    """Stands in for a finished trainer: it holds the model and refers to itself through a callback."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(32, 32)))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.callbacks = [self.on_step]

    def on_step(self) -> None:
        pass

    def train(self, steps: int) -> torch.distributed.Work:
        for _ in range(steps):
            self.model(torch.randn(4, 32)).pow(2).mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        return dist.all_reduce(torch.ones(8), async_op=True)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    run = _Run()
    run.train(steps=3).wait()
    del run  # the cycle remains; only a collection frees it
    released = release_process_group()
    report = {"released": released, "wrappers_alive": live_data_parallel_wrappers()}
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])
