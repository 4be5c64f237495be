"""One benchmark run of ``bench/kd_step.py``: one variant, one sequence length, in its own process.

Not meant to be run by hand (``bench/kd_step.py`` writes the config and calls it). It trains for
``--steps`` optimizer steps through the real pipeline and writes one JSON object to ``--out``:

* ``stock_sft`` / ``stock_gkd``: ms-swift's own ``SwiftSft`` / ``SwiftRLHF`` pipelines, which pick
  ms-swift's own trainer classes (``Seq2SeqTrainer`` / ``GKDTrainer``). The arguments are built by
  anchorkd's ``ConfigLoader`` (it only turns the YAML into ms-swift's argument objects).
* ``gkd_*``: ``anchorkd.trainers.pipeline.run_training`` (what ``anchorkd train`` runs), which picks
  ``GKDTrainerWithMetrics`` for ``custom.trainer_variant: gkd_monitor``.

Step time: a ``TrainerCallback`` stamps the wall clock at every ``on_step_end``; step ``k`` lasts from
the end of step ``k-1`` (``on_train_begin`` for the first) to the end of step ``k``, so data loading,
forward, backward, optimizer and the per-step logging all count. The CPU time of the process (all
threads) over the same interval is recorded too: on a shared machine it moves less than wall time. Peak memory: ``ru_maxrss`` of this
process at the end (plus ``torch.cuda.max_memory_allocated`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--config", required=True, type=Path, help="anchorkd YAML for this run")
    parser.add_argument("--stock", action="store_true", help="use ms-swift's own pipeline classes")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _make_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock time of every optimizer step (end of the previous step to end of this one)."""

        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.step_cpu_s: list[float] = []
            self.compute_s: list[float] = []
            self._last_end: float | None = None
            self._last_cpu: float | None = None
            self._begin: float | None = None

        @staticmethod
        def _now() -> float:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self._last_end = self._now()
            self._last_cpu = time.process_time()

        def on_step_begin(self, args, state, control, **kwargs):
            self._begin = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu = self._now(), time.process_time()
            self.step_s.append(now - self._last_end)
            self.step_cpu_s.append(cpu - self._last_cpu)
            self._last_cpu = cpu
            if self._begin is not None:
                self.compute_s.append(now - self._begin)
            self._last_end = now

    return StepTimer()


def _dataset_lengths(dataset) -> dict:
    """Tokens and supervised tokens per encoded training sample, as the trainer will see them."""
    lengths, supervised = [], []
    try:
        for index in range(len(dataset)):
            row = dataset[index]
            lengths.append(len(row["input_ids"]))
            supervised.append(sum(1 for label in row["labels"] if label != -100))
    except Exception as exc:  # the lengths are a cross-check, never a reason to fail a timing run
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"tokens": lengths, "supervised_tokens": supervised}


def _install_hooks(record: dict, timer) -> None:
    """Wrap ms-swift's ``SwiftSft.train`` (used by SFT, RLHF and anchorkd's pipelines alike) so the
    timer is attached to whatever trainer the pipeline built, and the trainer class is recorded."""
    from swift.pipelines.train.sft import SwiftSft

    original_train = SwiftSft.train

    def train(self, trainer):
        trainer.add_callback(timer)
        cls = type(trainer)
        record["trainer"] = f"{cls.__module__}.{cls.__qualname__}"
        record["teacher"] = _describe_teacher(trainer)
        record["dataset"] = _dataset_lengths(trainer.train_dataset)
        return original_train(self, trainer)

    SwiftSft.train = train


def _describe_teacher(trainer) -> str:
    from anchorkd.swift_seam import teacher_is_disabled_adapter

    if getattr(trainer, "teacher_model", None) is not None:
        return "separate"
    if teacher_is_disabled_adapter(trainer):
        return "base_anchor"
    return "cached" if getattr(trainer, "_teacher_cache", None) is not None else "none"


def main(argv=None) -> None:
    args = _parse_args(argv)
    src = str(REPO_ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from anchorkd.offline import configure_network

    configure_network()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    record: dict = {"variant": args.variant, "threads": torch.get_num_threads()}
    timer = _make_timer()
    _install_hooks(record, timer)

    if args.stock:
        from anchorkd.config import ConfigLoader

        loaded = ConfigLoader.load_training_config(args.config)
        train_args = loaded.train_args
        if loaded.config.mode == "gkd":
            from swift.pipelines.train.rlhf import SwiftRLHF as pipeline_cls
        else:
            from swift.pipelines.train.sft import SwiftSft as pipeline_cls
        pipeline_cls(train_args).main()
    else:
        from anchorkd.trainers.pipeline import run_training

        run_training(args.config)

    record.update(
        step_s=timer.step_s,
        step_cpu_s=timer.step_cpu_s,
        compute_s=timer.compute_s,
        peak_rss_mb=_peak_rss_mb(),
        process_s=time.perf_counter() - started,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    if torch.cuda.is_available():
        record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    args.out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
