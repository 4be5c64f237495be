"""What a run's checkpoint folders tell before any weight is loaded: three rules ``check_run`` applies.

1. **LoRA targets.** ``tuner.target_modules`` / ``tuner.target_regex`` must name modules of ``model.model``
   that hold weights, as PEFT matches them: a ``target_modules`` entry matches a module whose name is the
   entry or ends in ``.<entry>``; ``target_regex`` must match a whole module name. An entry that matches
   nothing is refused even next to others that match (PEFT would skip it silently); one that names a module
   without weights of its own (``mlp``, ``act_fn``) is refused too (PEFT fails on it after loading).
   ms-swift's ``all-linear`` / ``all-embedding`` are left to ms-swift, except two cases that fail or do
   nothing after loading on a multimodal model: ``all-linear`` with ``freeze_llm``, ``freeze_vit`` and
   ``freeze_aligner`` all true, and other entries next to ``all-linear`` (ms-swift drops them).
   The module names come from the safetensors headers and, where transformers has the checkpoint's
   architecture class, from that class built on the ``meta`` device from config.json (no memory, no
   weights; it gives the names after transformers' own key renames and the tied LM head). A target is
   refused only when it fits neither source.
2. **Model type.** ``model.model_type`` (and ``rlhf.teacher_model_type``) must be a type of ms-swift's
   registry that loads the checkpoint's architecture (config.json ``architectures[0]``; the same model
   family with another head, ``...ForSequenceClassification`` for ``...ForCausalLM``, is accepted).
3. **Resume.** A resume goes on with what the checkpoint was trained with (ms-swift loads its adapter with
   the adapter's own rank, alpha and targets), so the config must say the same: base model, tuner type,
   LoRA rank / alpha / dropout / bias / DoRA / rsLoRA, targets, ``modules_to_save``, ``target_parameters``
   and, where they choose the trained modules (full tuning, ``all-linear``), the freeze flags. Each
   difference is refused naming the key, the checkpoint's value (``adapter_config.json`` for the adapter's
   shapes, ms-swift's ``args.json`` for the rest) and the config's.

Only checkpoint-local folders are read (a hub id is left to ms-swift). Errors are ``ConfigError`` naming the
key path (several at once as ``ConfigErrors``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .checkpoints import RESUME_KEY, RecordedTraining, recorded_training, resume_plan, safetensors_shapes
from .errors import AnchorKDError, ConfigError, ConfigErrors
from .io import read_json_object

logger = logging.getLogger("anchorkd")

# ms-swift tuner types whose adapter is placed by ``target_modules`` (swift.pipelines.train.tuner.prepare_adapter).
TARGET_MODULE_TUNERS = frozenset({"lora", "longlora", "adalora", "vera", "boft", "fourierft", "bone"})
# Tuner types that build a PEFT LoRA adapter from lora_rank, lora_alpha, ...
LORA_TUNERS = frozenset({"lora", "longlora"})
ALL_LINEAR, ALL_EMBEDDING = "all-linear", "all-embedding"  # ms-swift's special target_modules values
SPECIAL_TARGETS = frozenset({ALL_LINEAR, ALL_EMBEDDING})
FREEZE_FLAGS = ("freeze_llm", "freeze_vit", "freeze_aligner")
_REGEX_CHARACTERS = re.compile(r"[\\*+?\[\](){}|^$]")
_EXAMPLES = 3
_NEW_RUN = "or start a new run (another training.output_dir, or no training.resume_from_checkpoint)"


def check_checkpoint_rules(config) -> None:
    """Apply the three rules to a resolved config (``ResolvedConfig``); raise ConfigError / ConfigErrors."""
    errors = [*model_type_errors(config), *target_module_errors(config), *resume_differences(config)]
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)


# --- config values ---------------------------------------------------------------------------------------


def _setting(config, section: str, key: str) -> Any:
    """The value the run will use: the config's, else ms-swift's dataclass default."""
    values = config.sections.get(section, {})
    if key in values:
        return values[key]
    from .swift_seam import arguments_classes

    sft_cls, rlhf_cls = arguments_classes()
    for field in dataclasses.fields(rlhf_cls if config.mode != "sft" else sft_cls):
        if field.name == key:
            if field.default is not dataclasses.MISSING:
                return field.default
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
    return None


def _local_checkpoint(value: Any) -> Path | None:
    """The folder ``value`` names when it is a local checkpoint with a config.json (None: a hub id, ...)."""
    if not value:
        return None
    folder = Path(str(value)).expanduser()
    return folder if (folder / "config.json").is_file() else None


def _architecture(folder: Path) -> str | None:
    architectures = read_json_object(folder / "config.json").get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return None


# --- 2. model type ---------------------------------------------------------------------------------------


def model_type_errors(config) -> list[ConfigError]:
    pairs = [("model.model_type", "model.model")]
    if config.mode == "gkd":
        pairs.append(("rlhf.teacher_model_type", "rlhf.teacher_model"))
    errors = []
    for type_key, model_key in pairs:
        type_section, type_name = type_key.split(".")
        model_section, model_name = model_key.split(".")
        model_type = config.sections[type_section].get(type_name)
        folder = _local_checkpoint(config.sections[model_section].get(model_name))
        if model_type and folder is not None:
            error = _model_type_error(type_key, str(model_type), folder)
            if error is not None:
                errors.append(error)
    return errors


def _family(architecture: str) -> str:
    """The model family of an HF architecture name: ``Qwen3VL`` for ``Qwen3VLForConditionalGeneration``."""
    return re.match(r"(.+?)(?:For[A-Z]\w*|LMHeadModel|Model)?$", architecture).group(1)


def _model_type_error(key: str, model_type: str, folder: Path) -> ConfigError | None:
    from .swift_seam import registered_model_types

    registry = registered_model_types()
    architecture = _architecture(folder)
    fitting = sorted(t.name for t in registry.values() if architecture in t.architectures)
    fits = f"; model types for this checkpoint: {', '.join(fitting)}" if fitting else ""
    if model_type not in registry:
        close = difflib.get_close_matches(model_type, list(registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return ConfigError(key, f"{model_type!r} is not a model type of ms-swift{hint}{fits}")
    accepted = registry[model_type].architectures
    if architecture is None or not accepted or architecture in accepted:
        return None
    if _family(architecture) in {_family(name) for name in accepted}:
        return None  # the same model with another head (ms-swift loads it by task_type)
    return ConfigError(
        key,
        f"{model_type!r} does not fit {folder}: its config.json says {architecture}, and ms-swift's "
        f"{model_type} loads {', '.join(accepted)}"
        + (fits or "; no model type of ms-swift lists this architecture"),
    )


# --- 1. LoRA targets -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointModules:
    """Module names of a checkpoint's model: every module (containers too) and those holding weights."""

    names: frozenset[str]
    with_weights: frozenset[str]

    def weight_examples(self) -> str:
        """The distinct last parts of the names of modules with weights, and one full name."""
        short = sorted({name.rsplit(".", 1)[-1] for name in self.with_weights})
        shown = ", ".join(short[:30]) + (f", ... ({len(short)} in all)" if len(short) > 30 else "")
        example = min((n for n in self.with_weights if n.endswith(".q_proj")), default=min(self.with_weights))
        return f"its modules with weights end in {shown} (e.g. {example})"

    def closest(self, target: str) -> list[str]:
        short = {name.rsplit(".", 1)[-1] for name in self.with_weights}
        return difflib.get_close_matches(target.rsplit(".", 1)[-1], sorted(short), n=3)


def checkpoint_modules(folder: Path) -> CheckpointModules | None:
    """The module names of ``folder``'s model, from the safetensors headers and the meta-device model tree;
    None when neither source gives any. ValueError names a weights file whose header cannot be read."""
    names: set[str] = set()
    with_weights: set[str] = set()
    for tensor in safetensors_shapes(folder):
        owner = tensor.rpartition(".")[0]
        if owner:
            with_weights.add(owner)
            parts = owner.split(".")
            names.update(".".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    hf_config = read_json_object(folder / "config.json")
    text_config = hf_config.get("text_config") or {}
    if with_weights and (hf_config.get("tie_word_embeddings") or text_config.get("tie_word_embeddings")):
        with_weights.add("lm_head")  # a tied LM head is not saved: it is the input embedding
        names.add("lm_head")
    tree = _meta_model_tree(folder)
    if tree is not None:
        names |= tree.names
        with_weights |= tree.with_weights
    if not with_weights:
        return None
    return CheckpointModules(frozenset(names), frozenset(with_weights))


def _meta_model_tree(folder: Path) -> CheckpointModules | None:
    """The module tree of transformers' class for the checkpoint's architecture, built on the meta device
    (no memory, no weights). None where transformers has no such class (remote code) or cannot build it:
    the headers are then the only source."""
    architecture = _architecture(folder)
    if architecture is None:
        return None
    import torch
    import transformers

    model_cls = getattr(transformers, architecture, None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
        return None
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = model_cls(hf_config)
    except Exception as exc:  # noqa: BLE001 (a second source of names; the headers remain)
        logger.debug("module tree of %s not built on the meta device: %s", folder, exc)
        return None
    names, with_weights = set(), set()
    for name, module in model.named_modules():
        if name:
            names.add(name)
            if next(module.parameters(recurse=False), None) is not None:
                with_weights.add(name)
    return CheckpointModules(frozenset(names), frozenset(with_weights))


def target_module_errors(config) -> list[ConfigError]:
    tuner = config.sections["tuner"]
    tuner_type = _setting(config, "tuner", "tuner_type")
    if (
        tuner_type not in TARGET_MODULE_TUNERS
        or tuner.get("adapters")  # ms-swift trains the given adapter: its own targets
        or resume_plan(config) is not None  # the checkpoint's adapter: rule 3 compares its targets
        or _setting(config, "tuner", "tuner_backend") != "peft"
        or _setting(config, "tuner", "use_swift_lora")
    ):
        return []
    folder = _local_checkpoint(config.sections["model"].get("model"))
    if folder is None:
        return []
    try:
        modules = checkpoint_modules(folder)
    except AnchorKDError:  # config.json not JSON: the DataError names the file
        raise
    except ValueError as exc:  # a weights file whose header cannot be read
        raise ConfigError("model.model", str(exc)) from None
    if modules is None:
        return []
    regex = tuner.get("target_regex")
    if regex:
        return _regex_errors(str(regex), modules, folder)
    targets = [str(t) for t in _setting(config, "tuner", "target_modules") or []]
    if ALL_LINEAR in targets:
        multimodal = _multimodal(config, folder)
        if multimodal is None:
            return []  # what all-linear means is settled by ms-swift's model type at load time
        if multimodal:
            return _multimodal_all_linear_errors(config, targets)
    errors = []
    for index, target in enumerate(targets):
        if target not in SPECIAL_TARGETS:
            error = _entry_error(f"tuner.target_modules[{index}]", target, modules, folder)
            if error is not None:
                errors.append(error)
    return errors


def _multimodal(config, folder: Path) -> bool | None:
    """Whether ms-swift loads the student as a multimodal model (its model type's flag); None if unknown."""
    from .swift_seam import registered_model_types

    registry = registered_model_types()
    model_type = config.sections["model"].get("model_type")
    if model_type in registry:
        return registry[model_type].multimodal
    architecture = _architecture(folder)
    kinds = {t.multimodal for t in registry.values() if architecture in t.architectures}
    return kinds.pop() if len(kinds) == 1 else None


def _multimodal_all_linear_errors(config, targets: list[str]) -> list[ConfigError]:
    errors = []
    if all(_setting(config, "tuner", flag) for flag in FREEZE_FLAGS):
        errors.append(
            ConfigError(
                "tuner.target_modules",
                "all-linear on a multimodal model puts LoRA on the parts that tuner.freeze_llm, "
                "tuner.freeze_vit and tuner.freeze_aligner leave open, and all three are true: set one of "
                "them false (freeze_llm: false for the language model), or list the modules",
            )
        )
    ignored = [t for t in targets if t not in SPECIAL_TARGETS]
    if ignored:
        errors.append(
            ConfigError(
                "tuner.target_modules",
                f"ms-swift ignores {', '.join(ignored)} next to all-linear on a multimodal model (all-linear "
                "becomes one pattern over the parts the freeze flags leave open): list the modules without "
                "all-linear, or leave those entries out",
            )
        )
    return errors


def _entry_error(key: str, target: str, modules: CheckpointModules, folder: Path) -> ConfigError | None:
    """PEFT's rule for a ``target_modules`` list: the module's name is the entry or ends in ``.<entry>``."""
    hits = [name for name in modules.names if name == target or name.endswith(f".{target}")]
    return _hits_error(key, repr(target), hits, modules, folder, _regex_hint(target, modules))


def _regex_hint(target: str, modules: CheckpointModules) -> str:
    if not _REGEX_CHARACTERS.search(target):
        return ""
    try:
        pattern = re.compile(target)
    except re.error:
        return ""
    if any(pattern.fullmatch(name) for name in modules.with_weights):
        return (
            "; as a regular expression it would match: target_modules entries are names (matched against "
            "the end of module names), a regular expression goes in tuner.target_regex"
        )
    return ""


def _regex_errors(regex: str, modules: CheckpointModules, folder: Path) -> list[ConfigError]:
    """PEFT's rule for a string target (ms-swift passes ``target_regex`` as one): a full match of the name."""
    key = "tuner.target_regex"
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        return [ConfigError(key, f"{regex!r} is not a valid regular expression ({exc})")]
    hits = [name for name in modules.names if pattern.fullmatch(name)]
    hint = "; it must match a module's whole name"
    error = _hits_error(key, repr(regex), hits, modules, folder, hint)
    return [error] if error is not None else []


def _hits_error(
    key: str, shown: str, hits: list[str], modules: CheckpointModules, folder: Path, hint: str
) -> ConfigError | None:
    without_weights = sorted(name for name in hits if name not in modules.with_weights)
    if hits and not without_weights:
        return None
    if without_weights:
        examples = ", ".join(without_weights[:_EXAMPLES])
        examples += ", ..." if len(without_weights) > _EXAMPLES else ""
        return ConfigError(
            key,
            f"{shown} names modules of {folder} that hold no weights of their own ({examples}), which LoRA "
            f"cannot wrap: name the layers inside them; {modules.weight_examples()}",
        )
    close = modules.closest(shown.strip("'\""))
    did_you_mean = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(
        key, f"{shown} matches no module of {folder}{did_you_mean}{hint}; {modules.weight_examples()}"
    )


# --- 3. resume -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Difference:
    key: str
    configured: Any
    recorded: Any
    source: Path


def resume_differences(config) -> list[ConfigError]:
    """One ConfigError per setting the resumed checkpoint was trained with otherwise than the config says."""
    plan = resume_plan(config)
    if plan is None:
        return []
    recorded = recorded_training(plan.checkpoint)
    return [_difference_error(d, plan.checkpoint) for d in _differences(config, recorded)]


def _differences(config, recorded: RecordedTraining) -> Iterable[Difference]:
    args, args_file = recorded.swift_args, recorded.swift_args_file
    adapter, adapter_file = recorded.adapter_config, recorded.adapter_config_file
    lora_adapter = adapter.get("peft_type") == "LORA"
    tuner_type = str(_setting(config, "tuner", "tuner_type"))
    if args:
        recorded_type = args.get("tuner_type")
    else:  # PEFT's adapter type: LORA for both of ms-swift's lora and longlora
        peft_type = str(adapter.get("peft_type") or "").lower() or None
        recorded_type = tuner_type if lora_adapter and tuner_type in LORA_TUNERS else peft_type

    model = config.sections["model"].get("model")
    if args:
        recorded_models = [str(m) for m in (args.get("model_dir"), args.get("model")) if m]
    else:
        recorded_models = [str(m) for m in (adapter.get("base_model_name_or_path"),) if m]
    if model and recorded_models and not _same_model(str(model), recorded_models):
        yield Difference("model.model", model, recorded_models[-1], args_file or adapter_file)

    model_type = config.sections["model"].get("model_type")
    if model_type and args.get("model_type") and model_type != args["model_type"]:
        yield Difference("model.model_type", model_type, args["model_type"], args_file)

    if recorded_type and recorded_type != tuner_type:
        yield Difference("tuner.tuner_type", tuner_type, recorded_type, args_file or adapter_file)
        return  # the other settings belong to another kind of training

    if tuner_type in LORA_TUNERS:
        for key, adapter_key in (
            ("lora_rank", "r"),
            ("lora_alpha", "lora_alpha"),
            ("lora_dropout", "lora_dropout"),
            ("lora_bias", "bias"),
            ("use_dora", "use_dora"),
            ("use_rslora", "use_rslora"),
        ):
            # The adapter's own file says how it was built (args.json of a run resumed before this rule
            # existed may say otherwise); args.json for checkpoints without one.
            if lora_adapter and adapter_key in adapter:
                value, source = adapter[adapter_key], adapter_file
            elif key in args:
                value, source = args[key], args_file
            else:
                continue
            configured = _setting(config, "tuner", key)
            if not _same(configured, value):
                yield Difference(f"tuner.{key}", configured, value, source)

    targets = _configured_targets(config)
    if tuner_type != "full":
        if args:
            recorded_targets = args.get("target_regex") or args.get("target_modules")
        elif isinstance(targets, str) or not SPECIAL_TARGETS & set(targets):
            # Without args.json only PEFT's resolved names / pattern are known: comparable with explicit ones.
            recorded_targets = adapter.get("target_modules")
        else:
            recorded_targets = None
        if recorded_targets is not None and not _same(targets, recorded_targets):
            key = "tuner.target_regex" if isinstance(targets, str) else "tuner.target_modules"
            yield Difference(key, targets, recorded_targets, args_file or adapter_file)
        for key in ("modules_to_save", "target_parameters"):
            if key in args and not _same(_setting(config, "tuner", key), args[key]):
                yield Difference(f"tuner.{key}", _setting(config, "tuner", key), args[key], args_file)

    if tuner_type == "full" or (isinstance(targets, list) and ALL_LINEAR in targets):
        for flag in FREEZE_FLAGS:
            if flag in args and not _same(_setting(config, "tuner", flag), args[flag]):
                yield Difference(f"tuner.{flag}", _setting(config, "tuner", flag), args[flag], args_file)


def _configured_targets(config) -> str | list[str]:
    """What ms-swift targets: ``target_regex`` when set (it replaces ``target_modules``), else the list."""
    regex = config.sections["tuner"].get("target_regex")
    return str(regex) if regex else [str(t) for t in _setting(config, "tuner", "target_modules") or []]


def _same(configured: Any, recorded: Any) -> bool:
    empty = (None, "", [], ())
    if configured in empty and recorded in empty:
        return True
    if isinstance(configured, list | tuple) and isinstance(recorded, list | tuple):
        return {str(v) for v in configured} == {str(v) for v in recorded}  # PEFT keeps targets as a set
    if isinstance(configured, bool) or isinstance(recorded, bool):
        return configured is recorded
    if isinstance(configured, int | float) and isinstance(recorded, int | float):
        return float(configured) == float(recorded)
    return configured == recorded


def _same_model(configured: str, recorded: list[str]) -> bool:
    """The same base checkpoint: the same path, or the same folder reached another way. A recorded folder
    that no longer exists cannot be compared (a model moved since): that is not counted as a difference."""
    here = Path(configured).expanduser()
    for value in recorded:
        there = Path(value).expanduser()
        if configured == value or here.resolve() == there.resolve():
            return True
        if here.exists() and there.exists() and os.path.samefile(here, there):
            return True
    if not any(Path(value).expanduser().exists() for value in recorded):
        logger.warning(
            "%s: the checkpoint's base model %s no longer exists there; cannot compare it with model.model %s",
            RESUME_KEY,
            recorded[-1],
            configured,
        )
        return True
    return False


def _as_override(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _difference_error(difference: Difference, checkpoint: Path) -> ConfigError:
    return ConfigError(
        difference.key,
        f"{_as_override(difference.configured)} here, but the checkpoint {checkpoint} was trained with "
        f"{_as_override(difference.recorded)} ({difference.source.name}): a resume goes on as the checkpoint "
        f"was trained; set {difference.key}={_as_override(difference.recorded)} to resume it, {_NEW_RUN}",
    )
