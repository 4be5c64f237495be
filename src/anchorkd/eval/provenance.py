"""Where an evaluation result came from: library versions, input file hashes, source revision.

Evaluation numbers are only comparable when the inputs and the code that produced them are the same.
Every file an evaluation step writes carries this record, so "why did CHAIR-i move?" can be answered
by diffing two JSON files instead of by memory. Nothing here may fail an evaluation: a value that
cannot be found (no git, a package not installed) is recorded as None.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from anchorkd.io import sha256_file

# Distribution names (as pip knows them) whose versions change generated text or scores.
TRACKED_DISTRIBUTIONS = {
    "anchorkd": "anchorkd",
    "ms-swift": "ms-swift",
    "transformers": "transformers",
    "torch": "torch",
    "peft": "peft",
}


def describe_file(path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256"}`` of an input file, with the path made absolute so it stays unambiguous."""
    resolved = Path(path).expanduser().resolve()
    return {"path": str(resolved), "sha256": sha256_file(resolved)}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the results (None when one is not installed)."""
    versions: dict[str, str | None] = {}
    for label, distribution in TRACKED_DISTRIBUTIONS.items():
        try:
            versions[label] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[label] = None
    return versions


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        completed = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def git_revision(cwd: str | Path | None = None) -> dict[str, Any] | None:
    """The commit checked out in ``cwd`` (default: the working directory) and whether it has local edits.

    Returns None outside a git work tree or without git: provenance is best effort.
    """
    directory = Path(cwd) if cwd is not None else Path.cwd()
    commit = _git(["rev-parse", "HEAD"], directory)
    if commit is None:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], directory)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def run_provenance() -> dict[str, Any]:
    """The record stored with every evaluation output: versions, git revision, time and Python."""
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "python": platform.python_version(),
        "git": git_revision(),
    }
