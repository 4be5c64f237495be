"""Imports run downward: each package of anchorkd imports only the layers below it (read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "anchorkd"
BOTTOM = {"errors", "io", "swift_seam", "deepspeed_seam", "waits", "checkpoints", "offline", "resources"}
# What each package may import from anchorkd, besides itself and the bottom layer.
ALLOWED = {
    "losses": set(),
    "config": set(),
    "data": {"config"},
    "monitor": {"config"},
    "eval": {"config", "data", "monitor"},
    "trainers": {"config", "data", "losses", "monitor", "eval", "checks"},
    "demo": {"config", "data", "eval", "trainers", "monitor", "losses", "checks"},
}


def anchorkd_imports(path: Path) -> set[str]:
    """Top-level anchorkd modules/packages that ``path`` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    package_parts = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [target] if target else [[alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "anchorkd":
                names = [node.module.split(".")[1:]]
            else:
                continue
            found |= {parts[0] for parts in names if parts}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "anchorkd" and len(parts) > 1:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below(package):
    for path in sorted((PACKAGE / package).rglob("*.py")):
        upward = anchorkd_imports(path) - ALLOWED[package] - BOTTOM - {package}
        assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}"


def test_the_scan_sees_relative_imports():
    assert {"errors", "checkpoints", "swift_seam"} <= anchorkd_imports(PACKAGE / "config" / "loader.py")
