"""The one module that touches ms-swift's, transformers' and PEFT's internals (ms-swift 4.6.0, transformers
5.19.0, peft 0.20.0); DeepSpeed's are in its sibling ``deepspeed_seam.py``.

Everything anchorkd relies on that is not a documented public API sits here, behind small named
functions, so an upgrade of the pinned stack breaks this file and ``tests/unit/test_swift_seam_contract.py``
(which asserts each internal exists with the shape used here), not code spread over the package. The
private trainer and pipeline hooks that anchorkd's subclasses override (``_prepare_inputs``,
``_get_trainer_kwargs``, ...) stay in those subclasses; the contract test lists each with the parameters
anchorkd relies on, and fails when a subclass overrides one it does not list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

# --- argument objects ------------------------------------------------------------------------------------

# ms-swift's RLHFArguments decides in ``__post_init__`` whether the GKD teacher is the student with its
# LoRA adapter switched off (teacher_model == model and tuner_type lora); the pipeline forwards it.
_TEACHER_DISABLED_ADAPTER = "_teacher_use_disable_adapter"


def teacher_is_disabled_adapter(obj: Any) -> bool:
    """ms-swift's choice for an argument object or a GKD trainer: is the teacher the adapter-disabled student?"""
    return bool(getattr(obj, _TEACHER_DISABLED_ADAPTER, False))


def use_separate_teacher_copy(train_args: Any, model_path: str) -> None:
    """Make ms-swift load a frozen copy of ``model_path`` as the teacher instead of the adapter-disabled
    student. ms-swift cannot always infer the type of a local folder; the copy is the student's own type."""
    setattr(train_args, _TEACHER_DISABLED_ADAPTER, False)
    train_args.teacher_model = model_path
    train_args.teacher_model_type = train_args.teacher_model_type or train_args.model_type


def load_no_teacher(train_args: Any) -> None:
    """Make ms-swift load no teacher and run none (a run trained from ``custom.teacher_cache``): neither a
    separate copy nor the adapter-disabled student."""
    setattr(train_args, _TEACHER_DISABLED_ADAPTER, False)
    train_args.teacher_model = None
    train_args.teacher_model_type = None


def arguments_classes() -> tuple[type, type]:
    """(SftArguments, RLHFArguments): the argument dataclasses an anchorkd run is built from."""
    from swift.arguments import RLHFArguments, SftArguments

    return SftArguments, RLHFArguments


@functools.lru_cache(maxsize=1)
def section_dataclasses() -> dict[str, tuple[type, ...]]:
    """The ms-swift mixin dataclasses whose own fields make each config section."""
    from swift.arguments.base_args.data_args import DataArguments
    from swift.arguments.base_args.model_args import ModelArguments
    from swift.arguments.base_args.quant_args import QuantizeArguments
    from swift.arguments.base_args.template_args import TemplateArguments
    from swift.arguments.tuner_args import TunerArguments

    return {
        "model": (ModelArguments, QuantizeArguments),
        "data": (DataArguments,),
        "template": (TemplateArguments,),
        "tuner": (TunerArguments,),
    }


def declared_fields(cls: type) -> set[str]:
    """Fields a dataclass declares itself (not inherited)."""
    return set(cls.__dict__.get("__annotations__", {}))


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# --- pipelines and the trainer registry -----------------------------------------------------------------


def pipeline_classes() -> tuple[type, type]:
    """(SwiftSft, SwiftRLHF): ms-swift's training pipelines, which anchorkd subclasses."""
    from swift.pipelines.train.rlhf import SwiftRLHF
    from swift.pipelines.train.sft import SwiftSft

    return SwiftSft, SwiftRLHF


def stock_trainer_cls(train_args: Any) -> type:
    from swift.trainers import TrainerFactory

    return TrainerFactory.get_trainer_cls(train_args)


@contextlib.contextmanager
def trainer_class_registered(train_args: Any, trainer_cls: type) -> Iterator[None]:
    """Register ``trainer_cls`` in ms-swift's trainer table for this run's kind while the block runs.

    ``SwiftSft.run`` picks the trainer class through ``TrainerFactory``; registering ours there lets the
    stock ``run`` build it, instead of anchorkd copying ``run``.
    """
    from swift.trainers import TrainerFactory

    kind = getattr(train_args, "rlhf_type", None) or train_args.task_type
    mapping = TrainerFactory.TRAINER_MAPPING
    previous = mapping[kind]
    mapping[kind] = f"{trainer_cls.__module__}.{trainer_cls.__qualname__}"
    try:
        yield
    finally:
        mapping[kind] = previous


def torchrun_args() -> list[str] | None:
    """ms-swift's torchrun arguments from NPROC_PER_NODE / NNODES / ... (None: a single process)."""
    from swift.cli.main import get_torchrun_args

    return get_torchrun_args()


# --- the model registry ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RegisteredModelType:
    """One ``model_type`` of ms-swift's registry: the HF architectures (config.json ``architectures[0]``) it
    loads (empty: any, as ms-swift's own matching treats it) and whether ms-swift treats it as multimodal."""

    name: str
    architectures: tuple[str, ...]
    multimodal: bool


@functools.lru_cache(maxsize=1)
def registered_model_types() -> dict[str, RegisteredModelType]:
    """ms-swift's ``MODEL_MAPPING`` (model_type -> ``ModelMeta``), read without calling its matcher (which
    appends ``'null'`` to architecture lists in place)."""
    from swift.model import MODEL_MAPPING

    return {
        name: RegisteredModelType(
            name,
            tuple(arch for arch in meta.architectures if arch != "null"),
            bool(meta.is_multimodal),
        )
        for name, meta in MODEL_MAPPING.items()
    }


# --- the GKD trainer ---------------------------------------------------------------------------------------

# Keys of the per-micro-batch dicts that ms-swift's GKDTrainer._prepare_inputs builds.
MODEL_INPUTS = "model_inputs"
TEACHER_INPUTS = "teacher_model_inputs"
GKD_BATCH = "gkd_batch"
# Keys of ``MODEL_INPUTS`` that ms-swift's template collator writes for Qwen-VL (the model's forward arguments).
LABELS = "labels"
PIXEL_VALUES = "pixel_values"
IMAGE_GRID_THW = "image_grid_thw"
VIDEO_PIXEL_VALUES = "pixel_values_videos"
VIDEO_GRID_THW = "video_grid_thw"


def gkd_trainer_base() -> type:
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer

    return GKDTrainer


def batch_from_dataset(batch: dict) -> bool:
    """True when the micro-batch's responses come from the data set (not on-policy student samples)."""
    from swift.rlhf_trainers.gkd_loss import DataSource

    return batch[GKD_BATCH].data_source != DataSource.STUDENT


def starts_generation_buffer(trainer: Any) -> bool:
    """Whether the next training ``_prepare_inputs`` call fills a new buffer of ``steps_per_generation``
    micro-batches (ms-swift encodes, and samples on-policy, a whole buffer at once)."""
    steps = trainer.args.steps_per_generation
    return trainer._step % steps == 0 or trainer._buffered_inputs is None


def encode_micro_batch(trainer: Any, samples: list) -> dict:
    """One micro-batch of GKD samples encoded and collated as ms-swift's GKD trainer encodes a training
    micro-batch (``_encode_samples``: its template context, OPSD teacher view), as ``{MODEL_INPUTS,
    TEACHER_INPUTS}``."""
    encoded, teacher_encoded = trainer._encode_samples(samples)
    return {MODEL_INPUTS: encoded, TEACHER_INPUTS: teacher_encoded or dict(encoded)}


def micro_batch_counter(trainer: Any) -> int:
    """ms-swift's GKD count of training micro-batches taken from its buffers so far (``_step``)."""
    return int(trainer._step)


def load_rows(train_args: Any, paths: list[str]) -> Any:
    """Local data files loaded and preprocessed the way ms-swift loads ``dataset`` (its row format, column
    mapping and role names), in file order: not shuffled, nothing split off for validation."""
    from swift.dataset import load_dataset

    kwargs = {**train_args.get_dataset_kwargs(), "streaming": False}
    rows, _ = load_dataset(list(paths), split_dataset_ratio=0.0, shuffle=False, **kwargs)
    return rows


def generation_buffer(trainer: Any) -> list[dict]:
    return trainer._buffered_inputs


def reset_generation_buffer(trainer: Any) -> None:
    trainer._step = 0
    trainer._buffered_inputs = None


def mark_loss_scaled_for_accumulation(trainer: Any) -> None:
    """Tell HF's ``training_step`` that ``compute_loss`` already divides by the accumulation window, so it
    does not divide by ``gradient_accumulation_steps`` again (HF's ``loss_is_scaled_for_ga``)."""
    trainer.loss_is_scaled_for_ga = True


def metric_store(trainer: Any) -> dict:
    """ms-swift's per-mode metric lists (``{"train": defaultdict(list), "eval": ...}``) that its ``log``
    averages and clears."""
    return trainer._metrics


def disable_gradient_checkpointing(model: Any, gradient_checkpointing_kwargs: dict | None):
    from swift.trainers import disable_gradient_checkpointing as swift_disable

    return swift_disable(model, gradient_checkpointing_kwargs)


# --- inference engines (evaluation and teacher targets) ---------------------------------------------------

# ms-swift's engine per backend name; ms-swift 3's name ``pt`` is 4.x's ``transformers``.
INFER_BACKENDS = ("transformers", "vllm")
# The Python package each backend needs beyond ms-swift itself.
_BACKEND_PACKAGES = {"transformers": "transformers", "vllm": "vllm"}


def infer_backend_installed(backend: str) -> bool:
    """Whether ``backend``'s package can be imported here (checked without importing it)."""
    import importlib.util

    package = _BACKEND_PACKAGES.get(backend)
    return package is not None and importlib.util.find_spec(package) is not None


def infer_engine(backend: str, model_dir: str, **kwargs: Any) -> Any:
    """ms-swift's inference engine for ``backend`` on a local checkpoint (``kwargs`` go to its constructor)."""
    if backend == "vllm":
        from swift.infer_engine import VllmEngine

        return VllmEngine(model_dir, **kwargs)
    from swift.infer_engine import TransformersEngine

    return TransformersEngine(model_dir, max_batch_size=0, **kwargs)  # 0: the caller hands over batches


def configure_template(template: Any, *, max_pixels: int | None, system: str | None) -> None:
    """Give an inference engine's template a training run's prompt settings (image pixel budget, default
    system prompt), as ms-swift's ``Template.__init__`` applies them from ``TemplateArguments``."""
    template.max_pixels = max_pixels
    if system is not None:
        template.template_meta.check_system(system)
        template.template_meta.default_system = system


def template_type(template: Any) -> str:
    """The name of an engine's chat template (``template_meta.template_type``)."""
    return template.template_meta.template_type


@contextlib.contextmanager
def training_encoding(template: Any, model: Any) -> Iterator[Any]:
    """An inference engine's ``template`` encoding as in training for the block (labels on the assistant
    tokens only), with ``model`` attached where the template needs one to encode; its mode is restored."""
    previous_mode = template.mode
    if template.use_model:
        template.model = model
    template.set_mode("train")
    try:
        yield template
    finally:
        template.set_mode(previous_mode)


def model_inputs(template: Any, model: Any, encoded: list[dict]) -> tuple[dict, Any]:
    """(forward keyword arguments, labels) for a batch of ``encoded`` rows, as in training: ms-swift's collator
    pads them, and its pre-forward hook turns input ids and pixels into the model's inputs."""
    from swift.utils import to_device

    batch = template.data_collator(list(encoded))
    labels = batch.pop("labels")
    batch.pop("loss_scale", None)
    _, inputs = template.pre_forward_hook(model, None, to_device(batch, model.device))
    return inputs, labels


# --- PEFT --------------------------------------------------------------------------------------------------


def peft_base_layer(module: Any) -> Any:
    """The layer a PEFT tuner (LoRA) wraps, read through its ``base_layer``; ``module`` itself otherwise."""
    return getattr(module, "base_layer", module)


# --- logging.jsonl --------------------------------------------------------------------------------------


def precise_progress_callback(
    keep_precise: Callable[[str], bool], format_value: Callable[[str, float], float]
):
    """ms-swift's progress callback (progress bar + ``logging.jsonl``), except that values whose key
    ``keep_precise`` accepts are written as ``format_value`` makes them instead of ms-swift's
    8-decimal rounding (which prints an active 1e-9 KD term as 0.0)."""
    from swift.trainers.patcher import ProgressCallbackNew, add_train_message
    from swift.utils import append_to_jsonl, is_pai_training_job
    from transformers.trainer_callback import ProgressCallback

    class PreciseProgressCallback(ProgressCallbackNew):
        def on_log(self, args, state, control, logs=None, **kwargs):
            exact = {
                key: value
                for key, value in (logs or {}).items()
                if keep_precise(key) and isinstance(value, float) and math.isfinite(value)
            }
            add_train_message(logs, state, self.start_time, self.start_step)
            logs.update({key: format_value(key, value) for key, value in exact.items()})
            if not is_pai_training_job() and state.is_world_process_zero:
                append_to_jsonl(f"{args.output_dir}/logging.jsonl", logs)
            ProgressCallback.on_log(self, args, state, control, logs, **kwargs)
            if state.is_world_process_zero and self.training_bar is not None:
                self.training_bar.refresh()

    return PreciseProgressCallback, ProgressCallbackNew


def replace_progress_callback(trainer: Any, callback_cls: type, replaced_cls: type) -> None:
    """Swap ms-swift's progress callback for ``callback_cls`` (only where it is installed: with
    ``disable_tqdm`` ms-swift writes no logging.jsonl either)."""
    if any(type(cb) is replaced_cls for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(replaced_cls)
        trainer.add_callback(callback_cls)


def teacher_on_device(trainer: Any):
    """ms-swift's context that loads an offloaded teacher (``offload_teacher_model``) onto the device for
    the block and offloads it afterwards; a no-op otherwise."""
    return trainer.load_teacher_model_context()


# --- resume ------------------------------------------------------------------------------------------------

# ms-swift points this link (in the run folder) at a checkpoint once every rank has finished saving it.
LAST_CHECKPOINT_LINK = "last-checkpoint"


def update_last_checkpoint_link(checkpoint: Any) -> None:
    """Point the run folder's ``last-checkpoint`` at ``checkpoint`` the way ms-swift does (atomic swap)."""
    from swift.utils import update_last_checkpoint_symlink

    update_last_checkpoint_symlink(str(checkpoint))


def restart_generation_buffer(trainer: Any, micro_step: int) -> None:
    """Put ms-swift's GKD micro-batch counter at ``micro_step`` with no buffer, so the next training
    ``_prepare_inputs`` builds the buffer holding that micro-batch from the current dataloader batch (the
    sampler repeats a generation batch ``steps_per_generation`` times)."""
    trainer._step = micro_step
    trainer._buffered_inputs = None


def sampler_generator(sampler: Any):
    """The ``torch.Generator`` TRL's ``RepeatSampler`` shuffles with (it has none when not shuffling)."""
    return getattr(sampler, "generator", None)


def sampler_shuffle_seed(sampler: Any) -> int | None:
    """The seed a shuffling ``RepeatSampler`` seeded its generator with; None when it does not shuffle or
    was not seeded (its order then cannot be rebuilt)."""
    if not getattr(sampler, "shuffle", False) or sampler_generator(sampler) is None:
        return None
    return getattr(sampler, "seed", None)


# --- engines on a machine without CUDA ----------------------------------------------------------------


def cpu_mixed_precision(swift_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Mixed-precision arguments for a run on a machine without CUDA: ``fp16`` off unless the config sets it.

    ms-swift turns ``fp16`` on for float16 *and float32* models when the config leaves it unset
    (``ModelArguments._init_mixed_precision``), on any device. Off CUDA accelerate ignores it for plain and DDP
    runs (no autocast, no scaler on the CPU), so turning it off changes nothing there; DeepSpeed's CPU
    accelerator instead refuses it ("Type fp16 is not supported on your device").
    """
    return {"fp16": False} if swift_kwargs.get("fp16") is None else {}


def start_cpu_deepspeed_state(accelerator_config: dict | None = None) -> dict[str, Any]:
    """Start accelerate's distributed state for a DeepSpeed run on a machine without CUDA (gloo), and return
    the ``accelerator_config`` that makes transformers use it. Call it before the training arguments are
    built, once per process; only where no CUDA device is available.

    Why it exists: transformers' ``TrainingArguments`` creates the state for DeepSpeed without naming a
    backend, and accelerate chooses one only for an accelerator (nccl on CUDA, hccl on NPU, ...). On a
    CPU-only machine it settles on "not distributed" (world size 1) while DeepSpeed's own comm has started
    every rank, and DeepSpeed's batch check fails ("train_batch_size is not equal to micro_batch_per_gpu *
    gradient_acc_step * world_size"). ``use_cpu`` is no way out: accelerate then drops DeepSpeed for plain
    DDP. On GPU machines accelerate and transformers pick nccl themselves and this is not needed.

    Outside torchrun, the single-process launcher variables are set first (ms-swift's own helper), since
    DeepSpeed would otherwise look for an MPI launcher.
    """
    import os

    from accelerate.state import PartialState

    if "LOCAL_RANK" not in os.environ:
        from swift.utils import set_default_ddp_config

        set_default_ddp_config()
    flag = "ACCELERATE_USE_DEEPSPEED"
    previous = os.environ.get(flag)
    os.environ[flag] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ[flag]
        else:
            os.environ[flag] = previous
    return {"accelerator_config": {**(accelerator_config or {}), "use_configured_state": True}}


def rows_per_generation_buffer(training_args: Any) -> int:
    """Data-set rows one rank encodes per GKD generation buffer: the per-device batch times ms-swift's
    ``steps_per_generation`` (derived from gradient accumulation in the GKD config's ``__post_init__``).
    ``training_args`` is the trainer's ``args`` (``RLHFArguments.training_args``)."""
    return training_args.per_device_train_batch_size * training_args.steps_per_generation
