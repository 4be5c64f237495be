"""YAML files with ``extends:`` overlays and ``a.b=value`` command-line overrides.

Resolution rules:
- ``extends`` is a path or a list of paths, relative to the file that names them. Parents are merged
  in order, then the file itself on top.
- Mappings merge key by key (deep); any other value, lists included, replaces the parent's value.
- A file that (transitively) extends itself is reported with the whole chain.
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

from .errors import ConfigError

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
        raise ConfigError("extends" if path.suffix else "config", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"override value {raw!r} is not valid YAML: {exc}") from exc
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
        node[keys[-1]] = value
    return result
