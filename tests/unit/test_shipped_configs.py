"""Every config shipped under configs/ resolves, and says in its header how to run it.

The list is a glob, so a config added later is tested without touching this file. ``configs/lexicons/``
holds another format (eval lexicons), and files named ``_*.yaml`` are partial overlays that other
configs extend. Engine overlays (``recipes/zero3.yaml``, ...: only ``training`` keys, no ``extends``) are
never run alone: their header shows the ``extends:`` line that lists one after a stage config, and each is
checked composed with every stage config.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

import pytest
import yaml

from anchorkd.cli import build_parser
from anchorkd.config import ConfigLoader
from anchorkd.config.yaml_io import parse_override
from anchorkd.shipped_configs import is_engine_overlay

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs"
DEMO_DIR = CONFIGS_DIR / "demo"


def shipped_configs() -> list[Path]:
    return sorted(
        p
        for p in CONFIGS_DIR.rglob("*.yaml")
        if "lexicons" not in p.relative_to(CONFIGS_DIR).parts and not p.name.startswith("_")
    )


SHIPPED = shipped_configs()
ENGINE_OVERLAYS = [p for p in SHIPPED if is_engine_overlay(p)]
RUNNABLE = [p for p in SHIPPED if p not in ENGINE_OVERLAYS]
STAGE = [p for p in RUNNABLE if DEMO_DIR not in p.parents]
DEMO = [p for p in RUNNABLE if DEMO_DIR in p.parents]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def header_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def run_command(path: Path) -> list[str]:
    """The ``anchorkd ...`` command in the header that names this config (continuation lines joined)."""
    logical, pending = [], ""
    for line in header_lines(path):
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            logical.append(pending + line)
            pending = ""
    for line in logical:
        for segment in line.split("&&"):
            at = segment.find(rel(path))
            start = segment.rfind("anchorkd ", 0, max(at, 0))
            if at >= 0 and start >= 0:
                return shlex.split(segment[start:])
    raise AssertionError(f"{rel(path)}: no header line runs 'anchorkd ... {rel(path)}'")


def test_the_glob_finds_the_shipped_configs():
    names = {rel(p) for p in SHIPPED}
    assert {"configs/stage_2_llm_lora.yaml", "configs/stage_3_vision_llm.yaml"} <= names
    assert {"configs/demo/stage_2_llm_lora.yaml", "configs/demo/stage_3_vision_llm.yaml"} <= names
    assert not any("lexicons" in n or Path(n).name.startswith("_") for n in names)


@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_header_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{rel(path)}: the first line must be a comment saying what the config is"
    assert any("anchorkd " in line and rel(path) in line for line in header_lines(path))
    argv = run_command(path)
    assert argv[0] == "anchorkd"
    ns = build_parser().parse_args(argv[1:])
    assert ns.command in {"train", "validate"}
    assert ns.config == rel(path)


@pytest.mark.parametrize("path", STAGE, ids=rel)
def test_stage_config_resolves(path):
    config = ConfigLoader.resolve(path, check_files=False)
    assert config.sections["model"]["model"]
    assert config.sections["data"]["dataset"]
    assert config.sources[-1] == path.resolve()
    # The overrides given in the header's command are valid too.
    ns = build_parser().parse_args(run_command(path)[1:])
    with_overrides = ConfigLoader.resolve(path, ns.overrides, check_files=False)
    assert with_overrides.mode == config.mode
    for text in ns.overrides:
        (section, key), value = parse_override(text)
        assert with_overrides.sections[section][key] == value


@pytest.mark.parametrize("path", DEMO, ids=rel)
def test_demo_config_loads_on_the_tiny_model(path, in_demo_workdir):
    runs = in_demo_workdir / "outputs" / "demo" / "runs"
    before = sorted(runs.rglob("*")) if runs.exists() else None
    config, train_args = ConfigLoader.load_training_config(path, create_output_dir=False)
    assert config.sections["model"]["model"] == "./outputs/demo/tiny-qwen3-vl"
    assert type(train_args).__name__ == ("RLHFArguments" if config.mode == "gkd" else "SftArguments")
    assert train_args.llm_kd_weight == config.llm_kd_weight
    assert (sorted(runs.rglob("*")) if runs.exists() else None) == before  # nothing written


@pytest.mark.parametrize("path", DEMO, ids=rel)
def test_demo_configs_extend_the_tiny_overlay(path):
    extends = yaml.safe_load(path.read_text())["extends"]
    extends = [extends] if isinstance(extends, str) else extends
    assert "_tiny.yaml" in extends
    config = ConfigLoader.resolve(path, check_files=False)
    assert (DEMO_DIR / "_tiny.yaml").resolve() in config.sources
    tiny = yaml.safe_load((DEMO_DIR / "_tiny.yaml").read_text())
    for section, values in tiny.items():
        for key, value in values.items():
            assert config.sections[section][key] == value, f"{section}.{key} not taken from _tiny.yaml"


def test_every_overlay_is_extended_by_some_config():
    overlays = sorted(p for p in CONFIGS_DIR.rglob("_*.yaml") if "lexicons" not in p.parts)
    assert DEMO_DIR / "_tiny.yaml" in overlays
    used = {src for p in RUNNABLE for src in ConfigLoader.resolve(p, check_files=False).sources}
    assert [p for p in overlays if p.resolve() not in used] == []


@pytest.mark.parametrize(
    ("base_name", "overlay_name"),
    [("stage_2_llm_lora.yaml", "stage_2_llm_lora_gkd.yaml"), ("stage_3_vision_llm.yaml", "stage_3_gkd.yaml")],
)
def test_gkd_overlays_change_only_trainer_and_teacher_knobs(base_name, overlay_name):
    """Switching vanilla SFT to KL-anchored SFT is an overlay that touches only `rlhf` and `custom`."""
    base = ConfigLoader.resolve(CONFIGS_DIR / base_name, check_files=False)
    overlay = ConfigLoader.resolve(CONFIGS_DIR / overlay_name, check_files=False)
    differing = {name for name in base.sections if base.sections[name] != overlay.sections[name]}
    assert differing == {"rlhf"}
    assert overlay.custom.trainer_variant == "gkd_monitor" and base.custom.trainer_variant == "default"
    assert overlay.mode == "gkd" and base.mode == "sft"
    assert overlay.sections["rlhf"]["teacher_model"] == base.sections["model"]["model"]


# --- engine overlays ----------------------------------------------------------------------------------------

ENGINE_KEYS = {
    "zero2.yaml": ("deepspeed", "zero2"),
    "zero3.yaml": ("deepspeed", "zero3"),
    "fsdp2.yaml": ("fsdp", "fsdp2"),
}


def test_the_engine_overlays_are_shipped_and_recognised():
    assert {rel(p) for p in ENGINE_OVERLAYS} == {f"configs/recipes/{name}" for name in ENGINE_KEYS}


@pytest.fixture
def gpu_machine(monkeypatch):
    """Resolve as on a machine with a GPU (FSDP is refused without one), leaving the environment as it was
    (ms-swift exports FSDP variables while building the arguments)."""
    from anchorkd.config.rules import LaunchEnvironment

    saved = dict(os.environ)
    monkeypatch.setattr(LaunchEnvironment, "detect", classmethod(lambda cls: cls(1, True)))
    yield
    os.environ.clear()
    os.environ.update(saved)


def with_overlay(folder: Path, stage: Path, overlay: Path) -> Path:
    run = folder / "my_run.yaml"
    run.write_text(yaml.safe_dump({"extends": [str(stage), str(overlay)]}))
    return run


@pytest.mark.parametrize("path", ENGINE_OVERLAYS, ids=rel)
def test_engine_overlay_header_shows_how_to_use_it(path, tmp_path, gpu_machine):
    header = header_lines(path)
    assert path.read_text().startswith("# Engine overlay: ")
    extends_lines = [line for line in header if line.startswith("extends:")]
    assert len(extends_lines) == 1
    listed = yaml.safe_load(extends_lines[0])["extends"]
    assert listed[-1] == rel(path) and len(listed) == 2  # a stage config first, the overlay on top
    stage = REPO_ROOT / listed[0]
    assert stage in STAGE
    commands = [line[line.index("anchorkd ") :] for line in header if "anchorkd train" in line]
    ns = build_parser().parse_args(shlex.split(commands[0])[1:])
    assert ns.config == "my_run.yaml"
    config = ConfigLoader.resolve(with_overlay(tmp_path, stage, path), ns.overrides, check_files=False)
    key, value = ENGINE_KEYS[path.name]
    assert config.sections["training"][key] == value


@pytest.mark.parametrize("stage", STAGE, ids=rel)
@pytest.mark.parametrize("path", ENGINE_OVERLAYS, ids=rel)
def test_engine_overlay_composes_with_every_stage_config(path, stage, tmp_path, gpu_machine):
    """Listed after any stage config, an overlay sets its engine keys and changes nothing else."""
    alone = ConfigLoader.resolve(stage, check_files=False)
    composed = ConfigLoader.resolve(with_overlay(tmp_path, stage, path), check_files=False)
    overlay_keys = yaml.safe_load(path.read_text())["training"]
    assert composed.mode == alone.mode and composed.custom == alone.custom
    for name, values in alone.sections.items():
        expected = {**values, **overlay_keys} if name == "training" else values
        assert composed.sections[name] == expected, name


@pytest.mark.parametrize("path", ENGINE_OVERLAYS, ids=rel)
def test_engine_overlay_builds_ms_swift_arguments(path, in_demo_workdir, gpu_machine):
    key, value = ENGINE_KEYS[path.name]
    if key == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (ms-swift refuses training.deepspeed without it)")
    run = with_overlay(in_demo_workdir, DEMO_DIR / "stage_2_llm_lora_gkd.yaml", path)
    _, train_args = ConfigLoader.load_training_config(run, create_output_dir=False)
    if key == "deepspeed":
        assert train_args.deepspeed["zero_optimization"]["stage"] == int(value.removeprefix("zero"))
    else:
        assert "full_shard" in train_args.fsdp and train_args.fsdp_config["fsdp_version"] == 2
