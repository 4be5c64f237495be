"""The model under evaluation: a local checkpoint (and optional LoRA adapter) loaded through ms-swift.

Loading is the one place where evaluation touches weights; generation (:mod:`anchorkd.eval.generate`)
and text perplexity (:mod:`anchorkd.eval.text_eval`) take a :class:`LoadedModel`, so one checkpoint is
loaded once for all of them. Scoring and comparison never come here. ms-swift and torch are imported
when a model is loaded, not when this module is, so ``anchorkd --help`` stays fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anchorkd import swift_seam as seam
from anchorkd.errors import ConfigError

DEFAULT_MODEL_TYPE = "qwen3_vl"
"""ms-swift model type: cannot be inferred from a Qwen3-VL folder (qwen3_vl / _emb / _reranker match)."""

TORCH_DTYPES = ("float32", "bfloat16", "float16")
INFER_BACKENDS = seam.INFER_BACKENDS
DEFAULT_INFER_BACKEND = "transformers"
# Evaluation defaults, written once here for the ``anchorkd eval`` options and the functions behind them.
DEFAULT_EVAL_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 128  # greedy caption length limit of ``eval generate``


def require_checkpoint(path: str | Path, option: str = "--model") -> Path:
    """A local model checkpoint folder (with ``config.json``); ConfigError naming ``option`` otherwise.

    Evaluation runs offline, so a hub model id is not accepted: it would only fail later, less clearly.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(option, f"checkpoint not found: {folder}")
    if not (folder / "config.json").is_file():
        raise ConfigError(option, f"not a model checkpoint (no config.json): {folder}")
    return folder.resolve()


def require_adapter(path: str | Path, option: str = "--adapter") -> Path:
    """A LoRA adapter folder (with ``adapter_config.json``); ConfigError naming ``option`` otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(option, f"adapter not found: {folder}")
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(option, f"not a LoRA adapter (no adapter_config.json): {folder}")
    return folder.resolve()


@dataclass(frozen=True)
class PromptSettings:
    """A training run's template settings that change what the model sees, for generating as it trained.

    Without them the engine takes the checkpoint's own (its ``args.json`` when ms-swift wrote one).
    """

    template_type: str | None = None
    max_pixels: int | None = None
    system: str | None = None


@dataclass
class LoadedModel:
    """An ms-swift inference engine with its checkpoint (and optional adapter) applied."""

    engine: (
        Any  # swift.infer_engine.TransformersEngine / VllmEngine (imported lazily: ms-swift takes seconds)
    )
    model: Path
    adapter: Path | None
    model_type: str
    infer_backend: str = DEFAULT_INFER_BACKEND
    adapter_scale: float | None = None  # the LoRA contribution's factor (1.0 = as trained); None: no adapter

    def describe(self) -> dict[str, Any]:
        model = getattr(self.engine, "model", None)  # vLLM keeps its weights in worker processes
        return {
            "model": str(self.model),
            "adapter": str(self.adapter) if self.adapter else None,
            "adapter_scale": self.adapter_scale,
            "model_type": self.model_type,
            "infer_backend": self.infer_backend,
            "template": seam.template_type(self.engine.template),
            "dtype": str(getattr(model, "dtype", getattr(self.engine, "torch_dtype", None))).removeprefix(
                "torch."
            ),
            "device": str(getattr(model, "device", None)),
        }


def load_model(
    model: str | Path,
    adapter: str | Path | None = None,
    *,
    model_type: str = DEFAULT_MODEL_TYPE,
    torch_dtype: str | None = None,
    infer_backend: str = DEFAULT_INFER_BACKEND,
    prompt_settings: PromptSettings | None = None,
    adapter_scale: float | None = None,
) -> LoadedModel:
    """Load a checkpoint through ms-swift (its model loader, template and LoRA loading).

    ``torch_dtype`` is one of TORCH_DTYPES or None for the checkpoint's own dtype. ``infer_backend`` is
    one of INFER_BACKENDS: ms-swift's ``TransformersEngine`` or, where vLLM is installed, its
    ``VllmEngine`` (plain checkpoints only: merge an adapter first). ``adapter_scale`` multiplies the
    LoRA adapter's contribution (:func:`scale_lora_adapter`; None: as trained).
    """
    model_dir = require_checkpoint(model, "--model")
    adapter_dir = require_adapter(adapter, "--adapter") if adapter is not None else None
    if adapter_scale is not None:
        require_scalable_adapter(adapter_dir, adapter_scale)
    if torch_dtype is not None and torch_dtype not in TORCH_DTYPES:
        raise ConfigError("--torch-dtype", f"must be one of {', '.join(TORCH_DTYPES)}, got {torch_dtype!r}")
    require_infer_backend(infer_backend)
    if infer_backend == "vllm" and adapter_dir is not None:
        raise ConfigError(
            "--adapter",
            "the vllm backend generates with plain checkpoints: merge the adapter into the model "
            "(swift export --merge_lora true) or use --infer-backend transformers",
        )

    import torch

    prompt = prompt_settings or PromptSettings()
    engine = seam.infer_engine(
        infer_backend,
        str(model_dir),
        adapters=[str(adapter_dir)] if adapter_dir else None,
        model_type=model_type,
        torch_dtype=getattr(torch, torch_dtype) if torch_dtype else None,
        template_type=prompt.template_type,
    )
    if prompt_settings is not None:
        seam.configure_template(engine.template, max_pixels=prompt.max_pixels, system=prompt.system)
    if infer_backend == "transformers":
        engine.model.eval()
    if adapter_scale is not None and scale_lora_adapter(engine.model, adapter_scale) == 0:
        raise ConfigError(
            "--adapter-scale", f"the model has no LoRA layer to scale after loading {adapter_dir}"
        )
    return LoadedModel(
        engine=engine,
        model=model_dir,
        adapter=adapter_dir,
        model_type=model_type,
        infer_backend=infer_backend,
        adapter_scale=_applied_scale(adapter_dir, adapter_scale),
    )


def _applied_scale(adapter_dir: Path | None, adapter_scale: float | None) -> float | None:
    """The scale to record: None without an adapter, 1.0 for an adapter as trained."""
    if adapter_dir is None:
        return None
    return 1.0 if adapter_scale is None else float(adapter_scale)


def require_scalable_adapter(adapter_dir: Path | None, scale: float, option: str = "--adapter-scale") -> None:
    """ConfigError naming ``option`` unless ``scale`` (finite, >= 0) can interpolate ``adapter_dir``'s weights.

    That takes a plain LoRA adapter: with DoRA the trained magnitudes stay whatever the scale, and
    modules trained whole (``modules_to_save``, trainable tokens) are not scaled at all, so neither
    would move the weights between the base (scale 0) and the adapter (scale 1).
    """
    if not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
        raise ConfigError(option, f"must be a finite number >= 0, got {scale!r}")
    if adapter_dir is None:
        raise ConfigError(option, "scales a LoRA adapter: give one with --adapter")
    config_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(option, f"cannot read {config_path}: {error}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = (config.get("peft_type") or config.get("swift_type")) if isinstance(config, dict) else None
        raise ConfigError(
            option, f"{adapter_dir} is not a LoRA adapter ({kind or 'unknown type'}): nothing to scale"
        )
    if config.get("use_dora"):
        raise ConfigError(option, f"{adapter_dir} is a DoRA adapter: its trained magnitudes do not scale")
    whole = [key for key in ("modules_to_save", "trainable_token_indices") if config.get(key)]
    if whole:
        raise ConfigError(
            option,
            f"{adapter_dir} also trains whole modules ({', '.join(whole)}), which a LoRA scale leaves unscaled",
        )


def scale_lora_adapter(model: Any, scale: float) -> int:
    """Multiply the scaling of every LoRA layer of ``model`` by ``scale``; return how many layers.

    Each layer then adds ``scale * (alpha / r) * B @ A``: the adapter with its B matrices scaled, i.e. the
    weights interpolated between the base (0) and the trained adapter (1) as in WiSE-FT. PEFT's public
    ``LoraLayer.scale_layer`` does it for the active adapter.
    """
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        layer.scale_layer(scale)
    return len(layers)


def require_infer_backend(backend: str, option: str = "--infer-backend") -> str:
    """``backend`` when it is one of INFER_BACKENDS and installed here; ConfigError naming ``option`` otherwise."""
    if backend not in INFER_BACKENDS:
        raise ConfigError(option, f"must be one of {', '.join(INFER_BACKENDS)}, got {backend!r}")
    if not seam.infer_backend_installed(backend):
        raise ConfigError(
            option, f"{backend} is not installed in this environment: install it, or use transformers"
        )
    return backend


def as_loaded_model(
    model: str | Path | LoadedModel, adapter: str | Path | None = None, **load_options: Any
) -> LoadedModel:
    """``model`` if it is already loaded (then ``adapter`` must be None: it is applied), else load it."""
    if isinstance(model, LoadedModel):
        if adapter is not None:
            raise ConfigError("--adapter", "the model is already loaded; pass the adapter to load_model")
        if load_options.get("adapter_scale") is not None:
            raise ConfigError("--adapter-scale", "the model is already loaded; pass the scale to load_model")
        return model
    return load_model(model, adapter, **load_options)
