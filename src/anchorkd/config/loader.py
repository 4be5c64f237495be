"""``ConfigLoader``: YAML (+ overlays + overrides) -> validated config -> ms-swift argument objects.

Order of work, so that nothing is written and no model is loaded for a config that cannot run:
1. read the file and its ``extends`` chain, apply ``a.b=value`` overrides;
2. check sections and keys (ms-swift keys against ms-swift's dataclasses, ours with pydantic);
3. cross-section rules (teacher required for KD, visual KD needs a trainable vision path, ...);
4. check that model/teacher/adapter paths and data files exist and parse (file:line on errors);
5. only then construct ``SftArguments`` / ``RLHFArguments`` (which creates the output dir), with
   ``rlhf.llm_kd_weight`` popped before the constructor and re-attached with ``setattr``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError, ConfigErrors
from . import swift_keys
from .schema import AnchorRlhfKnobs, CustomConfig, validate_model
from .yaml_io import apply_overrides, load_yaml_with_extends, resolve_references

logger = logging.getLogger("anchorkd")

RESOLVED_CONFIG_NAME = "anchorkd_config.yaml"
# Environment variables ms-swift's argument constructors set from the output dir.
_ENV_SET_BY_SWIFT_ARGS = ("TENSORBOARD_LOGGING_DIR",)
RunMode = Literal["sft", "gkd", "rlhf"]


@dataclasses.dataclass
class ResolvedConfig:
    """A validated config: merged sections, anchorkd's own knobs, and what kind of run it is."""

    sections: dict[str, dict]
    custom: CustomConfig
    llm_kd_weight: float
    mode: RunMode
    sources: list[Path]
    teacher_mode: str = "none"  # none | base_anchor | separate

    @property
    def visual_kd_active(self) -> bool:
        return self.mode == "gkd" and self.custom.visual_kd.active

    @property
    def lm_kd_active(self) -> bool:
        return self.mode == "gkd" and self.llm_kd_weight > 0

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


@dataclasses.dataclass
class LoadedConfig:
    """What ``load_training_config`` returns; unpacks as ``config, train_args``."""

    config: ResolvedConfig
    train_args: Any  # swift.arguments.SftArguments | RLHFArguments

    def __iter__(self) -> Iterator[Any]:
        yield self.config
        yield self.train_args


class ConfigLoader:
    """Turns anchorkd YAML configs into validated ms-swift argument objects."""

    @classmethod
    def resolve(
        cls, path: str | Path, overrides: Iterable[str] = (), check_files: bool = True
    ) -> ResolvedConfig:
        """Steps 1-4: everything that can be checked without constructing ms-swift objects."""
        raw, sources = load_yaml_with_extends(path)
        raw = resolve_references(apply_overrides(raw, overrides))
        source = str(sources[-1])
        sections = _split_sections(raw, source)
        custom = validate_model(CustomConfig, sections.pop("custom"), "custom", source)
        knobs = validate_model(
            AnchorRlhfKnobs,
            {k: v for k, v in sections["rlhf"].items() if k in swift_keys.ANCHORKD_RLHF_KEYS},
            "rlhf",
            source,
        )
        args_cls = _args_cls(bool(sections["rlhf"].get("rlhf_type")))
        _check_swift_keys(sections, args_cls, source)
        config = ResolvedConfig(sections, custom, knobs.llm_kd_weight, "sft", sources)
        _apply_run_rules(config, source)
        if check_files:
            _check_paths(config)
        return config

    @classmethod
    def load_training_config(
        cls,
        path: str | Path,
        overrides: Iterable[str] = (),
        *,
        create_output_dir: bool = True,
        check_files: bool = True,
    ) -> LoadedConfig:
        """Resolve ``path`` and build the ms-swift argument object for it.

        Returns ``(config, train_args)``: ``SftArguments`` for SFT (ms-swift 4.x's name for the
        TrainArguments role) or ``RLHFArguments`` when ``rlhf.rlhf_type`` is set and some KD weight is
        positive. ``train_args.llm_kd_weight`` and ``train_args.training_args.llm_kd_weight`` carry the
        weight. With ``create_output_dir=False`` the arguments are built against a throwaway output dir
        (``anchorkd validate``), so validation never writes into the user's output dir.
        """
        config = cls.resolve(path, overrides, check_files=check_files)
        return LoadedConfig(config, cls.build_train_args(config, create_output_dir=create_output_dir))

    @classmethod
    def build_train_args(cls, config: ResolvedConfig, *, create_output_dir: bool = True):
        """Step 5 alone: the ms-swift argument object for an already resolved config."""
        kwargs = config.swift_kwargs()
        _apply_offline_defaults(config, kwargs)
        args_cls = _args_cls(config.mode != "sft")
        if not create_output_dir:
            # ms-swift also exports the log dir (TENSORBOARD_LOGGING_DIR, set only when unset): do not let
            # a validation leave it pointing into the throwaway dir for a later run in this process.
            saved_env = {name: os.environ.get(name) for name in _ENV_SET_BY_SWIFT_ARGS}
            try:
                with tempfile.TemporaryDirectory(prefix="anchorkd-validate-") as scratch:
                    train_args = _construct(args_cls, {**kwargs, "output_dir": scratch, "add_version": False})
            finally:
                for name, value in saved_env.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        else:
            train_args = _construct(args_cls, kwargs)
        _settle_teacher_mode(train_args, config)
        _attach_knobs(train_args, config)
        return train_args

    @staticmethod
    def write_resolved(config: ResolvedConfig, output_dir: str | Path) -> Path:
        target = Path(output_dir) / RESOLVED_CONFIG_NAME
        tmp = target.with_suffix(".yaml.tmp")
        tmp.write_text(config.to_yaml())
        os.replace(tmp, target)
        return target


def _args_cls(rlhf: bool):
    from swift.arguments import RLHFArguments, SftArguments

    return RLHFArguments if rlhf else SftArguments


def _split_sections(raw: dict, source: str) -> dict[str, dict]:
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
            errors.append(ConfigError(str(key), rule, source))
    sections: dict[str, dict] = {}
    for name in swift_keys.SECTIONS:
        value = raw.get(name)
        if value is None:  # absent, or a bare ``section:`` with nothing under it
            value = {}
        if not isinstance(value, dict):
            errors.append(ConfigError(name, f"must be a mapping, got {type(value).__name__}", source))
            value = {}
        sections[name] = dict(value)
    if errors:
        raise ConfigErrors(errors)
    return sections


def _check_swift_keys(sections: dict[str, dict], args_cls, source: str) -> None:
    errors = []
    # ``rlhf`` keys are RLHFArguments fields whatever the run: type-check them there, so that an rlhf key
    # without rlhf.rlhf_type reaches the rule that says so instead of "not an argument of SftArguments".
    rlhf_cls = _args_cls(True)
    for section in swift_keys.SWIFT_SECTIONS:
        section_cls = rlhf_cls if section == "rlhf" else args_cls
        for key, value in list(sections[section].items()):
            try:
                swift_keys.check_section_key(section, key)
                sections[section][key] = swift_keys.coerce_swift_value(section_cls, section, key, value)
            except ConfigError as err:
                errors.append(ConfigError(err.key_path, err.rule, source))
    if not sections["model"].get("model"):
        errors.append(ConfigError("model.model", "required: the base checkpoint path (or hub id)", source))
    if not sections["data"].get("dataset") and not sections["data"].get("cached_dataset"):
        errors.append(ConfigError("data.dataset", "required: at least one training data file", source))
    if errors:
        raise ConfigErrors(errors)


# --- cross-section rules: one function per rule -------------------------------------------------


def _rule_rlhf_keys_need_rlhf_type(config: ResolvedConfig, source: str) -> None:
    rlhf = config.sections["rlhf"]
    stray = [k for k in rlhf if k not in swift_keys.ANCHORKD_RLHF_KEYS and k != "rlhf_type"]
    if stray and not rlhf.get("rlhf_type"):
        raise ConfigError(f"rlhf.{stray[0]}", "needs rlhf.rlhf_type (e.g. rlhf_type: gkd)", source)


def _rule_gkd_monitor_needs_gkd(config: ResolvedConfig, source: str) -> None:
    if config.custom.trainer_variant == "gkd_monitor" and config.sections["rlhf"].get("rlhf_type") != "gkd":
        raise ConfigError("custom.trainer_variant", "gkd_monitor requires rlhf.rlhf_type: gkd", source)


def _rule_kd_weight_needs_gkd_monitor(config: ResolvedConfig, source: str) -> None:
    rlhf = config.sections["rlhf"]
    if (
        rlhf.get("rlhf_type") == "gkd"
        and config.custom.trainer_variant != "gkd_monitor"
        and config.llm_kd_weight != 1.0
    ):
        raise ConfigError(
            "rlhf.llm_kd_weight",
            f"is {config.llm_kd_weight}, but ms-swift's own GKD trainer (custom.trainer_variant: default) always "
            "weighs the KD term by 1.0: set custom.trainer_variant: gkd_monitor",
            source,
        )


def _rule_visual_kd_needs_gkd_monitor(config: ResolvedConfig, source: str) -> None:
    if config.custom.visual_kd.enabled and config.custom.trainer_variant != "gkd_monitor":
        raise ConfigError(
            "custom.visual_kd.enabled",
            "visual KD runs in anchorkd's trainer: set custom.trainer_variant: gkd_monitor and rlhf.rlhf_type: gkd",
            source,
        )


def _rule_seq_kd_unsupported(config: ResolvedConfig, source: str) -> None:
    if config.sections["rlhf"].get("seq_kd"):
        raise ConfigError(
            "rlhf.seq_kd",
            "seq_kd: true (teacher-generated responses) is not supported: ms-swift 4.6.0 removed it. "
            "Use seq_kd: false with lmbda: 0 (forward-only KD) or lmbda > 0 (on-policy student sampling)",
            source,
        )


def _rule_teacher_required_for_kd(config: ResolvedConfig, source: str) -> None:
    rlhf = config.sections["rlhf"]
    if rlhf.get("rlhf_type") != "gkd":
        return
    kd_requested = config.llm_kd_weight > 0 or config.custom.visual_kd.weight > 0
    if kd_requested and not rlhf.get("teacher_model") and not rlhf.get("teacher_model_server"):
        which = "rlhf.llm_kd_weight" if config.llm_kd_weight > 0 else "custom.visual_kd.weight"
        raise ConfigError(
            "rlhf.teacher_model",
            f"required when {which} > 0: give the frozen teacher checkpoint "
            "(the base model's path for KL-anchored SFT)",
            source,
        )


def _rule_visual_kd_needs_trainable_vision(config: ResolvedConfig, source: str) -> None:
    if not config.custom.visual_kd.enabled:
        return
    tuner = config.sections["tuner"]
    # ms-swift freezes both by default for multimodal models.
    if tuner.get("freeze_vit", True) and tuner.get("freeze_aligner", True):
        raise ConfigError(
            "custom.visual_kd",
            "the vision tower and aligner are both frozen (tuner.freeze_vit / tuner.freeze_aligner, "
            "true by default), so the merger features never move and the visual KD term would be "
            "identically zero: set tuner.freeze_aligner: false (or freeze_vit: false)",
            source,
        )


def _rule_choose_run_mode(config: ResolvedConfig, source: str) -> None:
    """GKD with every KD weight at 0 is plain SFT: no teacher is loaded, CE has weight 1."""
    rlhf = config.sections["rlhf"]
    if rlhf.get("rlhf_type") != "gkd":
        # Other ms-swift RLHF types (dpo, grpo, ...) run through ms-swift's own trainers unchanged.
        config.mode = "rlhf" if rlhf.get("rlhf_type") else "sft"
        return
    if config.llm_kd_weight > 0 or config.custom.visual_kd.active:
        config.mode = "gkd"
        return
    logger.info("every KD weight is 0: running plain SFT (teacher not loaded, CE weight 1.0)")
    config.mode = "sft"
    config.sections["rlhf"] = {}
    if config.custom.trainer_variant == "gkd_monitor":
        config.custom = config.custom.model_copy(update={"trainer_variant": "default"})


RUN_RULES = (
    _rule_rlhf_keys_need_rlhf_type,
    _rule_gkd_monitor_needs_gkd,
    _rule_kd_weight_needs_gkd_monitor,
    _rule_visual_kd_needs_gkd_monitor,
    _rule_seq_kd_unsupported,
    _rule_teacher_required_for_kd,
    _rule_visual_kd_needs_trainable_vision,
    _rule_choose_run_mode,
)


def _apply_run_rules(config: ResolvedConfig, source: str) -> None:
    for rule in RUN_RULES:
        rule(config, source)


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


def _check_paths(config: ResolvedConfig) -> None:
    from ..data.validate import validate_dataset_entry

    model, rlhf, data = config.sections["model"], config.sections["rlhf"], config.sections["data"]
    _check_checkpoint("model.model", model.get("model"))
    for i, adapter in enumerate(config.sections["tuner"].get("adapters", []) or []):
        _check_checkpoint(f"tuner.adapters[{i}]", adapter)
    if config.mode == "gkd":
        _check_checkpoint("rlhf.teacher_model", rlhf.get("teacher_model"))
        for i, adapter in enumerate(rlhf.get("teacher_adapters", []) or []):
            _check_checkpoint(f"rlhf.teacher_adapters[{i}]", adapter)
    for key in ("dataset", "val_dataset"):
        for i, entry in enumerate(data.get(key, []) or []):
            validate_dataset_entry(entry, key_path=f"data.{key}[{i}]")


def uses_only_local_paths(config: ResolvedConfig) -> bool:
    refs = [config.sections["model"].get("model")]
    if config.mode == "gkd":
        refs.append(config.sections["rlhf"].get("teacher_model"))
    return all(is_local_reference(r) for r in refs if r)


def _apply_offline_defaults(config: ResolvedConfig, kwargs: dict) -> None:
    """Local checkpoints never need the hub: skip ms-swift's "is the local copy latest" hub listing."""
    if uses_only_local_paths(config):
        kwargs.setdefault("check_model", False)


# --- construction -----------------------------------------------------------------------------------


def _construct(args_cls, kwargs: dict):
    """Build the ms-swift arguments; if that fails, remove the output dir it may have created."""
    if "llm_kd_weight" in kwargs:  # ms-swift constructors must never see our knob
        raise AssertionError("llm_kd_weight must be popped before constructing ms-swift arguments")
    output_dir = kwargs.get("output_dir")
    existed = bool(output_dir) and Path(output_dir).exists()
    before = set(os.listdir(output_dir)) if existed else set()
    try:
        return args_cls(**kwargs)
    except (ValueError, TypeError, AssertionError, NotImplementedError) as exc:
        _remove_created(output_dir, existed, before)
        raise ConfigError("<ms-swift>", f"ms-swift rejected the arguments: {exc}") from exc
    except BaseException:
        _remove_created(output_dir, existed, before)
        raise


def _remove_created(output_dir: str | None, existed: bool, before: set[str]) -> None:
    if not output_dir:
        return
    with contextlib.suppress(OSError):
        if not existed:
            shutil.rmtree(output_dir, ignore_errors=True)
        else:
            for name in set(os.listdir(output_dir)) - before:
                shutil.rmtree(Path(output_dir) / name, ignore_errors=True)


def _settle_teacher_mode(train_args, config: ResolvedConfig) -> None:
    """Keep ms-swift's adapter-disabled teacher only where it really is the base model.

    ms-swift uses "student with LoRA disabled" as the teacher whenever ``teacher_model == model`` and
    the tuner is LoRA. That is exact (and saves a second copy of the weights) when only LoRA weights
    train, which includes stage 3: with LoRA, ``freeze_aligner: false`` puts LoRA on the merger linears.
    Weights trained outside LoRA (``modules_to_save``, ``trainable_parameters[_regex]``) would stay
    switched on in such a "teacher", anchoring the student partly to itself: load a frozen copy then.
    """
    if config.mode != "gkd":
        config.teacher_mode = "none"
        return
    if not getattr(train_args, "_teacher_use_disable_adapter", False):
        config.teacher_mode = "separate"
        return
    tuner = config.sections["tuner"]
    trained_outside_lora = [
        key
        for key in ("modules_to_save", "trainable_parameters", "trainable_parameters_regex")
        if tuner.get(key)
    ]
    if not trained_outside_lora:
        config.teacher_mode = "base_anchor"
        return
    logger.info(
        "teacher = base checkpoint, but %s train outside LoRA: loading a frozen copy", trained_outside_lora
    )
    train_args._teacher_use_disable_adapter = False
    train_args.teacher_model = config.sections["model"]["model"]
    # ms-swift cannot always infer the type of a local folder; the copy is the student's own.
    train_args.teacher_model_type = train_args.teacher_model_type or train_args.model_type
    config.teacher_mode = "separate"


def _attach_knobs(train_args, config: ResolvedConfig) -> None:
    """Re-attach anchorkd's knobs to ms-swift's objects (their constructors do not know them)."""
    for target in (train_args, getattr(train_args, "training_args", None)):
        if target is None:
            continue
        setattr(target, "llm_kd_weight", config.llm_kd_weight)  # noqa: B010
        setattr(target, "anchorkd_custom", config.custom)  # noqa: B010
