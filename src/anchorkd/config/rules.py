"""Every rule a config must pass, checked before any model is loaded or any file is written.

One function per rule; each raises ``ConfigError`` with the key path it is about (the loader adds
where the value came from: a file, or the command line). ``RULES`` is the complete list that both
``anchorkd validate`` and ``anchorkd train`` run; the data files and checkpoints are checked after
them (``anchorkd.checks``). Field-level rules of anchorkd's own keys (types, ``weight >= 0``, ...)
are validators of the pydantic schema in ``schema.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from ..swift_seam import infer_backend_installed
from .schema import AnchorRlhfKnobs, CustomConfig, anchor_rows_for
from .swift_keys import ANCHORKD_RLHF_KEYS, default_value


@dataclasses.dataclass(frozen=True)
class LaunchEnvironment:
    """Where the run is launched: processes (torchrun's WORLD_SIZE) and whether a GPU is there."""

    world_size: int = 1
    has_accelerator: bool = True

    @classmethod
    def detect(cls) -> LaunchEnvironment:
        """torchrun's WORLD_SIZE in a worker; before the relaunch (ms-swift's NPROC_PER_NODE / NNODES set, no
        worker yet), the processes that relaunch will start, so that the launching process checks the run
        the workers will make."""
        import os

        import torch

        world_size = os.environ.get("WORLD_SIZE")
        if world_size is None and (os.environ.get("NPROC_PER_NODE") or os.environ.get("NNODES")):
            per_node = int(os.environ.get("NPROC_PER_NODE") or 1)
            world_size = per_node * int(os.environ.get("NNODES") or 1)
        return cls(int(world_size or 1), torch.cuda.is_available())

    @property
    def cpu_data_parallel(self) -> bool:
        return self.world_size > 1 and not self.has_accelerator


@dataclasses.dataclass(frozen=True)
class ConfigDraft:
    """The config as written (sections, anchorkd's validated knobs), before the run mode is derived."""

    sections: dict[str, dict]
    custom: CustomConfig
    knobs: AnchorRlhfKnobs
    launch: LaunchEnvironment = LaunchEnvironment()

    @property
    def rlhf(self) -> dict:
        return self.sections["rlhf"]

    @property
    def is_gkd(self) -> bool:
        return self.rlhf.get("rlhf_type") == "gkd"

    @property
    def anchor_requested(self) -> bool:
        return self.custom.anchor.active

    @property
    def kd_requested(self) -> bool:
        return self.knobs.llm_kd_weight > 0 or self.custom.visual_kd.weight > 0 or self.anchor_requested

    @property
    def teacher_writes_targets(self) -> bool:
        """Whether the teacher generates answers before training (seq_kd, or anchor rows without one)."""
        return self.knobs.seq_kd or (self.is_gkd and self.anchor_requested)

    @property
    def uses_gkd_monitor(self) -> bool:
        return self.custom.trainer_variant == "gkd_monitor"


Rule = Callable[[ConfigDraft], None]


# --- numeric ranges of ms-swift keys -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NumericRange:
    """``section.key`` must satisfy ``holds``; ``rule`` says how in words. Absent keys take ms-swift's default."""

    key_path: str
    holds: Callable[[float], bool]
    rule: str

    def check(self, draft: ConfigDraft) -> None:
        section, key = self.key_path.split(".")
        value = draft.sections[section].get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return  # absent (ms-swift's default), or a type error reported by the key checks
        if not math.isfinite(value) or not self.holds(value):
            raise ConfigError(self.key_path, f"must be {self.rule}, got {value!r}")


def _positive(value: float) -> bool:
    return value > 0


def _at_least_one(value: float) -> bool:
    return value >= 1


def _non_negative(value: float) -> bool:
    return value >= 0


def _unit_interval(value: float) -> bool:
    return 0 <= value <= 1


NUMERIC_RANGES = (
    # A negative sft_alpha flips the CE term's sign: training would maximise the data's loss.
    NumericRange("rlhf.sft_alpha", _non_negative, ">= 0"),
    NumericRange("rlhf.beta", _unit_interval, "in [0, 1] (the generalised JSD's interpolation)"),
    NumericRange("rlhf.lmbda", _unit_interval, "in [0, 1] (the probability of on-policy samples)"),
    NumericRange("rlhf.temperature", _positive, "> 0 (it divides the logits)"),
    NumericRange("training.temperature", _positive, "> 0 (it divides the logits)"),
    NumericRange("rlhf.max_completion_length", _at_least_one, ">= 1"),
    NumericRange("tuner.lora_rank", _at_least_one, ">= 1"),
    NumericRange("tuner.lora_alpha", _positive, "> 0"),
    NumericRange("tuner.lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    NumericRange("training.learning_rate", _positive, "> 0"),
    NumericRange("tuner.vit_lr", _positive, "> 0"),
    NumericRange("tuner.aligner_lr", _positive, "> 0"),
    NumericRange("training.per_device_train_batch_size", _at_least_one, ">= 1"),
    NumericRange("training.per_device_eval_batch_size", _at_least_one, ">= 1"),
    NumericRange("training.gradient_accumulation_steps", _at_least_one, ">= 1"),
    NumericRange("training.num_train_epochs", _positive, "> 0"),
    NumericRange("training.max_steps", lambda v: v == -1 or v >= 1, ">= 1 (or -1: use num_train_epochs)"),
    NumericRange("training.warmup_ratio", _unit_interval, "in [0, 1]"),
    # The optimiser's own knobs: torch checks them only when the optimiser is built (after the model loads),
    # and a NaN passes its checks and turns every weight into NaN at the first step.
    NumericRange(
        "training.adam_epsilon", _positive, "> 0 (it keeps Adam's step finite where a gradient is 0)"
    ),
    NumericRange("training.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    NumericRange("training.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    NumericRange("training.weight_decay", _non_negative, ">= 0"),
    NumericRange("training.max_grad_norm", _non_negative, ">= 0 (0: no clipping)"),
    NumericRange("training.logging_steps", _positive, "> 0"),
    NumericRange("training.save_steps", _positive, "> 0"),
    NumericRange("training.eval_steps", _positive, "> 0"),
    NumericRange("template.max_length", _at_least_one, ">= 1"),
    NumericRange("template.max_pixels", _at_least_one, ">= 1 (pixels of an image after resizing)"),
    NumericRange("rlhf.steps_per_generation", _at_least_one, ">= 1"),
    NumericRange("rlhf.generation_batch_size", _at_least_one, ">= 1"),
)


def rule_numeric_ranges(draft: ConfigDraft) -> None:
    errors = []
    for numeric in NUMERIC_RANGES:
        try:
            numeric.check(draft)
        except ConfigError as err:
            errors.append(err)
    if errors:
        raise _many(errors)


# --- which trainer and which run ---------------------------------------------------------------------


def rule_rlhf_keys_need_rlhf_type(draft: ConfigDraft) -> None:
    stray = [k for k in draft.rlhf if k not in ANCHORKD_RLHF_KEYS and k != "rlhf_type"]
    if stray and not draft.rlhf.get("rlhf_type"):
        raise ConfigError(f"rlhf.{stray[0]}", "needs rlhf.rlhf_type (e.g. rlhf_type: gkd)")


def rule_llm_kd_weight_needs_gkd(draft: ConfigDraft) -> None:
    """Spec 003 allows no silent disablement: a KD weight on a run that has no KD is a mistake."""
    if "llm_kd_weight" in draft.knobs.model_fields_set and not draft.is_gkd:
        raise ConfigError(
            "rlhf.llm_kd_weight",
            "only GKD runs have an LM-head KD term: set rlhf.rlhf_type: gkd (with a teacher), "
            "or remove the key",
        )


def rule_gkd_monitor_needs_gkd(draft: ConfigDraft) -> None:
    if draft.uses_gkd_monitor and not draft.is_gkd:
        raise ConfigError("custom.trainer_variant", "gkd_monitor requires rlhf.rlhf_type: gkd")


def rule_kd_weight_needs_gkd_monitor(draft: ConfigDraft) -> None:
    weight = draft.knobs.llm_kd_weight
    if draft.is_gkd and not draft.uses_gkd_monitor and weight != 1.0:
        raise ConfigError(
            "rlhf.llm_kd_weight",
            f"is {weight}, but ms-swift's own GKD trainer (custom.trainer_variant: default) always "
            "weighs the KD term by 1.0: set custom.trainer_variant: gkd_monitor",
        )


def rule_visual_kd_needs_gkd_monitor(draft: ConfigDraft) -> None:
    if draft.custom.visual_kd.enabled and not (draft.uses_gkd_monitor and draft.is_gkd):
        raise ConfigError(
            "custom.visual_kd.enabled",
            "visual KD runs in anchorkd's trainer: set custom.trainer_variant: gkd_monitor and rlhf.rlhf_type: gkd",
        )


def rule_teacher_required_for_kd(draft: ConfigDraft) -> None:
    if not draft.is_gkd or not draft.kd_requested:
        return
    if not draft.rlhf.get("teacher_model") and not draft.rlhf.get("teacher_model_server"):
        if draft.knobs.llm_kd_weight > 0:
            which = "rlhf.llm_kd_weight > 0"
        elif draft.custom.visual_kd.weight > 0:
            which = "custom.visual_kd.weight > 0"
        else:
            which = "custom.anchor.dataset is set (anchor rows train on the teacher's distribution)"
        raise ConfigError(
            "rlhf.teacher_model",
            f"required when {which}: give the frozen teacher checkpoint "
            "(the base model's path for KL-anchored SFT)",
        )


def rule_visual_kd_needs_trainable_vision(draft: ConfigDraft) -> None:
    if not draft.custom.visual_kd.enabled:
        return
    tuner = draft.sections["tuner"]
    # ms-swift freezes both by default for multimodal models.
    if tuner.get("freeze_vit", True) and tuner.get("freeze_aligner", True):
        raise ConfigError(
            "custom.visual_kd",
            "the vision tower and aligner are both frozen (tuner.freeze_vit / tuner.freeze_aligner, "
            "true by default), so the merger features never move and the visual KD term would be "
            "identically zero: set tuner.freeze_aligner: false (or freeze_vit: false)",
        )


# --- sequence-level KD (rlhf.seq_kd: true) --------------------------------------------------------------


def rule_seq_kd_needs_gkd(draft: ConfigDraft) -> None:
    if draft.knobs.seq_kd and not draft.is_gkd:
        raise ConfigError(
            "rlhf.seq_kd",
            "the teacher's answers need a GKD run with a teacher: set rlhf.rlhf_type: gkd and "
            "rlhf.teacher_model",
        )


def rule_seq_kd_needs_kd_term(draft: ConfigDraft) -> None:
    """With every KD weight at 0 the run becomes plain SFT and loads no teacher: seq_kd would do nothing."""
    if draft.knobs.seq_kd and draft.is_gkd and not draft.kd_requested:
        raise ConfigError(
            "rlhf.seq_kd",
            "every KD weight is 0, so this run is plain SFT and loads no teacher: set rlhf.llm_kd_weight > 0",
        )


def rule_seq_kd_needs_local_teacher(draft: ConfigDraft) -> None:
    if draft.knobs.seq_kd and draft.rlhf.get("teacher_model_server"):
        raise ConfigError(
            "rlhf.teacher_model_server",
            "seq_kd generates the targets with a local teacher checkpoint (rlhf.teacher_model), not a server",
        )


def rule_seq_kd_teacher_adapters(draft: ConfigDraft) -> None:
    adapters = draft.rlhf.get("teacher_adapters") or []
    if not draft.teacher_writes_targets or not adapters:
        return
    if len(adapters) > 1:
        raise ConfigError(
            "rlhf.teacher_adapters",
            "the teacher's answers (seq_kd, anchor prompts) are generated with at most one teacher adapter, "
            f"got {len(adapters)}: merge them first",
        )
    if draft.custom.teacher_targets.infer_backend == "vllm":
        raise ConfigError(
            "rlhf.teacher_adapters",
            "the vllm backend generates with plain checkpoints: merge the adapter into the teacher "
            "(swift export --merge_lora true) or set custom.teacher_targets.infer_backend: transformers",
        )


def rule_seq_kd_needs_local_jsonl(draft: ConfigDraft) -> None:
    """The teacher answers every row of the training files, so they must be local JSONL files read whole."""
    if not draft.knobs.seq_kd:
        return
    data = draft.sections["data"]
    if data.get("cached_dataset"):
        raise ConfigError(
            "data.cached_dataset", "seq_kd rewrites the answers of data.dataset rows: not a tokenized cache"
        )
    for i, entry in enumerate(data.get("dataset") or []):
        if not str(entry).endswith(".jsonl"):
            raise ConfigError(
                f"data.dataset[{i}]",
                f"seq_kd needs local .jsonl files read whole (no hub id, no #N sample count), got {entry!r}",
            )


def rule_infer_backend_installed(draft: ConfigDraft) -> None:
    backend = draft.custom.teacher_targets.infer_backend
    if draft.teacher_writes_targets and not infer_backend_installed(backend):
        raise ConfigError(
            "custom.teacher_targets.infer_backend",
            f"{backend} is not installed in this environment: install it, or use transformers",
        )


def rule_seq_kd_needs_dataset_batches(draft: ConfigDraft) -> None:
    """``rlhf.lmbda`` is the probability that a batch is the student's own samples; at 1 every batch is, so
    the teacher's answers that seq_kd writes before training would never be trained on."""
    if draft.knobs.seq_kd and draft.is_gkd and draft.rlhf.get("lmbda") == 1:
        raise ConfigError(
            "rlhf.seq_kd",
            "has no effect with rlhf.lmbda: 1: every batch is then the student's own samples, so the "
            "teacher's answers are never trained on. Lower rlhf.lmbda (0: always the teacher's answers), "
            "or remove rlhf.seq_kd",
        )


# --- KD-only anchor prompts (custom.anchor) ----------------------------------------------------------------


def rule_anchor_needs_gkd(draft: ConfigDraft) -> None:
    if draft.anchor_requested and not draft.is_gkd:
        raise ConfigError(
            "custom.anchor.dataset",
            "anchor prompts train on the teacher's distribution: set rlhf.rlhf_type: gkd and rlhf.teacher_model",
        )


def rule_anchor_needs_gkd_monitor(draft: ConfigDraft) -> None:
    if draft.anchor_requested and draft.is_gkd and not draft.uses_gkd_monitor:
        raise ConfigError(
            "custom.anchor.dataset",
            "anchor prompts are mixed into each step by anchorkd's trainer: set custom.trainer_variant: "
            "gkd_monitor",
        )


def rule_anchor_needs_local_jsonl(draft: ConfigDraft) -> None:
    """The trainer draws anchor rows itself and the teacher answers the rows without an assistant turn, so
    the anchor set is made of local JSONL files read whole."""
    for i, entry in enumerate(draft.custom.anchor.dataset):
        if not str(entry).endswith(".jsonl"):
            raise ConfigError(
                f"custom.anchor.dataset[{i}]",
                f"must be a local .jsonl file read whole (no hub id, no #N sample count), got {entry!r}",
            )


def rule_anchor_needs_padded_batches(draft: ConfigDraft) -> None:
    """The trainer tells anchor rows from domain rows by their row in the batch: one row, one sample."""
    if not draft.anchor_requested:
        return
    template, data = draft.sections["template"], draft.sections["data"]
    for key_path, on in (
        ("template.padding_free", bool(template.get("padding_free"))),
        ("data.packing", bool(data.get("packing"))),
        ("template.sequence_parallel_size", (template.get("sequence_parallel_size") or 1) > 1),
    ):
        if on:
            raise ConfigError(
                key_path,
                "not supported with custom.anchor: anchor rows are told apart by their row of the batch, "
                "which packing, padding-free batches and sequence parallelism merge or split",
            )


def rule_anchor_ratio_gives_a_row(draft: ConfigDraft) -> None:
    """Each generation buffer gets ``anchor_rows_for(rows, ratio)`` anchor rows; a ratio that rounds to none
    would train without anchor prompts."""
    if not (draft.is_gkd and draft.anchor_requested):
        return
    rows = rows_per_generation_buffer(draft)
    ratio = draft.custom.anchor.ratio
    if rows is not None and anchor_rows_for(rows, ratio) < 1:
        raise ConfigError(
            "custom.anchor.ratio",
            f"{ratio} of a step of {rows} data-set rows per rank rounds to no anchor row: raise the ratio, "
            "training.per_device_train_batch_size or training.gradient_accumulation_steps",
        )


# --- training from the teacher cache (custom.teacher_cache) ----------------------------------------------


def rule_teacher_cache_needs_gkd_monitor(draft: ConfigDraft) -> None:
    if draft.custom.teacher_cache and not (draft.is_gkd and draft.uses_gkd_monitor):
        raise ConfigError(
            "custom.teacher_cache",
            "the cached teacher is read by anchorkd's GKD trainer: set rlhf.rlhf_type: gkd and "
            "custom.trainer_variant: gkd_monitor",
        )


def rule_teacher_cache_needs_forward_only(draft: ConfigDraft) -> None:
    """On-policy batches are the student's own samples, whose positions no cache can hold."""
    if not (draft.custom.teacher_cache and draft.is_gkd):
        return
    lmbda = draft.rlhf.get("lmbda", default_value("lmbda"))
    if lmbda != 0:
        raise ConfigError(
            "custom.teacher_cache",
            f"needs forward-only KD (rlhf.lmbda: 0), got rlhf.lmbda {lmbda!r}: the student's own samples "
            "(on-policy batches) have no cached teacher distribution",
        )


def rule_teacher_cache_no_visual_kd(draft: ConfigDraft) -> None:
    if draft.custom.teacher_cache and draft.custom.visual_kd.enabled:
        raise ConfigError(
            "custom.teacher_cache",
            "caches the teacher's LM-head distribution only; visual KD needs the teacher's merger features "
            "at every step: turn custom.visual_kd off or train with the live teacher",
        )


def rule_teacher_cache_no_seq_kd(draft: ConfigDraft) -> None:
    if draft.custom.teacher_cache and draft.knobs.seq_kd:
        raise ConfigError(
            "custom.teacher_cache",
            "not supported with rlhf.seq_kd (which loads the teacher before training to write its answers, "
            "while a cached run loads none): remove one of the two",
        )


# --- values ms-swift derives when it builds the arguments ------------------------------------------------


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def rows_per_generation_buffer(draft: ConfigDraft) -> int | None:
    """Data-set rows one rank encodes per GKD generation buffer: the per-device batch times
    ``steps_per_generation``, derived as ms-swift derives them when it builds the arguments
    (``swift_seam.rows_per_generation_buffer`` reads ms-swift's own values; a unit test keeps the two equal):
    gradient accumulation defaults to ceil(16 / batch / processes), steps_per_generation to the gradient
    accumulation, and a ``generation_batch_size`` is divided by the global batch. None while a value it
    needs breaks its own range (that rule reports it)."""
    training, rlhf = draft.sections["training"], draft.rlhf
    batch = training.get("per_device_train_batch_size", default_value("per_device_train_batch_size"))
    accumulation = training.get("gradient_accumulation_steps")
    steps, generation_batch = rlhf.get("steps_per_generation"), rlhf.get("generation_batch_size")
    if not _positive_int(batch) or not all(
        v is None or _positive_int(v) for v in (accumulation, steps, generation_batch)
    ):
        return None
    world_size = draft.launch.world_size
    if steps is None and generation_batch is None:
        steps = accumulation or max(1, math.ceil(16 / batch / world_size))
    elif steps is None:
        steps = generation_batch // (batch * world_size)
    return batch * steps


def rule_generation_batch_fits_the_global_batch(draft: ConfigDraft) -> None:
    """``rlhf.generation_batch_size`` counts rows over all processes: a whole number of global batches, and
    ``steps_per_generation`` of them when both are given."""
    generation_batch = draft.rlhf.get("generation_batch_size")
    batch = draft.sections["training"].get(
        "per_device_train_batch_size", default_value("per_device_train_batch_size")
    )
    steps = draft.rlhf.get("steps_per_generation")
    if not (draft.is_gkd and _positive_int(generation_batch) and _positive_int(batch)):
        return
    world_size = draft.launch.world_size
    global_batch = batch * world_size
    explain = f"training.per_device_train_batch_size {batch} x {world_size} process(es) = {global_batch}"
    if steps is None and generation_batch % global_batch:
        raise ConfigError(
            "rlhf.generation_batch_size",
            f"{generation_batch} is not a multiple of the global batch ({explain})",
        )
    if _positive_int(steps) and generation_batch != global_batch * steps:
        raise ConfigError(
            "rlhf.generation_batch_size",
            f"{generation_batch} is not the global batch ({explain}) x rlhf.steps_per_generation {steps}: "
            "give only one of the two",
        )


# --- processes and devices ----------------------------------------------------------------------------


def rule_cpu_data_parallel_needs_use_cpu(draft: ConfigDraft) -> None:
    """Several processes without a GPU train in DDP over gloo only with ``use_cpu``; anchorkd sets it, so
    only an explicit ``false`` is refused: the ranks would each train alone, their weights drifting apart."""
    if draft.launch.cpu_data_parallel and draft.sections["training"].get("use_cpu") is False:
        raise ConfigError(
            "training.use_cpu",
            f"is false, but {draft.launch.world_size} processes run on a machine without a GPU: the ranks "
            "would train unsynchronised. Remove the key (anchorkd sets use_cpu: true there) or set it true",
        )


def rule_fsdp_needs_a_gpu(draft: ConfigDraft) -> None:
    """accelerate applies FSDP only to GPU-type distributed runs: without a GPU the run would exit 0 having
    trained an unsharded model (DDP over gloo) under a config that says FSDP."""
    if draft.sections["training"].get("fsdp") and not draft.launch.has_accelerator:
        raise ConfigError(
            "training.fsdp",
            "FSDP needs GPUs: on a machine without one accelerate silently trains the model unsharded "
            "(as plain DDP). Remove training.fsdp here, or use DeepSpeed (training.deepspeed: zero2 / "
            "zero3), which runs on the CPU",
        )


def rule_cpu_deepspeed_accelerator_config_is_a_mapping(draft: ConfigDraft) -> None:
    """Without a GPU anchorkd starts the gloo state DeepSpeed needs and adds ``use_configured_state`` to
    ``accelerator_config`` (``swift_seam.start_cpu_deepspeed_state``): a JSON file path cannot take it."""
    training = draft.sections["training"]
    value = training.get("accelerator_config")
    on_cpu_deepspeed = training.get("deepspeed") and not draft.launch.has_accelerator
    if on_cpu_deepspeed and value is not None and not isinstance(value, dict):
        raise ConfigError(
            "training.accelerator_config",
            f"must be a mapping for DeepSpeed without a GPU (anchorkd adds use_configured_state to it), "
            f"got {value!r}: write its keys inline",
        )


# ms-swift's named DeepSpeed configs (``--deepspeed zero2``); any other value is a JSON file or JSON text.
DEEPSPEED_PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


def rule_deepspeed_config_is_readable(draft: ConfigDraft) -> None:
    """ms-swift reads the DeepSpeed config only when it builds the arguments, and a wrong value fails there
    without naming the key (a typo'd preset is parsed as JSON text: "Expecting value")."""
    errors = []
    for key_path in ("training.deepspeed", "rlhf.teacher_deepspeed"):
        section, key = key_path.split(".")
        value = draft.sections[section].get(key)
        problem = _deepspeed_config_problem(value) if value else None
        if problem:
            errors.append(ConfigError(key_path, problem))
    if errors:
        raise _many(errors)


def _deepspeed_config_problem(value) -> str | None:
    if isinstance(value, str):
        if value in DEEPSPEED_PRESETS:
            return None
        path = Path(value)  # relative to the working directory, as ms-swift reads it
        if path.exists():
            try:
                value = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                return f"{path} is not a readable JSON file: {exc}"
        elif value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except ValueError as exc:
                return f"is not valid JSON: {exc}"
        else:
            return (
                f"{value!r} is neither one of ms-swift's presets ({', '.join(DEEPSPEED_PRESETS)}) nor an "
                "existing JSON file"
            )
    if not isinstance(value, dict):
        return f"a DeepSpeed config is a JSON object, got {type(value).__name__}"
    if not isinstance(value.get("zero_optimization"), dict):
        return "the DeepSpeed config has no zero_optimization section (accelerate requires one)"
    return None


# --- what anchorkd's GKD trainer does not support ------------------------------------------------------


def _refuse_with_gkd_monitor(draft: ConfigDraft, key_path: str, rule: str) -> None:
    section, key = key_path.split(".")
    if draft.uses_gkd_monitor and draft.is_gkd and draft.sections[section].get(key):
        raise ConfigError(key_path, rule)


def rule_no_teacher_server_with_gkd_monitor(draft: ConfigDraft) -> None:
    _refuse_with_gkd_monitor(
        draft,
        "rlhf.teacher_model_server",
        "not supported by custom.trainer_variant: gkd_monitor: it anchors to a local frozen teacher "
        "(rlhf.teacher_model) and needs its hidden states, which a server does not return",
    )


def rule_no_topk_with_gkd_monitor(draft: ConfigDraft) -> None:
    _refuse_with_gkd_monitor(
        draft, "rlhf.gkd_logits_topk", "not supported by gkd_monitor (its loss uses the full vocabulary)"
    )


def rule_no_liger_with_gkd_monitor(draft: ConfigDraft) -> None:
    _refuse_with_gkd_monitor(
        draft, "training.use_liger_kernel", "gkd_monitor has its own fused KD loss: turn liger off"
    )


RULES: tuple[Rule, ...] = (
    rule_numeric_ranges,
    rule_rlhf_keys_need_rlhf_type,
    rule_llm_kd_weight_needs_gkd,
    rule_gkd_monitor_needs_gkd,
    rule_kd_weight_needs_gkd_monitor,
    rule_visual_kd_needs_gkd_monitor,
    rule_seq_kd_needs_gkd,
    rule_seq_kd_needs_kd_term,
    rule_seq_kd_needs_local_teacher,
    rule_seq_kd_teacher_adapters,
    rule_seq_kd_needs_local_jsonl,
    rule_seq_kd_needs_dataset_batches,
    rule_infer_backend_installed,
    rule_anchor_needs_gkd,
    rule_anchor_needs_gkd_monitor,
    rule_anchor_needs_local_jsonl,
    rule_anchor_needs_padded_batches,
    rule_anchor_ratio_gives_a_row,
    rule_generation_batch_fits_the_global_batch,
    rule_teacher_cache_needs_gkd_monitor,
    rule_teacher_cache_needs_forward_only,
    rule_teacher_cache_no_visual_kd,
    rule_teacher_cache_no_seq_kd,
    rule_teacher_required_for_kd,
    rule_visual_kd_needs_trainable_vision,
    rule_cpu_data_parallel_needs_use_cpu,
    rule_fsdp_needs_a_gpu,
    rule_cpu_deepspeed_accelerator_config_is_a_mapping,
    rule_deepspeed_config_is_readable,
    rule_no_teacher_server_with_gkd_monitor,
    rule_no_topk_with_gkd_monitor,
    rule_no_liger_with_gkd_monitor,
)


def check_rules(draft: ConfigDraft) -> list[ConfigError]:
    """Run every rule; return all errors found (each rule reports at most its first)."""
    errors: list[ConfigError] = []
    for rule in RULES:
        try:
            rule(draft)
        except ConfigError as err:
            errors.extend(getattr(err, "errors", None) or [err])
    return errors


def _many(errors: list[ConfigError]) -> ConfigError:
    from ..errors import ConfigErrors

    return errors[0] if len(errors) == 1 else ConfigErrors(errors)
