"""The typed, frozen settings of one training run: built once by ``ConfigLoader``, passed explicitly.

``RunSettings`` holds ms-swift's argument object beside anchorkd's own validated settings
(``AnchorSettings``). The pipeline hands ``AnchorSettings`` to the trainer and the alert callback as
constructor arguments; nothing reads an anchorkd setting back from ms-swift's objects. The values have
their one default in the schema (``schema.py``); the classes here have none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from .schema import AnchorPromptsConfig, CustomConfig, MonitorConfig, VisualKDConfig

if TYPE_CHECKING:
    from .loader import ResolvedConfig

RunMode = Literal["sft", "gkd", "rlhf"]
# none: no teacher; base_anchor: the student with its LoRA adapter switched off; separate: a frozen copy;
# cached: no teacher model, its top-k distributions read from custom.teacher_cache.
TeacherMode = Literal["none", "base_anchor", "separate", "cached"]


class ActiveTerms:
    """Which of anchorkd's KD terms a run trains: the one definition, shared by the two objects that know the
    run mode (``ResolvedConfig`` and ``AnchorSettings``). Each provides ``mode``, ``llm_kd_weight``,
    ``visual_kd`` and ``anchor_prompts``. Before the mode is derived, ``rules.ConfigDraft`` says what the
    config *requests* (``kd_requested``, ``anchor_requested``)."""

    @property
    def lm_kd_active(self) -> bool:
        return self.mode == "gkd" and self.llm_kd_weight > 0

    @property
    def visual_kd_active(self) -> bool:
        return self.mode == "gkd" and self.visual_kd.active

    @property
    def anchor_prompts_active(self) -> bool:
        return self.mode == "gkd" and self.anchor_prompts.active

    @property
    def kd_active(self) -> bool:
        return self.lm_kd_active or self.visual_kd_active or self.anchor_prompts_active


class AnchorSettings(ActiveTerms, BaseModel):
    """anchorkd's knobs for one run, as the trainer, the loss and the monitor read them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: RunMode
    trainer_variant: Literal["default", "gkd_monitor"]
    llm_kd_weight: float
    visual_kd: VisualKDConfig
    kd_loss_impl: Literal["fused", "reference"]
    # None: the fused loss's own chunk size (``anchorkd.losses.fused.DEFAULT_CHUNK_SIZE``).
    kd_chunk_size: int | None
    monitor: MonitorConfig
    teacher_mode: TeacherMode
    # Sequence-level KD: the run trains on the teacher's answers (its data set was rewritten before training).
    seq_kd: bool
    # KD-only anchor prompts (``custom.anchor``); their files hold an answer on every row by training time.
    anchor_prompts: AnchorPromptsConfig
    # The teacher cache folder (``custom.teacher_cache``), or None for a live teacher.
    teacher_cache: str | None

    @classmethod
    def from_config(cls, config: ResolvedConfig, teacher_mode: TeacherMode) -> AnchorSettings:
        custom = config.custom
        return cls(
            mode=config.mode,
            trainer_variant=custom.trainer_variant,
            llm_kd_weight=config.llm_kd_weight,
            visual_kd=custom.visual_kd,
            kd_loss_impl=custom.kd_loss_impl,
            kd_chunk_size=custom.kd_chunk_size,
            monitor=custom.monitor,
            teacher_mode=teacher_mode,
            seq_kd=config.seq_kd,
            anchor_prompts=custom.anchor,
            teacher_cache=custom.teacher_cache if config.mode == "gkd" else None,
        )


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """One validated training run: the resolved config, ms-swift's arguments and anchorkd's settings.

    Unpacks as ``config, train_args`` (the spec-003 contract of ``load_training_config``).
    """

    config: ResolvedConfig
    train_args: Any  # swift.arguments.SftArguments | RLHFArguments
    anchor: AnchorSettings

    def __iter__(self) -> Iterator[Any]:
        yield self.config
        yield self.train_args

    @property
    def mode(self) -> RunMode:
        return self.anchor.mode

    @property
    def output_dir(self) -> Path:
        return Path(self.train_args.output_dir)


def monitor_settings_of_run(resolved_config: Path) -> MonitorConfig:
    """The ``custom.monitor`` thresholds a finished run trained with, read from its resolved config."""
    from .yaml_io import read_yaml_mapping

    custom = read_yaml_mapping(resolved_config).get("custom") or {}
    return CustomConfig.model_validate(custom).monitor
