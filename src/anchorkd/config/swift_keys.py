"""Which ms-swift argument belongs in which config section, and what type it must have.

The sections of an anchorkd config map onto ms-swift's own argument dataclasses, so the set of valid
keys is read from ms-swift itself (never copied): a key is valid in a section when one of that
section's dataclasses declares it. Types come from the same annotations and are checked with
pydantic, so ``training.learning_rate: fast`` fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..errors import ConfigError

SECTIONS = ("model", "data", "template", "tuner", "training", "rlhf", "custom")
SWIFT_SECTIONS = ("model", "data", "template", "tuner", "training", "rlhf")
# Our own knobs that live in an ms-swift section but are never passed to ms-swift constructors. ms-swift
# declares seq_kd too, but 4.6.0 refuses ``seq_kd=True``: anchorkd implements it on the data side.
ANCHORKD_RLHF_KEYS = ("llm_kd_weight", "seq_kd")
# ms-swift declares these on BaseArguments / the trainer mixin, but users think of them as tuner or data
# settings: they are accepted there as well as under ``training``.
SECTION_ALIASES = {
    "tuner": ("tuner_type", "adapters", "vit_lr", "aligner_lr", "vit_gradient_checkpointing"),
    "data": ("packing", "lazy_tokenize", "packing_length"),
}


@functools.lru_cache(maxsize=1)
def section_fields() -> dict[str, frozenset[str]]:
    """Map each ms-swift-backed section to the argument names it accepts."""
    from ..swift_seam import arguments_classes, declared_fields, field_names, section_dataclasses

    SftArguments, RLHFArguments = arguments_classes()
    sft_fields = field_names(SftArguments)
    rlhf_all = field_names(RLHFArguments)
    grouped = {
        section: set().union(*(declared_fields(cls) for cls in classes))
        for section, classes in section_dataclasses().items()
    }
    claimed = set().union(*grouped.values())
    rlhf_only = rlhf_all - sft_fields
    # RLHFArguments re-declares a few SFT names (temperature, max_completion_length, ...): both places work.
    rlhf_declared = set()
    for klass in RLHFArguments.__mro__:
        if klass is SftArguments:
            break
        rlhf_declared |= declared_fields(klass)
    grouped["rlhf"] = (rlhf_only | (rlhf_declared & rlhf_all)) | set(ANCHORKD_RLHF_KEYS)
    grouped["training"] = sft_fields - claimed
    for section, keys in SECTION_ALIASES.items():
        grouped[section] |= set(keys) & sft_fields
    return {name: frozenset(keys) for name, keys in grouped.items()}


@functools.lru_cache(maxsize=2)
def _field_types(args_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(args_cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(args_cls) if f.init}


@functools.lru_cache(maxsize=512)
def _adapter(annotation) -> TypeAdapter | None:
    try:
        return TypeAdapter(annotation)
    except Exception:  # exotic annotations: ms-swift's own constructor checks those
        return None


def default_value(key: str) -> Any:
    """ms-swift's default for ``key`` (the value its arguments take when a config leaves the key out)."""
    from ..swift_seam import arguments_classes

    field = {f.name: f for f in dataclasses.fields(arguments_classes()[1])}[key]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def closest_names(name: str, candidates, n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.6)


def check_section_key(section: str, key: str) -> None:
    """Raise ConfigError when ``key`` is not a valid ms-swift argument for ``section``."""
    fields = section_fields()
    if key in fields[section]:
        return
    homes = [name for name, keys in fields.items() if key in keys]
    path = f"{section}.{key}"
    if homes:
        raise ConfigError(path, f"'{key}' belongs under the '{homes[0]}' section ({homes[0]}.{key})")
    all_keys = set().union(*fields.values())
    hints = closest_names(key, fields[section]) or closest_names(key, all_keys)
    suggestion = f"; did you mean: {', '.join(hints)}?" if hints else ""
    raise ConfigError(path, f"unknown ms-swift argument '{key}'{suggestion}")


def coerce_swift_value(args_cls, section: str, key: str, value: Any) -> Any:
    """Validate ``value`` against the annotation ms-swift declares for ``key``; return the coerced value."""
    if key in ANCHORKD_RLHF_KEYS:
        return value
    annotation = _field_types(args_cls).get(key)
    if annotation is None:
        raise ConfigError(f"{section}.{key}", f"'{key}' is not an argument of {args_cls.__name__}")
    adapter = _adapter(annotation)
    if adapter is None:
        return value
    try:
        coerced = adapter.validate_python(value)
    except ValidationError as exc:
        if not isinstance(value, (list, tuple, dict)) and _accepts_list(annotation):
            # ms-swift's command line accepts one value for a list argument; so does our YAML.
            return coerce_swift_value(args_cls, section, key, [value])
        problem = exc.errors()[0]["msg"] if exc.errors() else str(exc)
        raise ConfigError(
            f"{section}.{key}", f"invalid value {value!r}: expected {_describe(annotation)} ({problem})"
        ) from None
    return coerced


# ms-swift's keys that load plugin files, and the names such plugins can register.
PLUGIN_KEYS = ("external_plugins", "custom_register_path")
PLUGIN_REGISTRIES = ("template", "tuner_type")


def check_choice(section: str, key: str, value: Any, plugins: bool = False) -> None:
    """A string argument with a fixed set of names (optimizer, scheduler, template, tuner) must be one of
    them: ms-swift and transformers check these only when the arguments are built, and their error names
    no key. With ``plugins`` (the config loads ms-swift plugins) template and tuner names are left to ms-swift."""
    if plugins and key in PLUGIN_REGISTRIES:
        return
    choices = declared_choices().get(key)
    if choices is None or not isinstance(value, str) or value in choices:
        return
    hints = closest_names(value, choices)
    hint = f" (did you mean {hints[0]}?)" if hints else ""
    listed = (
        ", ".join(sorted(choices)) if len(choices) <= 60 else f"{len(choices)} names; see ms-swift's docs"
    )
    raise ConfigError(f"{section}.{key}", f"unknown value {value!r}{hint}; valid: {listed}")


@functools.lru_cache(maxsize=1)
def declared_choices() -> dict[str, frozenset[str]]:
    """Names each such argument accepts, read from the engine that consumes it: transformers' enums for the
    ``TrainingArguments`` fields it converts with one (``optim``, ``lr_scheduler_type``, the ``*_strategy``
    keys), ms-swift's template registry and its tuner names."""
    import enum

    import transformers
    from swift.arguments import get_supported_tuners
    from swift.template import TEMPLATE_MAPPING

    choices: dict[str, frozenset[str]] = {}
    hints = typing.get_type_hints(transformers.TrainingArguments)
    for field in dataclasses.fields(transformers.TrainingArguments):
        members = typing.get_args(hints.get(field.name))
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        if len(enums) == 1 and str in members:  # ``Enum | str``: transformers converts with ``Enum(value)``
            choices[field.name] = frozenset(str(member.value) for member in enums[0])
    choices["template"] = frozenset(TEMPLATE_MAPPING)
    choices["tuner_type"] = frozenset(get_supported_tuners())
    return choices


def _accepts_list(annotation) -> bool:
    origins = {typing.get_origin(annotation)} | {typing.get_origin(a) for a in typing.get_args(annotation)}
    return bool(origins & {list, typing.List})  # noqa: UP006


def _describe(annotation) -> str:
    if isinstance(annotation, type):  # plain classes print as "<class 'float'>"
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    return text if len(text) < 120 else text[:117] + "..."
