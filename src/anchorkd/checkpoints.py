"""Which checkpoint a run resumes from: complete checkpoints, ``resume_from_checkpoint: auto``, the resume plan.

HF's ``Trainer._save_checkpoint`` writes, in this order: the weights (``save_model``), optimizer and
scheduler, scaler, the RNG state (``rng_state.pth``, one ``rng_state_<rank>.pth`` per rank under
torchrun), and *last* ``trainer_state.json`` (rank 0); ms-swift then waits for every rank and points
``<run>/last-checkpoint`` at the new folder. So a checkpoint is **complete** when ``trainer_state.json``
parses and records the folder's step, the weights and (unless only the model is resumed) the optimizer,
scheduler and RNG files are there and non-empty, and ms-swift's ``last-checkpoint`` link, where it
exists, does not point at an older step (a save that rank 0 finished while another rank was still
writing). A kill during a save leaves a folder that fails one of these checks; it is never picked.

``training.resume_from_checkpoint`` takes a checkpoint folder, or ``auto``: the newest complete
checkpoint in ``training.output_dir`` (its newest ``v<N>-<time>`` run folder that has one, else the folder
itself); ``auto`` with none found starts a fresh run. A resume continues the run in the checkpoint's own
folder (never a new ``v<N>-<time>`` one): :func:`with_resume` rewrites the ``training`` section for
ms-swift, and ``anchorkd.trainers.resume`` prepares the folder and the trainer.

Below the resume: what a checkpoint folder records, read without its weights (safetensors headers, ms-swift's
``args.json``, PEFT's ``adapter_config.json``), for ``anchorkd.checkpoint_rules``.

Reads files only; only the standard library, :mod:`anchorkd.errors`, :mod:`anchorkd.io` and the seam's
constants are imported, so the config loader can call it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .swift_seam import LAST_CHECKPOINT_LINK

logger = logging.getLogger("anchorkd")

RESUME_KEY = "training.resume_from_checkpoint"
AUTO = "auto"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
VERSION_DIR_NAME = re.compile(r"^v(\d+)-")  # ms-swift's add_version folders: v<N>-<YYYYmmdd-HHMMSS>

# Files a checkpoint's model may be saved as (PEFT adapter, full model, sharded full model).
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
_SCHEDULER_FILE = "scheduler.pt"
_RNG_FILE = "rng_state.pth"
_RNG_RANK_FILE = re.compile(r"^rng_state_(\d+)\.pth$")


# --- which checkpoints exist, and which are complete ---------------------------------------------------


def checkpoint_step(checkpoint: str | Path) -> int | None:
    """The step in a ``checkpoint-<step>`` folder name, or None for any other name."""
    match = CHECKPOINT_NAME.match(Path(checkpoint).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders directly in ``run_dir``, by step (complete or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p))


def read_trainer_state(checkpoint: str | Path) -> dict | None:
    """The checkpoint's ``trainer_state.json`` as a dict, or None when it is missing or cut short."""
    path = Path(checkpoint) / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _non_empty_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _deepspeed_state(checkpoint: Path) -> bool:
    """DeepSpeed's own checkpoint (``global_step<N>/`` with weights and optimizer shards)."""
    return any(p.is_dir() and p.name.startswith("global_step") for p in checkpoint.iterdir())


def _has_weights(checkpoint: Path) -> bool:
    if any(_non_empty_file(checkpoint / name) for name in _WEIGHT_FILES):
        return True
    for name in _WEIGHT_INDEX_FILES:
        index = checkpoint / name
        if _non_empty_file(index):
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            return bool(shards) and all(_non_empty_file(checkpoint / shard) for shard in shards)
    # ZeRO-3 without gathered 16-bit weights keeps them in DeepSpeed's folder; FSDP in its own.
    return _deepspeed_state(checkpoint) or any(
        p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir()
    )


def _has_optimizer(checkpoint: Path) -> bool:
    return (
        any(_non_empty_file(checkpoint / name) for name in _OPTIMIZER_FILES)
        or (checkpoint / "optimizer_0").is_dir()  # FSDP sharded optimizer state
        or _deepspeed_state(checkpoint)
    )


def _missing_rng_files(checkpoint: Path) -> list[str]:
    if _non_empty_file(checkpoint / _RNG_FILE):
        return []
    ranks = {}
    for path in checkpoint.iterdir():
        match = _RNG_RANK_FILE.match(path.name)
        if match:
            ranks[int(match.group(1))] = _non_empty_file(path)
    if not ranks:
        return [f"the RNG state ({_RNG_FILE}, or rng_state_<rank>.pth per rank)"]
    # The number of ranks is not recorded anywhere else: a gap below the highest rank is what can be seen.
    return [f"rng_state_{rank}.pth" for rank in range(max(ranks) + 1) if not ranks.get(rank)]


def _newer_than_last_link(checkpoint: Path, step: int) -> str | None:
    """ms-swift moves ``last-checkpoint`` only after every rank has finished saving."""
    link = checkpoint.parent / LAST_CHECKPOINT_LINK
    if not link.is_symlink():
        return None
    target = link.resolve()
    target_step = checkpoint_step(target)
    if not target.is_dir() or target_step is None:
        return None  # a link left dangling (its checkpoint rotated away or superseded) says nothing
    if target_step < step:
        return (
            f"the end of the save on every rank ({LAST_CHECKPOINT_LINK} points at {target.name}, "
            "so this save did not finish)"
        )
    return None


def missing_checkpoint_parts(checkpoint: str | Path, *, model_only: bool = False) -> list[str]:
    """What ``checkpoint`` lacks to be resumed from (empty: complete); see the module docstring.

    ``model_only`` (ms-swift's ``resume_only_model``) needs the weights and the trainer state only.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return ["the checkpoint folder itself"]
    missing = []
    state = read_trainer_state(checkpoint)
    step = checkpoint_step(checkpoint)
    if state is None:
        missing.append(f"{TRAINER_STATE_FILE} (HF writes it last: the save did not finish)")
    elif step is not None and state.get("global_step") != step:
        missing.append(f"{TRAINER_STATE_FILE} of step {step} (it records step {state.get('global_step')})")
    if not _has_weights(checkpoint):
        missing.append("the model weights (" + " / ".join(_WEIGHT_FILES) + ")")
    if not model_only:
        if not _has_optimizer(checkpoint):
            missing.append("the optimizer state (" + " / ".join(_OPTIMIZER_FILES) + ")")
        if not _non_empty_file(checkpoint / _SCHEDULER_FILE) and not _deepspeed_state(checkpoint):
            missing.append(_SCHEDULER_FILE)
        missing += _missing_rng_files(checkpoint)
    if step is None and state is not None:
        step = state.get("global_step")
    if isinstance(step, int):
        unfinished = _newer_than_last_link(checkpoint, step)
        if unfinished:
            missing.append(unfinished)
    return missing


def is_complete_checkpoint(checkpoint: str | Path, *, model_only: bool = False) -> bool:
    return not missing_checkpoint_parts(checkpoint, model_only=model_only)


def run_dirs(output_dir: str | Path) -> list[Path]:
    """Where a run under ``output_dir`` keeps its checkpoints, newest first: ms-swift's ``v<N>-<time>``
    folders by decreasing ``N``, then ``output_dir`` itself (runs with ``add_version: false``)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    versions = [p for p in output_dir.iterdir() if p.is_dir() and VERSION_DIR_NAME.match(p.name)]
    versions.sort(key=lambda p: (int(VERSION_DIR_NAME.match(p.name).group(1)), p.name), reverse=True)
    return [*versions, output_dir]


def newest_complete_checkpoint(output_dir: str | Path, *, model_only: bool = False) -> Path | None:
    """The highest-step complete checkpoint of the newest run folder under ``output_dir`` that has one."""
    for run_dir in run_dirs(output_dir):
        for checkpoint in reversed(list_checkpoints(run_dir)):
            if is_complete_checkpoint(checkpoint, model_only=model_only):
                return checkpoint
    return None


def resolve_resume_checkpoint(
    value: str | Path | None, output_dir: str | Path | None, *, model_only: bool = False
) -> Path | None:
    """The checkpoint ``training.resume_from_checkpoint: value`` resumes from, as an absolute path.

    ``None`` / ``""``: no resume. ``auto``: the newest complete checkpoint under
    ``output_dir``, or None when there is none (a fresh run). A path: that folder, which must be a
    complete checkpoint. Reads only; raises :class:`ConfigError` naming ``training.resume_from_checkpoint``
    and what is missing.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        if not output_dir:
            raise ConfigError(RESUME_KEY, f"{AUTO} looks in training.output_dir, which is not set")
        found = newest_complete_checkpoint(Path(output_dir).expanduser(), model_only=model_only)
        if found is None:
            logger.info(
                "resume_from_checkpoint: auto found no complete checkpoint in %s: a fresh run", output_dir
            )
            return None
        return found.resolve()
    checkpoint = Path(str(value)).expanduser()
    if not checkpoint.exists():
        raise ConfigError(
            RESUME_KEY, f"checkpoint not found: {checkpoint}" + _hint(checkpoint.parent, model_only)
        )
    missing = missing_checkpoint_parts(checkpoint, model_only=model_only)
    if missing:
        raise ConfigError(
            RESUME_KEY,
            f"{checkpoint} is not a complete checkpoint (a kill during a save leaves one half-written): "
            f"missing {'; '.join(missing)}" + _hint(checkpoint.parent, model_only),
        )
    return checkpoint.resolve()


def _hint(run_dir: Path, model_only: bool) -> str:
    best = newest_complete_checkpoint(run_dir, model_only=model_only) if run_dir.is_dir() else None
    if best is not None:
        return f". The newest complete checkpoint there is {best}; or set {AUTO}"
    return f". Set {AUTO} to resume from the newest complete checkpoint in training.output_dir"


# --- the run a resume continues ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePlan:
    """A resume from ``checkpoint`` (at ``step``); ``continues_run`` unless only the weights carry over."""

    checkpoint: Path
    step: int
    continues_run: bool = True

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent

    def swift_overrides(self) -> dict[str, Any]:
        """``training`` keys for ms-swift: the checkpoint, and (continuing) the run's own folder."""
        overrides: dict[str, Any] = {"resume_from_checkpoint": str(self.checkpoint)}
        if self.continues_run:
            overrides.update(output_dir=str(self.run_dir), add_version=False)
        return overrides


def plan_resume(
    value: str | Path | None,
    output_dir: str | Path | None,
    *,
    resume_only_model: bool = False,
    ignore_data_skip: bool = False,
) -> ResumePlan | None:
    """:func:`resolve_resume_checkpoint` plus what the resume means for the run folder.

    With ``resume_only_model`` and ``ignore_data_skip`` ms-swift starts again at step 0 from the weights
    alone: a new run (in a new folder), not a continuation.
    """
    checkpoint = resolve_resume_checkpoint(value, output_dir, model_only=resume_only_model)
    if checkpoint is None:
        return None
    step = checkpoint_step(checkpoint)
    if step is None:
        step = int((read_trainer_state(checkpoint) or {}).get("global_step", 0))
    return ResumePlan(checkpoint, step, continues_run=not (resume_only_model and ignore_data_skip))


def resume_plan(config: Any) -> ResumePlan | None:
    """:func:`plan_resume` for the ``training`` section of a resolved config (``ResolvedConfig``)."""
    training = config.sections["training"]
    return plan_resume(
        training.get("resume_from_checkpoint"),
        training.get("output_dir"),
        resume_only_model=bool(training.get("resume_only_model")),
        ignore_data_skip=bool(training.get("ignore_data_skip")),
    )


def with_resume(config: Any) -> Any:
    """``config`` (a ``ResolvedConfig``) with its ``training.resume_from_checkpoint`` resolved for ms-swift.

    Resuming: ``resume_from_checkpoint`` becomes the checkpoint's absolute path and, for a continuation,
    ``output_dir`` its run folder with ``add_version: false``. ``auto`` with nothing to resume drops the
    key (a fresh run). Reads only; :class:`ConfigError` before anything is written. Idempotent.
    """
    plan = resume_plan(config)
    training = dict(config.sections["training"])
    if plan is None:
        if "resume_from_checkpoint" not in training:
            return config
        training.pop("resume_from_checkpoint")
    else:
        training.update(plan.swift_overrides())
    return dataclasses.replace(config, sections={**config.sections, "training": training})


# --- what a checkpoint folder records, without reading weights ----------------------------------------

SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
SWIFT_ARGS_FILE = "args.json"  # ms-swift's record of a run's arguments, in the run folder and each checkpoint
# A safetensors file starts with the byte length of its JSON header (8 bytes, little-endian), then the header.
_HEADER_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 100_000_000  # the format's own limit


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, offsets; ``__metadata__``).

    Reads only the header bytes. Raises ValueError naming ``path`` when the file is not safetensors."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(_HEADER_LENGTH_BYTES), "little")
            if not 0 < length <= min(_MAX_HEADER_BYTES, path.stat().st_size - _HEADER_LENGTH_BYTES):
                raise ValueError(f"{path}: not a safetensors file (header length {length})")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


def safetensors_shapes(folder: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape for a model folder's weights: the shards its index names, else every
    ``*.safetensors`` file but a PEFT adapter's. Headers only; empty when the folder has no safetensors.
    Raises ValueError naming the file that is unreadable."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (no weight_map of tensor -> file)") from None
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors")) if p.name != ADAPTER_WEIGHTS_FILE]
    shapes: dict[str, list[int]] = {}
    for name in files:
        for tensor, entry in safetensors_header(folder / name).items():
            if tensor != "__metadata__" and isinstance(entry, dict):
                shapes[tensor] = list(entry.get("shape", []))
    return shapes


@dataclass(frozen=True)
class RecordedTraining:
    """What a checkpoint's own files say it was trained with: ms-swift's ``args.json`` (the checkpoint's, else
    its run folder's) and PEFT's ``adapter_config.json`` (LoRA checkpoints). Empty dicts where a file is absent."""

    swift_args: dict[str, Any]
    swift_args_file: Path | None
    adapter_config: dict[str, Any]
    adapter_config_file: Path | None


def recorded_training(checkpoint: str | Path) -> RecordedTraining:
    """Read :class:`RecordedTraining` for ``checkpoint``; DataError naming the file when one is not JSON."""
    from .io import read_json_object

    checkpoint = Path(checkpoint)
    args_file = next(
        (p for p in (checkpoint / SWIFT_ARGS_FILE, checkpoint.parent / SWIFT_ARGS_FILE) if p.is_file()), None
    )
    adapter_file = checkpoint / ADAPTER_CONFIG_FILE
    adapter_file = adapter_file if adapter_file.is_file() else None
    return RecordedTraining(
        read_json_object(args_file) if args_file else {},
        args_file,
        read_json_object(adapter_file) if adapter_file else {},
        adapter_file,
    )
