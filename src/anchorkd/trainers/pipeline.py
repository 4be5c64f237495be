"""Run ms-swift training in-process from validated ``RunSettings``.

ms-swift's own pipelines (``SwiftSft`` / ``SwiftRLHF``) run unchanged; anchorkd plugs in through their
extension points: the trainer class is registered in ms-swift's trainer table for the run
(``resolve_trainer_cls``), ``_get_trainer_kwargs`` hands the trainer its ``AnchorSettings`` (and the
anchor prompts of ``custom.anchor``, loaded by ms-swift's data loader), and
``train`` installs anchorkd's callbacks (live alerts, precise telemetry) before training starts. Model
loading, templates, datasets, LoRA, checkpointing and distributed launch are ms-swift's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .. import swift_seam as seam
from ..config.loader import ResolvedConfig
from ..config.settings import RunSettings
from .sharding import is_launch_main_process

logger = logging.getLogger("anchorkd")


def resolve_trainer_cls(settings: RunSettings) -> type:
    """Trainer class for a run: anchorkd's GKD trainer for ``gkd_monitor`` GKD runs, ms-swift's GKD trainer
    with anchorkd's resume fix for other GKD runs, else ms-swift's own class."""
    if settings.mode == "gkd":
        if settings.anchor.trainer_variant == "gkd_monitor":
            from .gkd_monitor import GKDTrainerWithMetrics

            return GKDTrainerWithMetrics
        from .resume import ResumableGKDTrainer  # ms-swift's GKD, resuming on the right batch

        return ResumableGKDTrainer
    return seam.stock_trainer_cls(settings.train_args)


def _install_callbacks(trainer, settings: RunSettings) -> None:
    from ..monitor.terms import is_precise_term, logged_value

    precise_cls, stock_cls = seam.precise_progress_callback(is_precise_term, logged_value)
    seam.replace_progress_callback(trainer, precise_cls, stock_cls)
    monitor = settings.anchor.monitor
    if monitor.enabled:
        from ..monitor.callback import AlertCallback

        trainer.add_callback(AlertCallback(monitor, settings.output_dir))


def _pipeline_classes():
    swift_sft, swift_rlhf = seam.pipeline_classes()

    class _AnchorPipelineMixin:
        """ms-swift's ``run`` with anchorkd's trainer class, settings and callbacks."""

        run_settings: RunSettings
        trainer = None
        _train_after_build = True

        def run(self):
            self._trainer_cls = resolve_trainer_cls(self.run_settings)
            logger.info("trainer: %s.%s", self._trainer_cls.__module__, self._trainer_cls.__qualname__)
            with seam.trainer_class_registered(self.args, self._trainer_cls):
                return super().run()

        def _get_trainer_kwargs(self):
            kwargs = super()._get_trainer_kwargs()
            from .gkd_monitor import GKDTrainerWithMetrics

            if issubclass(self._trainer_cls, GKDTrainerWithMetrics):
                anchor = self.run_settings.anchor
                kwargs["anchor_settings"] = anchor
                if anchor.anchor_prompts_active:
                    # Loaded like data.dataset (ms-swift's row format), drawn by the trainer itself.
                    kwargs["anchor_rows"] = seam.load_rows(self.args, anchor.anchor_prompts.dataset)
            return kwargs

        def train(self, trainer):
            _install_callbacks(trainer, self.run_settings)
            self.trainer = trainer
            if not self._train_after_build:
                return trainer
            return super().train(trainer)

        def build_trainer(self):
            """The trainer a run would train with (model prepared, data sets encoded), untrained."""
            self._train_after_build = False
            try:
                return self.run()
            finally:
                self._train_after_build = True

    class AnchorSft(_AnchorPipelineMixin, swift_sft):
        pass

    class AnchorRLHF(_AnchorPipelineMixin, swift_rlhf):
        pass

    return AnchorSft, AnchorRLHF


def build_pipeline(settings: RunSettings):
    """The ms-swift pipeline object (model, processor and teacher loaded) for ``settings``."""
    anchor_sft, anchor_rlhf = _pipeline_classes()
    pipeline_cls = anchor_rlhf if settings.mode in ("gkd", "rlhf") else anchor_sft
    pipeline = pipeline_cls(settings.train_args)
    pipeline.run_settings = settings
    return pipeline


def settings_for_run(config: ResolvedConfig, *, writer: bool | None = None) -> RunSettings:
    """ms-swift's arguments and anchorkd's settings for a checked config. With ``rlhf.seq_kd: true`` the
    data set is first rewritten with the teacher's answers (made by the writer rank, or read from the cache),
    so ms-swift trains on those; anchor prompts without an answer get the teacher's the same way."""
    from ..config import ConfigLoader
    from .teacher_targets import with_teacher_targets

    if config.seq_kd or config.anchor_prompts_active:
        # ms-swift's own argument checks (those anchorkd does not repeat) on the config as written, before
        # the teacher loads and answers: a run ms-swift would refuse writes no teacher-answer cache.
        ConfigLoader.build_settings(config, create_output_dir=False)
    trained = with_teacher_targets(config, writer=is_launch_main_process() if writer is None else writer)
    return ConfigLoader.build_settings(trained)


def run_training(config_path: str | Path, overrides=()) -> dict:
    """Check ``config_path`` completely, write the resolved config, train, and return a summary."""
    from ..checkpoints import resume_plan
    from ..checks import check_run
    from ..config import ConfigLoader
    from .resume import prepare_run_dir

    config = check_run(config_path, overrides)  # every rule, data line and checkpoint: before any write
    resume = resume_plan(config)
    settings = settings_for_run(config)
    output_dir = settings.output_dir
    if is_launch_main_process():
        if resume is not None:
            prepare_run_dir(resume)
        ConfigLoader.write_resolved(config, output_dir)
    pipeline = build_pipeline(settings)
    result = pipeline.main()
    trainer = pipeline.trainer
    return {
        "output_dir": str(output_dir),
        "logging_jsonl": str(output_dir / "logging.jsonl"),
        "last_checkpoint": (result or {}).get("last_model_checkpoint") if isinstance(result, dict) else None,
        "global_step": trainer.state.global_step if trainer is not None else None,
        "mode": settings.mode,
    }
