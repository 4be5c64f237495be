"""Pydantic models for anchorkd's own configuration: the ``custom`` section and anchorkd's ``rlhf`` keys.

ms-swift's own keys are checked against ms-swift's dataclasses (see ``swift_keys``); everything anchorkd
adds is declared here with ``extra="forbid"`` and one validator per rule.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError, ConfigErrors


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_negative_finite_number(value, what: str):
    # bool is an int subclass in Python; "true" as a weight is a typo, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be non-negative, got {value!r}")
    return float(value)


class VisualKDConfig(StrictModel):
    """Feature-level KD on the vision merger / deepstack mergers (spec 004)."""

    enabled: bool = False
    weight: float = 0.0
    targets: list[Literal["merger", "deepstack"]] = Field(default_factory=lambda: ["merger", "deepstack"])
    distance: Literal["mse", "cosine"] = "mse"

    @field_validator("weight", mode="before")
    @classmethod
    def weight_is_non_negative_number(cls, value):
        return _non_negative_finite_number(value, "visual_kd.weight")

    @field_validator("targets")
    @classmethod
    def targets_are_unique_and_present(cls, value):
        if not value:
            raise ValueError("targets must name at least one of: merger, deepstack")
        if len(set(value)) != len(value):
            raise ValueError(f"targets must not repeat a name, got {value}")
        return value

    @model_validator(mode="after")
    def enabled_needs_positive_weight(self):
        if self.enabled and self.weight <= 0:
            raise ValueError("visual_kd.enabled is true but visual_kd.weight is 0: set a weight > 0")
        return self

    @model_validator(mode="after")
    def weight_needs_enabled(self):
        if not self.enabled and self.weight > 0:
            raise ValueError(
                f"visual_kd.weight is {self.weight} but visual_kd.enabled is false: "
                "set enabled: true to use it, or weight: 0 (no silent disablement)"
            )
        return self

    @property
    def active(self) -> bool:
        return self.enabled and self.weight > 0


class AlertConfig(BaseModel):
    """Thresholds of the training alert rules (:mod:`anchorkd.monitor.alerts` says what each rule watches)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kd_spike_factor: float = Field(default=3.0, gt=1.0)
    kd_spike_window: int = Field(default=20, ge=1)
    kd_spike_min_history: int = Field(default=5, ge=1)
    kd_spike_min_threshold: float = Field(default=0.05, ge=0.0)
    sft_regression_window: int = Field(default=20, ge=1)
    sft_regression_tolerance: float = Field(default=0.10, ge=0.0)
    nonfinite: bool = True

    @field_validator("kd_spike_factor", "kd_spike_min_threshold", "sft_regression_tolerance", mode="before")
    @classmethod
    def _threshold_is_finite(cls, value):
        # An infinite threshold is never crossed and NaN compares false: either switches its alert off
        # without a word, which spec 003 forbids.
        try:
            number = float(value)
        except (TypeError, ValueError):
            return value  # not a number: pydantic says so
        if not math.isfinite(number):
            raise ValueError(
                f"must be a finite number, got {value!r}: such a threshold is never crossed, so its alert "
                "would be off. Turn the alerts off with custom.monitor.enabled: false"
            )
        return value

    @model_validator(mode="after")
    def _history_fits_window(self) -> AlertConfig:
        # The running-median window holds at most kd_spike_window values, so a larger minimum history
        # would silently disable the spike rule.
        if self.kd_spike_min_history > self.kd_spike_window:
            raise ValueError(
                f"kd_spike_min_history ({self.kd_spike_min_history}) must not exceed "
                f"kd_spike_window ({self.kd_spike_window})"
            )
        return self


class MonitorConfig(AlertConfig):
    """``custom.monitor``: the live training alerts (written to ``alerts.jsonl``) and their thresholds."""

    enabled: bool = True


class TeacherTargetsConfig(StrictModel):
    """``custom.teacher_targets``: how the teacher writes the training targets of ``rlhf.seq_kd: true``.

    The length limit is ``rlhf.max_completion_length`` (shared with the student's samples, as in TRL). The
    temperature is the teacher's own: ``rlhf.temperature`` also divides the logits inside the JSD, so it
    cannot be 0 (greedy) there.
    """

    # 0: greedy, the same answer for a row every time (what the cache assumes is worth keeping).
    temperature: float = 0.0
    infer_backend: Literal["transformers", "vllm"] = "transformers"
    batch_size: Annotated[int, Field(gt=0)] = 8
    # None: default_teacher_targets_dir(training.output_dir), filled in when the config is resolved.
    cache_dir: str | None = None

    @field_validator("temperature", mode="before")
    @classmethod
    def temperature_is_non_negative_number(cls, value):
        return _non_negative_finite_number(value, "teacher_targets.temperature")


def default_teacher_targets_dir(output_dir: str | None) -> str:
    """``teacher_targets`` in the parent of ``training.output_dir`` as written, so that runs under one output
    root share it; taken before a resume points the output dir at a run's ``v<N>-<time>`` folder. ms-swift's
    own default output dir is under ``output``."""
    root = Path(output_dir).expanduser().parent if output_dir else Path("output")
    return str(root / "teacher_targets")


def anchor_rows_for(domain_rows: int, ratio: float) -> int:
    """Anchor rows to add to ``domain_rows`` data-set rows so that they make ``ratio`` of all the rows
    (rounded to the nearest row, halves up)."""
    return int(math.floor(domain_rows * ratio / (1 - ratio) + 0.5))


class AnchorPromptsConfig(StrictModel):
    """``custom.anchor``: KD-only anchor prompts mixed into every optimizer step (``trainers/anchor_mix.py``).

    Anchor rows train on the KD term alone (no CE), weighted by ``weight``; ``ratio`` is their share of the
    rows of each optimizer step. Rows without an assistant turn are answered by the teacher before training.
    """

    # Local ms-swift JSONL files; empty: no anchor prompts.
    dataset: list[str] = Field(default_factory=list)
    weight: float = 1.0
    ratio: float = 0.25

    @field_validator("weight", mode="before")
    @classmethod
    def weight_is_positive_number(cls, value):
        weight = _non_negative_finite_number(value, "anchor.weight")
        if weight == 0:
            raise ValueError(
                "anchor.weight must be > 0; remove custom.anchor to train without anchor prompts"
            )
        return weight

    @field_validator("ratio", mode="before")
    @classmethod
    def ratio_in_open_unit_interval(cls, value):
        ratio = _non_negative_finite_number(value, "anchor.ratio")
        if not 0 < ratio < 1:
            raise ValueError(
                f"anchor.ratio must be in (0, 1) (the anchor rows' share of a step), got {value!r}"
            )
        return ratio

    @model_validator(mode="after")
    def settings_need_a_dataset(self):
        # An explicit ``dataset: []`` (as a resolved config writes it) turns anchor prompts off.
        if self.model_fields_set and "dataset" not in self.model_fields_set:
            raise ValueError("custom.anchor needs dataset: at least one local .jsonl file of anchor prompts")
        return self

    @property
    def active(self) -> bool:
        return bool(self.dataset)


class CustomConfig(StrictModel):
    """The ``custom`` section: anchorkd's trainer and monitoring knobs."""

    trainer_variant: Literal["default", "gkd_monitor"] = "default"
    visual_kd: VisualKDConfig = Field(default_factory=VisualKDConfig)
    kd_loss_impl: Literal["fused", "reference"] = "fused"
    # None: the fused loss's own default (anchorkd.losses.fused.DEFAULT_CHUNK_SIZE), the one default.
    kd_chunk_size: Annotated[int, Field(gt=0)] | None = None
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    teacher_targets: TeacherTargetsConfig = Field(default_factory=TeacherTargetsConfig)
    anchor: AnchorPromptsConfig = Field(default_factory=AnchorPromptsConfig)
    # A folder written by ``anchorkd teacher-cache``: LM-head KD from the teacher's cached top-k, no teacher
    # loaded (``anchorkd.trainers.teacher_cache``).
    teacher_cache: str | None = None


class AnchorRlhfKnobs(StrictModel):
    """anchorkd's keys inside the ``rlhf`` section (never passed to ms-swift constructors)."""

    llm_kd_weight: float = 1.0
    # Sequence-level KD: train on the teacher's own answers (``anchorkd.trainers.teacher_targets``).
    # ms-swift 4.6.0 raises NotImplementedError for its own seq_kd, so it never sees this value.
    seq_kd: StrictBool = False

    @field_validator("llm_kd_weight", mode="before")
    @classmethod
    def weight_is_non_negative_number(cls, value):
        return _non_negative_finite_number(value, "llm_kd_weight")


def validate_model(model_cls: type[StrictModel], data, section: str, source: str | None = None):
    """Validate ``data`` with ``model_cls``; turn pydantic errors into ConfigErrors with key paths."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(section, f"must be a mapping, got {type(data).__name__}", source)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in (section, *err["loc"]))
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown key; valid keys here: {', '.join(_valid_keys(model_cls, err['loc']))}"
            errors.append(ConfigError(loc, message, source))
        raise ConfigErrors(errors) from None


def _valid_keys(model_cls: type[BaseModel], loc) -> list[str]:
    node = model_cls
    for part in loc[:-1]:
        field = node.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        node = annotation
    return sorted(node.model_fields)
