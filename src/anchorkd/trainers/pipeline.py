"""Run ms-swift training in-process from an anchorkd config.

We subclass ms-swift's own pipelines (``SwiftSft`` / ``SwiftRLHF``) and change one thing: the trainer
class comes from ``resolve_trainer_cls`` so ``custom.trainer_variant: gkd_monitor`` selects anchorkd's
``GKDTrainerWithMetrics``. Model loading, templates, datasets, LoRA, checkpointing and distributed
launch (``NPROC_PER_NODE``, ``NNODES``, ... via torchrun) are ms-swift's, unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("anchorkd")


def resolve_trainer_cls(train_args):
    """Trainer class for a run: anchorkd's GKD trainer for ``gkd_monitor``, else ms-swift's own."""
    from swift.trainers import TrainerFactory

    custom = getattr(train_args, "anchorkd_custom", None)
    variant = getattr(custom, "trainer_variant", "default")
    if variant == "gkd_monitor" and getattr(train_args, "rlhf_type", None) == "gkd":
        from .gkd_monitor import GKDTrainerWithMetrics

        return GKDTrainerWithMetrics
    return TrainerFactory.get_trainer_cls(train_args)


def build_trainer(pipeline, train_dataset, val_dataset):
    """The trainer ``run`` trains with, on ``pipeline``'s model, template and prepared data sets.

    ms-swift prepares the model (LoRA, freezing) as ``SwiftSft.run`` does; the class comes from
    ``resolve_trainer_cls``. Tests build trainers through this function too, so they exercise exactly
    what a run uses. Sets and returns ``pipeline.trainer``.
    """
    args = pipeline.args
    pipeline.model = pipeline.prepare_model(
        args, pipeline.model, template=pipeline.template, train_dataset=train_dataset
    )
    trainer_cls = resolve_trainer_cls(args)
    logger.info("trainer: %s.%s", trainer_cls.__module__, trainer_cls.__qualname__)
    trainer = trainer_cls(
        model=pipeline.model,
        args=args.training_args,
        template=pipeline.template,
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        **pipeline._get_trainer_kwargs(),
    )
    monitor = getattr(getattr(args, "anchorkd_custom", None), "monitor", None)
    if monitor is not None and monitor.enabled:
        from ..monitor.callback import AlertCallback

        trainer.add_callback(AlertCallback(monitor, args.output_dir))
    pipeline.trainer = trainer
    return trainer


def _pipeline_classes():
    from swift.pipelines.train.rlhf import SwiftRLHF
    from swift.pipelines.train.sft import SwiftSft

    class _AnchorRunMixin:
        """Same steps as ``SwiftSft.run``; the trainer class is ours to choose."""

        def run(self):
            args = self.args
            train_dataset, val_dataset = self._prepare_dataset()
            args.save_args()
            return self.train(build_trainer(self, train_dataset, val_dataset))

    class AnchorSft(_AnchorRunMixin, SwiftSft):
        pass

    class AnchorRLHF(_AnchorRunMixin, SwiftRLHF):
        pass

    return AnchorSft, AnchorRLHF


def build_pipeline(train_args):
    """The ms-swift pipeline object (model, processor and teacher loaded) for ``train_args``."""
    anchor_sft, anchor_rlhf = _pipeline_classes()
    pipeline_cls = anchor_rlhf if hasattr(train_args, "rlhf_type") else anchor_sft
    return pipeline_cls(train_args)


def run_training(config_path: str | Path, overrides=()) -> dict:
    """Validate ``config_path``, write the resolved config, train, and return a summary."""
    from ..config import ConfigLoader
    from .preflight import run_preflight

    config = ConfigLoader.resolve(config_path, overrides)
    if config.mode == "gkd":
        run_preflight(config)  # before anything is written
    train_args = ConfigLoader.build_train_args(config)
    output_dir = Path(train_args.output_dir)
    ConfigLoader.write_resolved(config, output_dir)
    pipeline = build_pipeline(train_args)
    result = pipeline.main()
    trainer = getattr(pipeline, "trainer", None)
    summary = {
        "output_dir": str(output_dir),
        "logging_jsonl": str(output_dir / "logging.jsonl"),
        "last_checkpoint": (result or {}).get("last_model_checkpoint") if isinstance(result, dict) else None,
        "global_step": getattr(getattr(trainer, "state", None), "global_step", None),
        "mode": config.mode,
    }
    return summary
