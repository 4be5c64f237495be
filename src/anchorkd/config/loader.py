"""``ConfigLoader``: YAML (+ overlays + overrides) -> validated config -> ``RunSettings``.

Order of work, so that nothing is written and no model is loaded for a config that cannot run:
1. read the file and its ``extends`` chain, apply ``a.b=value`` overrides;
2. check sections and keys (ms-swift keys against ms-swift's dataclasses, ours with pydantic);
3. every rule of ``rules.RULES`` (ranges, teacher required for KD, unsupported combinations, ...);
4. derive the run mode; check that model/teacher/adapter checkpoints exist and that the output folders
   can be written (without creating them);
5. only then construct ``SftArguments`` / ``RLHFArguments`` (which creates the output dir), with
   ``rlhf.llm_kd_weight`` popped before the constructor and re-attached with ``setattr`` (a mirror for
   ms-swift users; anchorkd itself reads ``RunSettings.anchor``).
Data files and teacher/student compatibility are checked above this package (``anchorkd.checks``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..checkpoints import with_resume
from ..errors import ConfigError, ConfigErrors
from . import swift_keys
from .rules import ConfigDraft, LaunchEnvironment, check_rules
from .schema import (
    AnchorPromptsConfig,
    AnchorRlhfKnobs,
    CustomConfig,
    VisualKDConfig,
    default_teacher_targets_dir,
    validate_model,
)
from .settings import ActiveTerms, AnchorSettings, RunMode, RunSettings, TeacherMode
from .yaml_io import (
    apply_overrides,
    load_yaml_with_extends,
    parse_override,
    read_yaml_mapping,
    resolve_references,
)

logger = logging.getLogger("anchorkd")

RESOLVED_CONFIG_NAME = "anchorkd_config.yaml"
COMMAND_LINE = "(command line)"
# Environment variables ms-swift's argument constructors set from the output dir.
_ENV_SET_BY_SWIFT_ARGS = ("TENSORBOARD_LOGGING_DIR",)


@dataclasses.dataclass(frozen=True)
class ResolvedConfig(ActiveTerms):
    """A validated config: merged sections, anchorkd's own knobs, what kind of run it is, and where each
    value came from. ``sections`` are not to be changed after resolution."""

    sections: dict[str, dict]
    custom: CustomConfig
    llm_kd_weight: float
    mode: RunMode
    sources: tuple[Path, ...]
    overridden: frozenset[str] = frozenset()
    # rlhf.seq_kd: train on the teacher's own answers (written before training, never passed to ms-swift).
    seq_kd: bool = False

    @property
    def visual_kd(self) -> VisualKDConfig:
        return self.custom.visual_kd

    @property
    def anchor_prompts(self) -> AnchorPromptsConfig:
        return self.custom.anchor

    def swift_kwargs(self) -> dict[str, Any]:
        """Flat keyword arguments for the ms-swift argument dataclass (anchorkd's keys removed)."""
        flat: dict[str, Any] = {}
        for section in swift_keys.SWIFT_SECTIONS:
            for key, value in self.sections.get(section, {}).items():
                if key not in swift_keys.ANCHORKD_RLHF_KEYS:
                    flat[key] = value
        return flat

    def to_yaml(self) -> str:
        body = {name: values for name, values in self.sections.items() if values}
        body["rlhf"] = {**body.get("rlhf", {}), "llm_kd_weight": self.llm_kd_weight}
        body["custom"] = self.custom.model_dump(mode="json")
        header = "# Resolved by anchorkd from: " + ", ".join(str(p) for p in self.sources) + "\n"
        return header + yaml.safe_dump(body, sort_keys=False)


class ConfigLoader:
    """Turns anchorkd YAML configs into validated ms-swift argument objects and anchorkd settings."""

    @classmethod
    def resolve(
        cls, path: str | Path, overrides: Iterable[str] = (), check_files: bool = True
    ) -> ResolvedConfig:
        """Steps 1-4: everything that can be checked without constructing ms-swift objects."""
        overrides = tuple(overrides)
        raw, sources = load_yaml_with_extends(path)
        raw = resolve_references(apply_overrides(raw, overrides))
        origins = _Origins(sources, overrides)
        with origins.attributed():
            draft = _draft(raw)
            errors = check_rules(draft)
            if errors:
                raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
            config = _derive(draft, sources, origins.overridden)
            if check_files:
                _check_checkpoints(config)
                _check_output_folders(config)
                config = with_resume(config)
        return config

    @classmethod
    def load_training_config(
        cls,
        path: str | Path,
        overrides: Iterable[str] = (),
        *,
        create_output_dir: bool = True,
        check_files: bool = True,
    ) -> RunSettings:
        """Resolve ``path`` and build the run's settings: ms-swift's argument object and anchorkd's.

        Unpacks as ``(config, train_args)``: ``SftArguments`` for SFT (ms-swift 4.x's name for the
        TrainArguments role) or ``RLHFArguments`` when ``rlhf.rlhf_type`` is set and some KD weight is
        positive. ``train_args.llm_kd_weight`` and ``train_args.training_args.llm_kd_weight`` mirror the
        weight. With ``create_output_dir=False`` the arguments are built against a throwaway output dir
        (``anchorkd validate``), so validation never writes into the user's output dir.
        """
        config = cls.resolve(path, overrides, check_files=check_files)
        return cls.build_settings(config, create_output_dir=create_output_dir)

    @classmethod
    def build_settings(cls, config: ResolvedConfig, *, create_output_dir: bool = True) -> RunSettings:
        """Step 5 alone: ms-swift's argument object and the frozen settings for a resolved config."""
        kwargs = config.swift_kwargs()
        _apply_offline_defaults(config, kwargs)
        _apply_launch_defaults(LaunchEnvironment.detect(), kwargs)
        _apply_cpu_engine_settings(LaunchEnvironment.detect(), kwargs, start_engine=create_output_dir)
        args_cls = _args_cls(config.mode != "sft")
        if not create_output_dir:
            # ms-swift also exports the log dir (TENSORBOARD_LOGGING_DIR, set only when unset): do not let
            # a validation leave it pointing into the throwaway dir for a later run in this process.
            saved_env = {name: os.environ.get(name) for name in _ENV_SET_BY_SWIFT_ARGS}
            try:
                with tempfile.TemporaryDirectory(prefix="anchorkd-validate-") as scratch:
                    train_args = _construct(
                        args_cls, {**kwargs, "output_dir": scratch, "add_version": False}, config
                    )
            finally:
                for name, value in saved_env.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        else:
            train_args = _construct(args_cls, kwargs, config)
        teacher_mode = _settle_teacher_mode(train_args, config)
        _mirror_llm_kd_weight(train_args, config.llm_kd_weight)
        return RunSettings(config, train_args, AnchorSettings.from_config(config, teacher_mode))

    @staticmethod
    def write_resolved(config: ResolvedConfig, output_dir: str | Path) -> Path:
        from ..io import atomic_write_text

        return atomic_write_text(Path(output_dir) / RESOLVED_CONFIG_NAME, config.to_yaml())


class _Origins:
    """Where each value came from: the command line, or the last file of the ``extends`` chain that sets it."""

    def __init__(self, sources: list[Path], overrides: tuple[str, ...]):
        self.sources = sources
        self.overridden = frozenset(".".join(parse_override(text)[0]) for text in overrides)
        self._files: list[tuple[Path, dict]] | None = None

    def of(self, key_path: str) -> str:
        parts = key_path.replace("[", ".[").split(".")
        keys = [p for p in parts if p and not p.startswith("[")]
        for depth in range(len(keys), 0, -1):
            if ".".join(keys[:depth]) in self.overridden:
                return COMMAND_LINE
        for path, data in reversed(self._read()):
            node: Any = data
            for key in keys:
                if not isinstance(node, dict) or key not in node:
                    break
                node = node[key]
            else:
                return str(path)
        return str(self.sources[-1])

    def _read(self) -> list[tuple[Path, dict]]:
        if self._files is None:
            self._files = [(path, read_yaml_mapping(path)) for path in self.sources]
        return self._files

    @contextlib.contextmanager
    def attributed(self):
        """Re-raise ConfigErrors with the origin of their key."""
        try:
            yield
        except ConfigErrors as exc:
            raise ConfigErrors([self._with_origin(err) for err in exc.errors]) from None
        except ConfigError as exc:
            raise self._with_origin(exc) from None

    def _with_origin(self, err: ConfigError) -> ConfigError:
        if err.source is not None:
            return err
        return ConfigError(err.key_path, err.rule, self.of(err.key_path))


def _draft(raw: dict) -> ConfigDraft:
    sections = _split_sections(raw)
    custom = validate_model(CustomConfig, sections.pop("custom"), "custom")
    knobs = validate_model(
        AnchorRlhfKnobs,
        {k: v for k, v in sections["rlhf"].items() if k in swift_keys.ANCHORKD_RLHF_KEYS},
        "rlhf",
    )
    _check_swift_keys(sections, _args_cls(bool(sections["rlhf"].get("rlhf_type"))))
    return ConfigDraft(sections, custom, knobs, LaunchEnvironment.detect())


def _derive(draft: ConfigDraft, sources: list[Path], overridden: frozenset[str]) -> ResolvedConfig:
    """The run mode. GKD with every KD weight at 0 is plain SFT: no teacher is loaded, CE has weight 1."""
    sections, custom, weight = draft.sections, draft.custom, draft.knobs.llm_kd_weight
    if not draft.is_gkd:
        # Other ms-swift RLHF types (dpo, grpo, ...) run through ms-swift's own trainers unchanged.
        mode: RunMode = "rlhf" if draft.rlhf.get("rlhf_type") else "sft"
    elif draft.kd_requested:
        mode = "gkd"
    else:
        logger.info("every KD weight is 0: running plain SFT (teacher not loaded, CE weight 1.0)")
        mode = "sft"
        sections = {**sections, "rlhf": {}}
        if custom.trainer_variant == "gkd_monitor":
            custom = custom.model_copy(update={"trainer_variant": "default"})
    if draft.teacher_writes_targets and custom.teacher_targets.cache_dir is None:
        # Settled here, from the output dir as written: a resume later points output_dir at a run folder.
        cache_dir = default_teacher_targets_dir(sections["training"].get("output_dir"))
        targets = custom.teacher_targets.model_copy(update={"cache_dir": cache_dir})
        custom = custom.model_copy(update={"teacher_targets": targets})
    return ResolvedConfig(sections, custom, weight, mode, tuple(sources), overridden, draft.knobs.seq_kd)


def _args_cls(rlhf: bool):
    from ..swift_seam import arguments_classes

    sft_cls, rlhf_cls = arguments_classes()
    return rlhf_cls if rlhf else sft_cls


def _split_sections(raw: dict) -> dict[str, dict]:
    errors = []
    for key in raw:
        if key not in swift_keys.SECTIONS:
            hints = swift_keys.closest_names(str(key), swift_keys.SECTIONS)
            home = [s for s, keys in swift_keys.section_fields().items() if key in keys]
            if home:
                rule = f"ms-swift keys go inside a section: move it to {home[0]}.{key}"
            else:
                rule = "unknown section; valid sections: " + ", ".join(swift_keys.SECTIONS)
                if hints:
                    rule += f" (did you mean {hints[0]}?)"
            errors.append(ConfigError(str(key), rule))
    sections: dict[str, dict] = {}
    for name in swift_keys.SECTIONS:
        value = raw.get(name)
        if value is None:  # absent, or a bare ``section:`` with nothing under it
            value = {}
        if not isinstance(value, dict):
            errors.append(ConfigError(name, f"must be a mapping, got {type(value).__name__}"))
            value = {}
        sections[name] = dict(value)
    if errors:
        raise ConfigErrors(errors)
    return sections


def _check_swift_keys(sections: dict[str, dict], args_cls) -> None:
    errors = []
    # ``rlhf`` keys are RLHFArguments fields whatever the run: type-check them there, so that an rlhf key
    # without rlhf.rlhf_type reaches the rule that says so instead of "not an argument of SftArguments".
    rlhf_cls = _args_cls(True)
    plugins = any(sections[s].get(k) for s in swift_keys.SWIFT_SECTIONS for k in swift_keys.PLUGIN_KEYS)
    for section in swift_keys.SWIFT_SECTIONS:
        section_cls = rlhf_cls if section == "rlhf" else args_cls
        for key, value in list(sections[section].items()):
            try:
                swift_keys.check_section_key(section, key)
                sections[section][key] = swift_keys.coerce_swift_value(section_cls, section, key, value)
                swift_keys.check_choice(section, key, sections[section][key], plugins=plugins)
            except ConfigError as err:
                errors.append(err)
    if not sections["model"].get("model"):
        errors.append(ConfigError("model.model", "required: the base checkpoint path (or hub id)"))
    if not sections["data"].get("dataset") and not sections["data"].get("cached_dataset"):
        errors.append(ConfigError("data.dataset", "required: at least one training data file"))
    if errors:
        raise ConfigErrors(errors)


# --- files on disk ----------------------------------------------------------------------------------


def is_local_reference(value: str) -> bool:
    """True when a model/data reference is meant as a local path rather than a hub id."""
    return value.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(value))


def _check_checkpoint(key_path: str, value: str | None) -> None:
    if not value:
        return
    if not is_local_reference(value):
        from ..offline import network_allowed

        if not network_allowed():
            raise ConfigError(
                key_path,
                f"{value!r} is not a local path, and anchorkd runs offline by default: download the "
                "checkpoint and give its folder, or set ANCHORKD_ALLOW_NETWORK=1 to let ms-swift fetch it",
            )
        return
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(key_path, f"checkpoint not found: {path}")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ConfigError(key_path, f"not a checkpoint (no config.json or adapter_config.json): {path}")


def _check_checkpoints(config: ResolvedConfig) -> None:
    model, rlhf, tuner = config.sections["model"], config.sections["rlhf"], config.sections["tuner"]
    _check_checkpoint("model.model", model.get("model"))
    for i, adapter in enumerate(tuner.get("adapters", []) or []):
        _check_checkpoint(f"tuner.adapters[{i}]", adapter)
    if config.mode == "gkd":
        _check_checkpoint("rlhf.teacher_model", rlhf.get("teacher_model"))
        for i, adapter in enumerate(rlhf.get("teacher_adapters", []) or []):
            _check_checkpoint(f"rlhf.teacher_adapters[{i}]", adapter)
        generates = "seq_kd" if config.seq_kd else "custom.anchor" if config.anchor_prompts_active else None
        if generates and not is_local_reference(rlhf.get("teacher_model") or ""):
            raise ConfigError(
                "rlhf.teacher_model",
                f"{generates} generates the targets with a local teacher checkpoint: download it and give its folder",
            )


# ms-swift's output root when training.output_dir is not set (it adds a folder named after the model).
SWIFT_OUTPUT_ROOT = "output"


def _check_output_folders(config: ResolvedConfig) -> None:
    """The folders a run writes: each is a folder this user can write to, or can be created as one. Checked
    without creating anything (``anchorkd validate`` writes nothing)."""
    _check_writable_folder(
        "training.output_dir", config.sections["training"].get("output_dir") or SWIFT_OUTPUT_ROOT
    )
    cache_dir = config.custom.teacher_targets.cache_dir
    if config.mode == "gkd" and (config.seq_kd or config.custom.anchor.active) and cache_dir:
        _check_writable_folder("custom.teacher_targets.cache_dir", cache_dir)


def _check_writable_folder(key_path: str, value: str) -> None:
    path = Path(value).expanduser().absolute()
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(key_path, f"{path} exists and is not a folder")
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key_path, f"cannot create {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(key_path, f"{path} {where} by this user")


def uses_only_local_paths(config: ResolvedConfig) -> bool:
    refs = [config.sections["model"].get("model")]
    if config.mode == "gkd":
        refs.append(config.sections["rlhf"].get("teacher_model"))
    return all(is_local_reference(r) for r in refs if r)


def _apply_offline_defaults(config: ResolvedConfig, kwargs: dict) -> None:
    """Local checkpoints never need the hub: skip ms-swift's "is the local copy latest" hub listing."""
    if uses_only_local_paths(config):
        kwargs.setdefault("check_model", False)


def _apply_launch_defaults(launch: LaunchEnvironment, kwargs: dict) -> None:
    """Under torchrun on a machine without a GPU, transformers runs the ranks in DDP over gloo only with
    ``use_cpu``; without it each rank trains alone. Engines that shard (DeepSpeed, FSDP) set up their own."""
    if launch.cpu_data_parallel and not kwargs.get("deepspeed") and not kwargs.get("fsdp"):
        kwargs.setdefault("use_cpu", True)


def _apply_cpu_engine_settings(launch: LaunchEnvironment, kwargs: dict, start_engine: bool) -> None:
    """Without a GPU: fp16 off unless set, and for a DeepSpeed run that will train (not a validation) the
    gloo distributed state DeepSpeed needs there (both explained in ``swift_seam``)."""
    from ..swift_seam import cpu_mixed_precision, start_cpu_deepspeed_state

    if launch.has_accelerator:
        return
    kwargs.update(cpu_mixed_precision(kwargs))
    if kwargs.get("deepspeed") and start_engine:
        # A mapping or None (rules.rule_cpu_deepspeed_accelerator_config_is_a_mapping).
        kwargs.update(start_cpu_deepspeed_state(kwargs.get("accelerator_config")))


# --- construction -----------------------------------------------------------------------------------


def _construct(args_cls, kwargs: dict, config: ResolvedConfig):
    """Build the ms-swift arguments; if that fails, remove the output dir the constructor may have created
    and name the key the refusal is about."""
    if "llm_kd_weight" in kwargs:  # ms-swift constructors must never see our knob
        raise AssertionError("llm_kd_weight must be popped before constructing ms-swift arguments")
    output_dir = kwargs.get("output_dir")
    existed = bool(output_dir) and Path(output_dir).exists()
    before = set(os.listdir(output_dir)) if existed else set()
    try:
        return args_cls(**kwargs)
    except ConfigError:
        _remove_created(output_dir, existed, before)
        raise
    except (ValueError, TypeError, AssertionError, NotImplementedError, KeyError) as exc:
        _remove_created(output_dir, existed, before)
        raise _swift_refusal(exc, config) from exc
    except BaseException:
        _remove_created(output_dir, existed, before)
        raise


def _swift_refusal(exc: BaseException, config: ResolvedConfig) -> ConfigError:
    """ms-swift's (or transformers') refusal of a value the rules do not cover, attributed to the key it is
    about: the one key whose value the message quotes (``'bogus' is not ...``), else the one key it names
    (``--deepspeed``, `` `max_length` ``, ``deepspeed_autotp_size``). A refusal that points at no single
    key of the config is reported against the ms-swift part of the config as a whole."""
    message = str(exc) or type(exc).__name__
    quoted, named = [], []
    for section in swift_keys.SWIFT_SECTIONS:
        for key, value in config.sections.get(section, {}).items():
            if key in swift_keys.ANCHORKD_RLHF_KEYS:
                continue
            if isinstance(value, str) and value and _quotes(message, value):
                quoted.append(f"{section}.{key}")
            if _names(message, key):
                named.append(f"{section}.{key}")
    origins = _Origins(list(config.sources), ())
    origins.overridden = config.overridden
    for candidates in (quoted, named):
        if len(candidates) == 1:
            return ConfigError(candidates[0], f"ms-swift refused it: {message}", origins.of(candidates[0]))
    return ConfigError("(ms-swift arguments)", f"ms-swift refused the arguments of this config: {message}")


def _quotes(message: str, value: str) -> bool:
    return any(f"{q}{value}{q}" in message for q in "'\"`") or message.startswith(f"{value} is not")


def _names(message: str, key: str) -> bool:
    if "_" in key:  # a name of its own, unlike "model" or "template"
        return re.search(rf"(?<![\w]){re.escape(key)}(?!\w)", message) is not None
    return f"--{key}" in message or f"`{key}`" in message


def _remove_created(output_dir: str | None, existed: bool, before: set[str]) -> None:
    if not output_dir:
        return
    with contextlib.suppress(OSError):
        if not existed:
            shutil.rmtree(output_dir, ignore_errors=True)
        else:
            for name in set(os.listdir(output_dir)) - before:
                shutil.rmtree(Path(output_dir) / name, ignore_errors=True)


def _settle_teacher_mode(train_args, config: ResolvedConfig) -> TeacherMode:
    """Keep ms-swift's adapter-disabled teacher only where it really is the base model.

    ms-swift uses "student with LoRA disabled" as the teacher whenever ``teacher_model == model`` and
    the tuner is LoRA. That is exact (and saves a second copy of the weights) when only LoRA weights
    train, which includes stage 3: with LoRA, ``freeze_aligner: false`` puts LoRA on the merger linears.
    Weights trained outside LoRA (``modules_to_save``, ``trainable_parameters[_regex]``) would stay
    switched on in such a "teacher", anchoring the student partly to itself: load a frozen copy then.
    """
    from ..swift_seam import load_no_teacher, teacher_is_disabled_adapter, use_separate_teacher_copy

    if config.mode != "gkd":
        return "none"
    if config.custom.teacher_cache:
        load_no_teacher(train_args)  # the LM-head KD reads the cache (the rules refused every other KD term)
        return "cached"
    if not teacher_is_disabled_adapter(train_args):
        _inherit_teacher_model_type(train_args, config.sections["model"]["model"])
        return "separate"
    tuner = config.sections["tuner"]
    trained_outside_lora = [
        key
        for key in ("modules_to_save", "trainable_parameters", "trainable_parameters_regex")
        if tuner.get(key)
    ]
    if not trained_outside_lora:
        return "base_anchor"
    logger.info(
        "teacher = base checkpoint, but %s train outside LoRA: loading a frozen copy", trained_outside_lora
    )
    use_separate_teacher_copy(train_args, config.sections["model"]["model"])
    return "separate"


def _inherit_teacher_model_type(train_args, student: str) -> None:
    """ms-swift cannot infer the type of every local folder (a folder not named after its model fails with
    a traceback at load time); a teacher of the student's own architecture takes the student's type."""
    teacher = train_args.teacher_model
    if not teacher or train_args.teacher_model_type or not train_args.model_type:
        return
    teacher_type = _config_model_type(teacher)
    if teacher_type is not None and teacher_type == _config_model_type(student):
        train_args.teacher_model_type = train_args.model_type


def _config_model_type(checkpoint: str) -> str | None:
    import json

    path = Path(checkpoint).expanduser() / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _mirror_llm_kd_weight(train_args, weight: float) -> None:
    """Spec 003: the weight is visible on ms-swift's objects too (a mirror; anchorkd reads RunSettings)."""
    for target in (train_args, train_args.training_args):
        setattr(target, "llm_kd_weight", weight)  # noqa: B010
