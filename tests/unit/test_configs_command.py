"""``anchorkd configs list`` / ``anchorkd configs copy``: the shipped configs as a catalogue to start from."""

from __future__ import annotations

from pathlib import Path

import pytest

from anchorkd.cli import EXIT_BAD_INPUT, main
from anchorkd.config import ConfigLoader
from anchorkd.config.yaml_io import load_yaml_with_extends, read_yaml_mapping
from anchorkd.resources import default_lexicon_path, shipped_configs_dir
from anchorkd.shipped_configs import (
    copy_shipped_config,
    find_shipped_config,
    is_engine_overlay,
    list_shipped_configs,
)

SHIPPED_DIR = shipped_configs_dir()
ALL_NAMES = sorted(p.relative_to(SHIPPED_DIR).as_posix() for p in SHIPPED_DIR.rglob("*.yaml"))
EXTENDING = [n for n in ALL_NAMES if "extends" in read_yaml_mapping(SHIPPED_DIR / n)]
# Training configs a user would run; ``_*.yaml`` overlays, engine overlays and lexicons are not run alone.
RUNNABLE = [
    n
    for n in ALL_NAMES
    if not n.startswith("lexicons/")
    and not Path(n).name.startswith("_")
    and not is_engine_overlay(SHIPPED_DIR / n)
]


def test_the_parametrized_lists_are_not_empty():
    assert {"recipes/forward_only_kd.yaml", "demo/stage_3_visual_kd.yaml"} <= set(EXTENDING)
    assert {"stage_2_llm_lora.yaml", "testbed/base.yaml", "recipes/visual_only_kd.yaml"} <= set(RUNNABLE)
    assert "demo/_tiny.yaml" not in RUNNABLE and "lexicons/telecom_default.yaml" not in RUNNABLE
    assert "recipes/zero3.yaml" not in RUNNABLE and "recipes/zero3.yaml" in ALL_NAMES


def test_the_shipped_folder_is_the_checkout_configs_folder():
    repo_configs = Path(__file__).resolve().parents[2] / "configs"
    assert SHIPPED_DIR.resolve() == repo_configs.resolve()
    assert default_lexicon_path().is_file()
    assert default_lexicon_path().parent.parent == SHIPPED_DIR


def test_list_names_every_shipped_config_with_its_first_comment_line(capsys):
    assert main(["configs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ALL_NAMES)
    listed = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines}
    assert sorted(listed) == ALL_NAMES
    assert "recipes/forward_only_kd.yaml" in listed
    assert "lexicons/telecom_default.yaml" in listed
    for name, description in listed.items():
        first = (SHIPPED_DIR / name).read_text().splitlines()[0]
        assert first == f"# {description}", name
    # Top-level stage configs come first, then the subfolders.
    assert lines[0].split()[0] == "stage_2_llm_lora.yaml"


def test_find_accepts_the_name_without_suffix_or_with_the_configs_prefix():
    assert find_shipped_config("recipes/forward_only_kd").name == "recipes/forward_only_kd.yaml"
    assert find_shipped_config("configs/recipes/forward_only_kd.yaml").path == (
        SHIPPED_DIR / "recipes" / "forward_only_kd.yaml"
    )
    assert find_shipped_config("stage_3_gkd.yml").name == "stage_3_gkd.yaml"


def test_copy_without_extends_is_byte_for_byte(tmp_path, capsys):
    code = main(["configs", "copy", "lexicons/telecom_default.yaml", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    copied = tmp_path / "telecom_default.yaml"
    assert copied.read_bytes() == default_lexicon_path().read_bytes()
    assert f"to {copied} (verbatim)" in capsys.readouterr().out


def test_copy_to_a_file_path(tmp_path):
    target = tmp_path / "my_stage2.yaml"
    copied = copy_shipped_config("stage_2_llm_lora", target)
    assert copied.target == target
    assert copied.merged_from == ()
    assert target.read_bytes() == (SHIPPED_DIR / "stage_2_llm_lora.yaml").read_bytes()


@pytest.mark.parametrize("name", EXTENDING)
def test_copy_of_an_extending_config_is_flattened_and_means_the_same(name, tmp_path):
    """The copy stands alone (no ``extends``) and merges to exactly what the shipped chain merges to."""
    copied = copy_shipped_config(name, tmp_path / "copy.yaml")
    assert "extends" not in read_yaml_mapping(copied.target)
    assert copied.merged_from[-1] == name and len(copied.merged_from) >= 2
    shipped, _ = load_yaml_with_extends(SHIPPED_DIR / name)
    flat, sources = load_yaml_with_extends(copied.target)
    assert flat == shipped
    assert sources == [copied.target.resolve()]
    text = copied.target.read_text()
    assert text.splitlines()[0] == (SHIPPED_DIR / name).read_text().splitlines()[0]
    assert f"from the shipped config {name}" in " ".join(line.lstrip("# ") for line in text.splitlines())


def test_flattened_copy_keeps_references_so_they_follow_later_overrides(tmp_path):
    copied = copy_shipped_config("recipes/forward_only_kd", tmp_path / "kd.yaml")
    assert read_yaml_mapping(copied.target)["rlhf"]["teacher_model"] == "${model.model}"
    config = ConfigLoader.resolve(copied.target, ["model.model=/somewhere/else"], check_files=False)
    assert config.sections["rlhf"]["teacher_model"] == "/somewhere/else"


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_copied_training_config_resolves_like_the_shipped_one(name, tmp_path):
    copied = copy_shipped_config(name, tmp_path)
    from_copy = ConfigLoader.resolve(copied.target, check_files=False)
    from_shipped = ConfigLoader.resolve(SHIPPED_DIR / name, check_files=False)
    assert from_copy.to_yaml().split("\n", 1)[1] == from_shipped.to_yaml().split("\n", 1)[1]
    assert (from_copy.mode, from_copy.llm_kd_weight) == (from_shipped.mode, from_shipped.llm_kd_weight)


def test_copied_demo_config_validates_from_another_folder(in_demo_workdir, capsys):
    """Copied into a folder of its own (no shipped file beside it), the demo config passes ``validate``."""
    own = in_demo_workdir / "my_configs"
    own.mkdir(exist_ok=True)
    assert main(["configs", "copy", "demo/forward_only_kd.yaml", str(own), "--force"]) == 0
    copied = own / "forward_only_kd.yaml"
    assert main(["validate", str(copied)]) == 0
    out = capsys.readouterr().out
    assert f"{copied}: OK (gkd, RLHFArguments)" in out
    assert "trainer_variant=gkd_monitor llm_kd_weight=1.0 visual_kd=off" in out


def test_copy_refuses_to_overwrite_without_force(tmp_path, capsys):
    target = tmp_path / "stage_3_gkd.yaml"
    target.write_text("# mine\n")
    code = main(["configs", "copy", "stage_3_gkd", str(tmp_path)])
    assert code == EXIT_BAD_INPUT
    assert f"{target} already exists; pass --force" in capsys.readouterr().err
    assert target.read_text() == "# mine\n"
    assert main(["configs", "copy", "stage_3_gkd", str(tmp_path), "--force"]) == 0
    assert "extends" not in read_yaml_mapping(target)
    assert target.read_text().startswith("# Stage 3 with KL-anchored SFT")


def test_unknown_name_exits_2_naming_close_matches_and_writes_nothing(tmp_path, capsys):
    code = main(["configs", "copy", "forward_only_kd", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "no shipped config named 'forward_only_kd'" in err
    assert "demo/forward_only_kd.yaml" in err and "recipes/forward_only_kd.yaml" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_without_close_match_points_at_the_list(tmp_path, capsys):
    assert main(["configs", "copy", "qqqq", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "`anchorkd configs list` shows them all" in capsys.readouterr().err


def test_missing_parent_folder_needs_make_parents(tmp_path, capsys):
    target = tmp_path / "a" / "b" / "kd.yaml"
    assert main(["configs", "copy", "recipes/forward_only_kd", str(target)]) == EXIT_BAD_INPUT
    assert f"folder {target.parent} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["configs", "copy", "recipes/forward_only_kd", str(target), "--make-parents"]) == 0
    assert target.is_file()


def test_a_trailing_slash_means_a_folder(tmp_path, capsys):
    folder = tmp_path / "new"
    assert main(["configs", "copy", "testbed/base", f"{folder}/"]) == EXIT_BAD_INPUT
    assert not folder.exists()
    assert main(["configs", "copy", "testbed/base", f"{folder}/", "--make-parents"]) == 0
    assert (folder / "base.yaml").read_bytes() == (SHIPPED_DIR / "testbed" / "base.yaml").read_bytes()


def test_demo_reads_the_shipped_testbed_recipes_by_default(tmp_path):
    from anchorkd.cli import build_parser
    from anchorkd.demo.testbed import testbed_paths

    assert build_parser().parse_args(["demo"]).configs is None
    paths = testbed_paths(tmp_path / "tb")
    assert paths.configs == (SHIPPED_DIR / "testbed").resolve()
    assert (paths.configs / "base.yaml").is_file()
    assert testbed_paths(tmp_path / "tb", tmp_path / "mine").configs == (tmp_path / "mine").resolve()


def test_the_listing_covers_exactly_the_shipped_files():
    assert [c.name for c in sorted(list_shipped_configs(), key=lambda c: c.name)] == ALL_NAMES
