"""YAML files with ``extends:`` overlays and ``a.b=value`` command-line overrides.

Resolution rules:
- ``extends`` is a path or a list of paths, relative to the file that names them. Parents are merged
  in order, then the file itself on top.
- Mappings merge key by key (deep); any other value, lists included, replaces the parent's value.
- A file that (transitively) extends itself is reported with the whole chain.
- A string value that is exactly ``${section.key}`` takes the value at that path after merging and
  overrides (e.g. ``rlhf.teacher_model: ${model.model}`` anchors to whatever base model is used).
- Booleans follow YAML 1.2 (only true/false), so ``no``/``yes``/``on``/``off`` stay strings as
  ms-swift and transformers expect (``eval_strategy: no``).
- A key (or a section) written twice in one mapping is an error naming its key path and both lines; the
  YAML default of keeping the last one would change a run silently. Overlays replacing a parent's value
  are the way to set a key again.
- An override ``a.b.c=value`` parses ``value`` as YAML (``lr=1e-4`` is a float, ``x=[1,2]`` a list,
  ``x=null`` clears a key) and sets it at that path, creating mappings on the way.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


class _Yaml12BoolLoader(yaml.SafeLoader):
    """SafeLoader where only true/false are booleans (YAML 1.2), so ``eval_strategy: no`` stays "no"."""


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml_text(text: str, source: str | None = None):
    """Parse ``text`` (YAML 1.2 booleans). A key written twice in one mapping is an error naming its key path
    and lines: PyYAML would keep the last silently, so a section or a key repeated further down a file
    (``llm_kd_weight: 1.0`` ... ``llm_kd_weight: 0.0``) would quietly change the run."""
    loader = _Yaml12BoolLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_repeated_keys(node, "", source, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_repeated_keys(node: yaml.Node, where: str, source: str | None, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a complex key: nothing a config writes
            key = key_node.value
            path = f"{where}.{key}" if where else key
            line = key_node.start_mark.line + 1
            if key in first_line and key_node.tag != "tag:yaml.org,2002:merge":
                if isinstance(value_node, yaml.MappingNode):
                    rule = "YAML would keep only the second block: write all its keys in one"
                else:
                    rule = "YAML would keep only the second value: keep one"
                lines = f"line {line}" if line == first_line[key] else f"lines {first_line[key]} and {line}"
                raise ConfigError(
                    path,
                    f"written twice in one mapping ({lines}); {rule}",
                    f"{source}:{line}" if source else None,
                )
            first_line.setdefault(key, line)
            _refuse_repeated_keys(value_node, path, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeated_keys(item, f"{where}[{i}]", source, seen)


_REFERENCE = re.compile(r"^\$\{([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+)\}$")
# PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string; users mean a number.
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce_scalar(value: Any) -> Any:
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


def _coerce_tree(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _coerce_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_coerce_tree(v) for v in node]
    return _coerce_scalar(node)


def read_yaml_mapping(path: Path) -> dict:
    """Read one YAML file that must hold a mapping (or nothing)."""
    if not path.is_file():
        # Extended files are checked by ``_resolve`` (key ``extends``); this is the config file itself.
        raise ConfigError("config", f"config file not found: {path}")
    try:
        data = load_yaml_text(path.read_text(), source=str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError("<file>", f"invalid YAML at {where}: {exc}", source=str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            "<root>", f"a config file must hold a mapping, got {type(data).__name__}", str(path)
        )
    return _coerce_tree(data)


def deep_merge(base: Mapping, overlay: Mapping) -> dict:
    """Merge ``overlay`` onto ``base``: mappings recursively, everything else replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml_with_extends(path: str | Path) -> tuple[dict, list[Path]]:
    """Resolve ``path`` and its ``extends`` chain into one mapping.

    Returns the merged mapping (without ``extends``) and every file read, parents first.
    """
    files: list[Path] = []
    merged = _resolve(Path(path).resolve(), chain=(), files=files)
    return merged, files


def _resolve(path: Path, chain: tuple[Path, ...], files: list[Path]) -> dict:
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError("extends", f"extends cycle: {cycle}", source=str(chain[-1]))
    data = read_yaml_mapping(path)
    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError("extends", "must be a path or a list of paths", source=str(path))
    merged: dict = {}
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        if not parent_path.is_file():
            raise ConfigError("extends", f"extended file not found: {parent_path}", source=str(path))
        merged = deep_merge(merged, _resolve(parent_path, (*chain, path), files))
    files.append(path)
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, f"override {text!r} must look like section.key=value")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"override value {raw!r} is not valid YAML: {exc}") from exc
    except ConfigError as exc:  # a key repeated inside the value: name it under the override's key
        raise ConfigError(f"{key}.{exc.key_path}", exc.rule) from None
    return key.split("."), _coerce_tree(value)


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``config`` with each ``a.b=value`` override applied in order."""
    result = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                path = ".".join(keys[: depth + 1])
                raise ConfigError(path, f"cannot set {'.'.join(keys)}: {path} is not a mapping")
            node = child
        if value is None:
            node.pop(keys[-1], None)  # ``key=null`` clears the key: the parent's / ms-swift's default applies
        else:
            node[keys[-1]] = value
    return result


def resolve_references(config: dict) -> dict:
    """Replace every ``${a.b}`` string with the value found at ``a.b`` (which must not be a reference)."""

    def lookup(path: str, where: str):
        node: Any = config
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(where, f"${{{path}}} refers to a key that is not set")
            node = node[key]
        if isinstance(node, str) and _REFERENCE.match(node):
            raise ConfigError(where, f"${{{path}}} refers to another reference ({node}); give a value")
        return copy.deepcopy(node)

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and (match := _REFERENCE.match(node)):
            return lookup(match.group(1), where)
        if isinstance(node, str) and node.startswith("${") and node.endswith("}"):
            # A typo here (``${model.model }``, ``${model}``) would otherwise pass on as a literal string
            # and surface much later, e.g. as a hub id that cannot be downloaded.
            raise ConfigError(where, f"malformed reference {node!r}: write ${{section.key}}")
        return node

    return walk(config, "")
