"""A built wheel carries the shipped configs and the lexicon, and an installed copy finds them.

The wheel is built offline from a copy of the sources (so stale ``build/`` output in the checkout cannot
leak in), installed with ``pip --target``, and exercised in a subprocess whose only anchorkd is that
install: ``PYTHONPATH`` names it alone and the working directory is outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "src" / "anchorkd" / "configs"

PROBE = """
import json, sys
import anchorkd, anchorkd.resources as r
from anchorkd.demo.testbed import testbed_paths
testbed = testbed_paths("tb").configs
print(json.dumps({"package": anchorkd.__file__, "lexicon": str(r.default_lexicon_path()),
                  "lexicon_is_file": r.default_lexicon_path().is_file(),
                  "testbed": str(testbed), "testbed_base": (testbed / "base.yaml").is_file()}))
"""


def _run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the --target folder it was installed into)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
    )
    dist = work / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), "."], source)
    (wheel,) = dist.glob("anchorkd-*.whl")
    site = work / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], work)
    return wheel, site


def _installed_env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return env


def test_the_wheel_contains_every_shipped_config(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {n for n in archive.namelist() if n.startswith("anchorkd/configs/")}
    expected = {f"anchorkd/configs/{p.relative_to(SHIPPED).as_posix()}" for p in SHIPPED.rglob("*.yaml")}
    assert "anchorkd/configs/lexicons/telecom_default.yaml" in expected
    assert "anchorkd/configs/recipes/forward_only_kd.yaml" in expected
    assert in_wheel == expected


def test_an_installed_copy_finds_the_lexicon_and_the_configs(installed, tmp_path):
    _, site = installed
    env = _installed_env(site)
    probe = json.loads(_run([sys.executable, "-c", PROBE], tmp_path, env).stdout)
    assert Path(probe["package"]).resolve().is_relative_to(site.resolve())
    assert Path(probe["lexicon"]).resolve().is_relative_to(site.resolve())
    assert probe["lexicon_is_file"] is True
    # `anchorkd demo` without --configs reads the installed testbed recipes.
    assert Path(probe["testbed"]).is_relative_to(site.resolve()) and probe["testbed_base"] is True

    cli = [str(site / "bin" / "anchorkd")]  # the console script pip wrote for the installed copy
    listing = _run([*cli, "configs", "list"], tmp_path, env).stdout
    names = [line.split()[0] for line in listing.splitlines()]
    assert sorted(names) == sorted(p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*.yaml"))
    assert {"recipes/forward_only_kd.yaml", "recipes/stage_3_visual_kd.yaml"} <= set(names)

    copied = _run([*cli, "configs", "copy", "recipes/visual_only_kd", "mine.yaml"], tmp_path, env).stdout
    assert "copied recipes/visual_only_kd.yaml to mine.yaml (flattened from 5 files)" in copied
    mine = yaml.safe_load((tmp_path / "mine.yaml").read_text())
    assert "extends" not in mine
    assert mine["rlhf"]["llm_kd_weight"] == 0.0
    assert mine["custom"]["visual_kd"]["enabled"] is True
