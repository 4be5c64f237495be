"""Shared harness for the GKD trainer acceptance tests (specs 003 and 004).

Building a trainer (config -> ms-swift pipeline -> model, teacher, template, data sets -> trainer) costs
seconds; a GKD step costs more. So each trainer *configuration* is built once per test session
(:func:`build`, cached by config and overrides) and the tests call ``trainer.compute_loss`` on batches
prepared by the trainer's own ``_prepare_inputs`` instead of running training loops. Only the tests
about ``logging.jsonl`` and whole runs call ``run_training``.

The data are short: the session's synthetic dense captions cut to 1-3 lines (so samples still differ in
token count) with a small pixel budget (16 merged visual tokens per image). Vocabulary-sized tensors are
what a KD step pays for, and they scale with the number of supervised tokens.

Trainers are shared between tests: change their knobs only inside :func:`configured`, which restores
them and clears the recorded metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from anchorkd import swift_seam as seam

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs"
STAGE2_GKD_DEMO = CONFIGS_DIR / "demo" / "stage_2_llm_lora_gkd.yaml"

IGNORE_INDEX = -100
# Caption lines kept per sample (cycled): the samples of a batch have different token counts.
CAPTION_LINES = (1, 2, 1, 3, 2, 1)
# 128 x 128 pixels at most: 8 x 8 patches of 16 -> 16 merged visual tokens per image.
MAX_PIXELS = 16384
SEED = 0

# Knobs that live on the training arguments rather than on the trainer.
_ARGS_KNOBS = {"sft_alpha", "gradient_accumulation_steps", "steps_per_generation", "offload_teacher_model"}
_ANCHOR_KNOBS = {"llm_kd_weight", "kd_loss_impl", "kd_chunk_size", "visual_kd"}


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


# ms-swift's argument constructors export this (only when unset) from the first output dir they see.
_ENV_SET_BY_SWIFT = ("TENSORBOARD_LOGGING_DIR",)


@contextlib.contextmanager
def preserved_environment():
    """Leave the process environment as it was (ms-swift exports variables while building arguments)."""
    saved = {name: os.environ.get(name) for name in _ENV_SET_BY_SWIFT}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_training(config_path: Path, overrides: list[str]) -> dict:
    """``anchorkd.trainers.pipeline.run_training`` from a fixed seed, environment left untouched."""
    from anchorkd.trainers import pipeline

    seed_everything()
    with preserved_environment():
        return pipeline.run_training(config_path, overrides)


# --- data and configs --------------------------------------------------------------------------------


def write_short_data(synthetic_data_dir: Path, out_dir: Path) -> Path:
    """Copy the synthetic training records with captions cut to ``CAPTION_LINES`` lines each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = [json.loads(line) for line in (synthetic_data_dir / "train.jsonl").read_text().splitlines()]
    rows = []
    for index, record in enumerate(source):
        keep = CAPTION_LINES[index % len(CAPTION_LINES)]
        record = json.loads(json.dumps(record))
        answer = record["messages"][-1]
        answer["content"] = "\n".join(answer["content"].splitlines()[:keep])
        record.pop("meta", None)
        rows.append(json.dumps(record))
    (out_dir / "train.jsonl").write_text("\n".join(rows) + "\n")
    (out_dir / "val.jsonl").write_text("\n".join(rows[:2]) + "\n")
    # The prompt-only anchor set (fresh general-caption images and questions), for anchor-prompt runs.
    shutil.copyfile(synthetic_data_dir / "anchor.jsonl", out_dir / "anchor.jsonl")
    return out_dir


@dataclasses.dataclass(frozen=True)
class Env:
    """Where the tests' models, data and outputs live (one per session)."""

    model_dir: Path
    data_dir: Path
    work: Path
    quick_overrides: object

    def overrides(self, name: str, *, steps: int = 1, batch: int = 1, extra=()) -> list[str]:
        return run_overrides(
            self.quick_overrides,
            self.model_dir,
            self.data_dir,
            self.work / name,
            steps=steps,
            batch=batch,
            extra=extra,
        )


_ENVS: dict[tuple, Env] = {}


def make_env(tiny_model_dir: Path, synthetic_data_dir: Path, quick_overrides, base_temp: Path) -> Env:
    key = (str(tiny_model_dir), str(synthetic_data_dir))
    if key not in _ENVS:
        work = Path(base_temp) / "gkd-harness"
        data = write_short_data(Path(synthetic_data_dir), work / "data")
        _ENVS[key] = Env(Path(tiny_model_dir), data, work, quick_overrides)
    return _ENVS[key]


def write_stage3_gkd_config(folder: Path) -> Path:
    """``configs/stage_3_gkd.yaml`` on the tiny demo assets (the repository ships no demo overlay for it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stage_3_gkd_tiny.yaml"
    path.write_text(
        f"extends:\n  - {CONFIGS_DIR / 'stage_3_gkd.yaml'}\n  - {CONFIGS_DIR / 'demo' / '_tiny.yaml'}\n"
    )
    return path


def run_overrides(
    quick_overrides,
    model_dir: Path,
    data_dir: Path,
    output_dir: Path,
    *,
    steps: int = 1,
    batch: int = 1,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """The conftest quick-run overrides plus absolute paths to the tiny model and the short data."""
    return [
        *quick_overrides(output_dir, steps=steps, batch=batch),
        f"model.model={model_dir}",
        f"data.dataset=[{data_dir / 'train.jsonl'}]",
        f"data.val_dataset=[{data_dir / 'val.jsonl'}]",
        f"template.max_pixels={MAX_PIXELS}",
        "training.logging_steps=1",
        *extra,
    ]


# --- building trainers once ----------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    settings: object  # anchorkd.config.RunSettings
    train_args: object
    pipeline: object
    trainer: object
    init_records: list[logging.LogRecord]  # anchorkd log records emitted while the trainer was built
    ready: bool = False  # set once the named builders below have adjusted the weights


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_BUILT: dict[tuple, Built] = {}


def build(config_path: Path, overrides: list[str]) -> Built:
    """Config -> pipeline -> data sets -> trainer, exactly as ``run_training`` does (cached per session)."""
    key = (str(config_path), tuple(overrides))
    if key in _BUILT:
        ensure_accelerator(_BUILT[key].trainer)
        return _BUILT[key]
    from anchorkd.config import ConfigLoader
    from anchorkd.trainers.pipeline import build_pipeline, settings_for_run

    seed_everything()
    with preserved_environment():
        # With rlhf.seq_kd, settings_for_run first rewrites the data set with the teacher's answers.
        settings = settings_for_run(ConfigLoader.resolve(config_path, overrides))
    pipeline = build_pipeline(settings)
    collect = _Collect()
    anchor_logger = logging.getLogger("anchorkd")
    anchor_logger.addHandler(collect)
    try:
        trainer = pipeline.build_trainer()
    finally:
        anchor_logger.removeHandler(collect)
    trainer.model.train()
    built = Built(settings, settings.train_args, pipeline, trainer, collect.records)
    _BUILT[key] = built
    return built


def ensure_accelerator(trainer) -> None:
    """Re-create the trainer's accelerator if its shared state was reset since the trainer was built.

    Constructing any ``TrainingArguments`` (another test's ``load_training_config`` for instance) calls
    ``AcceleratorState._reset_state()``; a new Trainer re-populates it, bare argument objects do not. The
    trainers here live for the whole session, so they re-create theirs when needed."""
    from accelerate.state import AcceleratorState

    if not AcceleratorState._shared_state:
        trainer.create_accelerator_and_postprocess()


@contextlib.contextmanager
def configured(trainer, **knobs):
    """Temporarily set trainer knobs (``llm_kd_weight``, ``kd_loss_impl``, ``beta``, ``temperature``,
    ``visual_kd``, ``sft_alpha``, ...); metrics and captures are cleared on the way in and out."""
    ensure_accelerator(trainer)
    saved_anchor = trainer.anchor
    trainer.anchor = use_settings(trainer, **{k: v for k, v in knobs.items() if k in _ANCHOR_KNOBS})
    saved = []
    for name, value in knobs.items():
        if name in _ANCHOR_KNOBS:
            continue
        target = trainer.args if name in _ARGS_KNOBS else trainer
        saved.append((target, name, getattr(target, name)))
        setattr(target, name, value)
    reset(trainer)
    try:
        yield trainer
    finally:
        for target, name, value in reversed(saved):
            setattr(target, name, value)
        trainer.anchor = saved_anchor
        reset(trainer)
        trainer.model.train()


def use_settings(trainer, **changes):
    """The trainer's frozen ``AnchorSettings`` with ``changes`` (assign the result to ``trainer.anchor``)."""
    return trainer.anchor.model_copy(update=changes)


def reset(trainer) -> None:
    seam.metric_store(trainer)["train"].clear()
    seam.metric_store(trainer)["eval"].clear()
    trainer._metric_weights["train"].clear()
    trainer._metric_weights["eval"].clear()
    trainer._capture.clear()
    seam.reset_generation_buffer(trainer)
    trainer.model.zero_grad(set_to_none=True)


def dataset_rows(trainer, indices) -> list[dict]:
    return [trainer.train_dataset[i] for i in indices]


def prepare(trainer, rows: list[dict]) -> dict:
    """One train-mode micro-batch of ``rows`` through the trainer's own ``_prepare_inputs`` (encoding,
    collation, teacher inputs, accumulation-window annotation), with gradient accumulation 1."""
    ensure_accelerator(trainer)
    trainer.model.train()
    seam.reset_generation_buffer(trainer)
    return trainer._prepare_inputs(rows)


# --- the named trainer configurations the tests share ----------------------------------------------

# The tiny model's random LM head gives almost uniform next-token distributions (CE ~ ln V), so any
# two such distributions are close. Scaling the LM head (shared by student and base-anchor teacher)
# makes them peaked, so that LoRA perturbations give a JSD well above float noise.
LM_HEAD_SCALE = 10.0
LORA_SCALE = 0.1
# ms-swift cannot infer the model type of a local checkpoint folder named "tiny-qwen3-vl" when it loads
# a *separate* teacher; see test_gkd_modes_and_telemetry.py::test_stage3_teacher_copy_inherits_model_type.
TEACHER_TYPE = "rlhf.teacher_model_type=qwen3_vl"
ANCHOR_EXTRA = ("rlhf.llm_kd_weight=0.5", "rlhf.sft_alpha=0.3")
VISUAL_WEIGHT = 0.7


def scale_lm_head(model, factor: float) -> None:
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)


def anchor_build(env: Env) -> Built:
    """Stage-2 demo GKD: LoRA on the language model, base-anchor teacher (student with LoRA disabled),
    ``llm_kd_weight`` 0.5, ``sft_alpha`` 0.3, beta 0.1, forward-only; LoRA B perturbed, LM head scaled."""
    built = build(STAGE2_GKD_DEMO, env.overrides("anchor", extra=ANCHOR_EXTRA))
    if not built.ready:
        model = unwrap(built.trainer)
        scale_lm_head(model, LM_HEAD_SCALE)
        assert perturb_lora(model, seed=1, scale=LORA_SCALE) > 0
        built.ready = True
    return built


def visual_build(env: Env) -> Built:
    """``configs/stage_3_gkd.yaml`` on the tiny model with a separate frozen teacher copy
    with ``custom.visual_kd`` on (weight 0.7, merger + deepstack, mse); the student's LoRA (language model
    and aligner) is perturbed so both KD terms are > 0; LM heads of both scaled."""
    config = write_stage3_gkd_config(env.work / "configs")
    extra = (
        *ANCHOR_EXTRA,
        TEACHER_TYPE,
        # stage 3 with LoRA would use the base anchor; a different spelling of the same folder makes
        # ms-swift load a separate frozen copy, the mode these tests exercise.
        f"rlhf.teacher_model={env.model_dir}/",
        "custom.visual_kd.enabled=true",
        f"custom.visual_kd.weight={VISUAL_WEIGHT}",
    )
    built = build(config, env.overrides("visual", extra=extra))
    if not built.ready:
        trainer = built.trainer
        student = unwrap(trainer)
        scale_lm_head(student, LM_HEAD_SCALE)
        scale_lm_head(trainer.teacher_model, LM_HEAD_SCALE)
        # ms-swift trains the aligner of a LoRA run through LoRA adapters on its linears (all-linear with
        # freeze_aligner false), so perturbing every LoRA B moves the student's mergers too.
        assert perturb_lora(student, seed=1, scale=LORA_SCALE) > 0
        built.ready = True
    return built


def save_adapter(trainer, folder: Path) -> Path:
    """Save the trainer's (perturbed) LoRA adapter as a plain PEFT adapter folder."""
    if not (folder / "adapter_config.json").is_file():
        unwrap(trainer).save_pretrained(str(folder))
    return folder


def adapter_teacher_build(env: Env, adapter: Path) -> Built:
    """Stage-2 demo GKD whose teacher is the base plus a LoRA adapter (``rlhf.teacher_adapters``)."""
    extra = (*ANCHOR_EXTRA, TEACHER_TYPE, f"rlhf.teacher_adapters=[{adapter}]")
    return build(STAGE2_GKD_DEMO, env.overrides("teacher-adapter", extra=extra))


def copy_batch(batch: dict) -> dict:
    """Shallow copy deep enough for ms-swift's ``compute_loss``, which rewrites ``model_inputs`` keys."""
    return {key: dict(value) if isinstance(value, dict) else value for key, value in batch.items()}


def unwrap(trainer, model=None):
    return trainer.accelerator.unwrap_model(model if model is not None else trainer.model)


# --- making the student differ from the teacher --------------------------------------------------------


def perturb_lora(model, seed: int = 1, scale: float = 0.05) -> int:
    """Give every LoRA B matrix random values (they start at 0, i.e. student == base). Returns the count."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
                count += 1
    return count


# --- independent oracles -------------------------------------------------------------------------------


def forward_inputs(model_inputs: dict) -> dict:
    return {k: v for k, v in model_inputs.items() if k != "labels"}


def student_logits(trainer, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return trainer.model(**forward_inputs(batch["model_inputs"])).logits.float()


def teacher_logits(trainer, batch: dict) -> torch.Tensor:
    """The teacher's full logits: the separate teacher, or the student with its LoRA adapter disabled."""
    inputs = forward_inputs(batch["teacher_model_inputs"])
    with torch.no_grad():
        if trainer.teacher_model is not None:
            return trainer.teacher_model(**inputs).logits.float()
        with unwrap(trainer).disable_adapter():
            return trainer.model(**inputs).logits.float()


@dataclasses.dataclass
class TokenTerms:
    ce_sum: float  # summed token CE over supervised positions
    jsd_sum: float  # summed generalised JSD over supervised positions
    tokens: int

    @property
    def ce(self) -> float:
        return self.ce_sum / self.tokens

    @property
    def jsd(self) -> float:
        return self.jsd_sum / self.tokens


def token_terms(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, beta: float, temperature: float
) -> TokenTerms:
    """CE and JSD the way ms-swift's GKD computes them: logit t predicts token t + 1; -100 is masked;
    ``swift.rlhf_trainers.gkd_loss.jsd_loss`` on ``logits / temperature``; CE on raw logits; fp32 (as
    ms-swift; float64 doubles the cost on a vocabulary of 151,936 and changes nothing at rel 1e-5)."""
    from swift.rlhf_trainers.gkd_loss import jsd_loss

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    s = student[:, :-1][mask].float()
    t = teacher[:, :-1][mask].float()
    jsd_sum = jsd_loss(s / temperature, t / temperature, beta)
    ce_sum = F.cross_entropy(s, targets[mask], reduction="sum")
    return TokenTerms(float(ce_sum), float(jsd_sum), int(mask.sum()))


def batch_terms(trainer, batch: dict, beta: float | None = None, temperature: float | None = None):
    return token_terms(
        student_logits(trainer, batch),
        teacher_logits(trainer, batch),
        batch["model_inputs"]["labels"],
        trainer.beta if beta is None else beta,
        trainer.temperature if temperature is None else temperature,
    )


def ce_only(trainer, batch: dict) -> float:
    """Mean token CE of the student (no teacher involved)."""
    logits = student_logits(trainer, batch)
    targets = batch["model_inputs"]["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    return float(F.cross_entropy(logits[:, :-1][mask].float(), targets[mask]))


def merger_modules(model) -> dict:
    """``{"merger": visual.merger, "deepstack.i": visual.deepstack_merger_list[i]}`` found by name."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith("visual.merger"):
            found["merger"] = module
        parent, _, index = name.rpartition(".")
        if parent.endswith("visual.deepstack_merger_list") and index.isdigit():
            found[f"deepstack.{index}"] = module
    return found


class Recorder:
    """Forward hooks of our own (independent of the trainer's) that keep outputs and count calls."""

    def __init__(self, modules: dict) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name):
        def record(_module, _inputs, output):
            self.outputs[name].append(output[0] if isinstance(output, tuple) else output)

        return record

    def calls(self, name: str) -> int:
        return len(self.outputs[name])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _capture_logs_callback():
    from transformers import TrainerCallback

    class CaptureLogs(TrainerCallback):
        """First in line: keeps the logs dict every reporting callback receives."""

        logs: dict | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs = dict(logs)

    return CaptureLogs()


def log_now(trainer) -> dict:
    """``trainer.log({})`` as the training loop calls it; returns the logs dict as the reporting callbacks
    (TensorBoard, wandb, ms-swift's logging.jsonl writer) receive it. ``on_train_begin`` is sent first
    once, because ms-swift's progress callback needs it."""
    ensure_accelerator(trainer)
    capture = getattr(trainer, "_harness_log_capture", None)
    if capture is None:
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
        capture = _capture_logs_callback()
        trainer.callback_handler.callbacks.insert(0, capture)
        trainer._harness_log_capture = capture
    capture.logs = None
    trainer.log({})
    assert capture.logs is not None, "trainer.log did not reach the callbacks"
    return capture.logs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def step_records(path: Path) -> list[dict]:
    """The per-step training records of a ``logging.jsonl`` (not the end-of-run summary)."""
    return [r for r in read_jsonl(path) if "loss" in r and "train_runtime" not in r]
