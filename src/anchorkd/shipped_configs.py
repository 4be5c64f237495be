"""The shipped configs as a catalogue: ``anchorkd configs list`` and ``anchorkd configs copy NAME DEST``.

A config is named by its path relative to the shipped configs folder (``recipes/forward_only_kd.yaml``).
A copy must work from wherever it lands, so a config that ``extends:`` others is written flattened: its
chain merged into one self-contained file (``${section.key}`` references are kept, so they still follow
the values a user sets later). A config without ``extends:`` is copied byte for byte, comments included.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
from pathlib import Path

import yaml

from .config.yaml_io import load_yaml_with_extends, read_yaml_mapping
from .io import atomic_write_text
from .resources import shipped_configs_dir

SUFFIX = ".yaml"


@dataclasses.dataclass(frozen=True)
class ShippedConfig:
    name: str  # relative to the shipped configs folder, with "/" separators
    path: Path
    description: str  # the file's first comment line


@dataclasses.dataclass(frozen=True)
class CopiedConfig:
    source: ShippedConfig
    target: Path
    merged_from: tuple[str, ...]  # the extends chain, parents first; empty for a verbatim copy


def list_shipped_configs() -> list[ShippedConfig]:
    """Every shipped config: the top-level stage configs first, then each subfolder's, by name."""
    root = shipped_configs_dir()
    paths = [p for p in root.rglob(f"*{SUFFIX}") if not any(part.startswith(".") for part in p.parts)]
    configs = [ShippedConfig(p.relative_to(root).as_posix(), p, _description(p)) for p in paths]
    return sorted(configs, key=lambda c: (c.name.count("/"), c.name))


def find_shipped_config(name: str) -> ShippedConfig:
    """The shipped config called ``name`` (``.yaml`` and a leading ``configs/`` may be left off)."""
    wanted = name.strip().removeprefix("./").removeprefix("configs/").removesuffix(".yml")
    if not wanted.endswith(SUFFIX):
        wanted += SUFFIX
    configs = list_shipped_configs()
    for config in configs:
        if config.name == wanted:
            return config
    names = [c.name for c in configs]
    stem = Path(wanted).name
    close = [n for n in names if Path(n).name == stem]
    close += [n for n in difflib.get_close_matches(wanted, names, n=3, cutoff=0.6) if n not in close]
    hint = f"; did you mean {', '.join(close)}?" if close else "; `anchorkd configs list` shows them all"
    raise FileNotFoundError(f"no shipped config named {name!r}{hint}")


def copy_shipped_config(
    name: str, dest: str | Path, *, force: bool = False, make_parents: bool = False
) -> CopiedConfig:
    """Copy a shipped config to ``dest`` (a file path, or an existing folder to copy into).

    Refuses to replace an existing file unless ``force``; refuses a missing parent folder unless
    ``make_parents``. Nothing is written when it refuses.
    """
    config = find_shipped_config(name)
    target = _target_path(config, Path(dest).expanduser(), str(dest), make_parents)
    if target.is_dir():
        raise FileExistsError(f"{target} is a folder; give a file name or a folder to copy into")
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to overwrite it")
    if "extends" in read_yaml_mapping(config.path):
        merged, sources = load_yaml_with_extends(config.path)
        root = shipped_configs_dir().resolve()
        chain = tuple(p.relative_to(root).as_posix() for p in sources)
        text = _flattened_text(config, merged, chain)
    else:
        chain = ()
        text = config.path.read_text()
    # _target_path has refused a missing folder unless make_parents; the writer creates it then.
    atomic_write_text(target, text)
    return CopiedConfig(config, target, chain)


def is_engine_overlay(path: Path) -> bool:
    """An engine overlay (``recipes/zero3.yaml``, ...) sets ``training`` keys only and extends nothing: it is
    listed after a stage config in a run config's ``extends:``, never run on its own."""
    return set(read_yaml_mapping(path)) == {"training"}


def _target_path(config: ShippedConfig, dest: Path, as_given: str, make_parents: bool) -> Path:
    if dest.is_dir():
        return dest / Path(config.name).name
    if as_given.endswith(("/", os.sep)):
        if not make_parents:
            raise FileNotFoundError(f"folder {dest} does not exist; create it or pass --make-parents")
        return dest / Path(config.name).name
    if not dest.parent.is_dir() and not make_parents:
        raise FileNotFoundError(f"folder {dest.parent} does not exist; create it or pass --make-parents")
    return dest


def _description(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def _leading_comments(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


class _ConfigDumper(yaml.SafeDumper):
    """Writes a list of plain values on one line (``dataset: [a.jsonl]``), as the shipped files do."""


def _represent_list(dumper: yaml.SafeDumper, values: list):
    flow = all(not isinstance(v, (dict, list)) for v in values)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", values, flow_style=flow)


_ConfigDumper.add_representer(list, _represent_list)


def _flattened_text(config: ShippedConfig, merged: dict, chain: tuple[str, ...]) -> str:
    note = (
        f"Copied by `anchorkd configs copy` from the shipped config {config.name}, with the files it "
        f"extends merged into this one (in order: {', '.join(chain)}), so it stands alone wherever it is."
    )
    header = [*_leading_comments(config.path.read_text()), "#"]
    header += ["# " + line for line in textwrap.wrap(note, width=105)]
    return "\n".join(header) + "\n" + yaml.dump(merged, Dumper=_ConfigDumper, sort_keys=False)
