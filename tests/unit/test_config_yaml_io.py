"""``extends:`` overlays and ``a.b=value`` overrides (anchorkd.config.yaml_io); no ms-swift needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anchorkd.config.yaml_io import (
    apply_overrides,
    deep_merge,
    load_yaml_with_extends,
    parse_override,
    read_yaml_mapping,
    resolve_references,
)
from anchorkd.errors import ConfigError


def write(path: Path, data) -> Path:
    """Write ``data`` (a dict, or raw text) as a YAML file, creating folders on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# --- extends ---------------------------------------------------------------------------------------


def test_extends_string_is_relative_to_the_extending_file(tmp_path, monkeypatch):
    write(tmp_path / "parents" / "base.yaml", {"training": {"learning_rate": 0.1, "seed": 1}})
    child = write(tmp_path / "run.yaml", {"extends": "parents/base.yaml", "training": {"learning_rate": 0.2}})
    # From another working directory "parents/base.yaml" only makes sense relative to run.yaml.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    merged, files = load_yaml_with_extends(child)

    assert merged == {"training": {"learning_rate": 0.2, "seed": 1}}
    assert "extends" not in merged
    assert files == [(tmp_path / "parents" / "base.yaml").resolve(), child.resolve()]


def test_extends_list_merges_parents_in_order_then_the_file_itself(tmp_path):
    write(tmp_path / "a.yaml", {"training": {"seed": 1, "learning_rate": 0.1, "from_a": True}})
    write(tmp_path / "b.yaml", {"training": {"seed": 2, "from_b": True}})
    child = write(
        tmp_path / "run.yaml", {"extends": ["a.yaml", "b.yaml"], "training": {"learning_rate": 0.3}}
    )

    merged, files = load_yaml_with_extends(child)

    # b overrides a (later parent wins), the file itself overrides both.
    assert merged["training"] == {"seed": 2, "learning_rate": 0.3, "from_a": True, "from_b": True}
    assert [f.name for f in files] == ["a.yaml", "b.yaml", "run.yaml"]


def test_extends_nested_chain_resolves_each_path_relative_to_its_own_file(tmp_path):
    # run.yaml -> mid/mid.yaml -> mid/deeper/root.yaml ("deeper/root.yaml" is relative to mid.yaml).
    write(tmp_path / "mid" / "deeper" / "root.yaml", {"model": {"model": "/m", "torch_dtype": "float32"}})
    write(
        tmp_path / "mid" / "mid.yaml", {"extends": "deeper/root.yaml", "model": {"torch_dtype": "bfloat16"}}
    )
    child = write(tmp_path / "run.yaml", {"extends": "mid/mid.yaml", "data": {"dataset": ["x.jsonl"]}})

    merged, files = load_yaml_with_extends(child)

    assert merged == {"model": {"model": "/m", "torch_dtype": "bfloat16"}, "data": {"dataset": ["x.jsonl"]}}
    assert [f.name for f in files] == ["root.yaml", "mid.yaml", "run.yaml"]


def test_extends_deep_merges_mappings_and_replaces_lists(tmp_path):
    write(
        tmp_path / "base.yaml",
        {
            "custom": {"monitor": {"kd_spike_factor": 3.0, "kd_spike_window": 20}},
            "tuner": {"target_modules": ["q_proj", "v_proj"], "lora_rank": 8},
        },
    )
    child = write(
        tmp_path / "run.yaml",
        {
            "extends": "base.yaml",
            "custom": {"monitor": {"kd_spike_window": 5}},
            "tuner": {"target_modules": ["all-linear"]},
        },
    )

    merged, _ = load_yaml_with_extends(child)

    assert merged["custom"] == {"monitor": {"kd_spike_factor": 3.0, "kd_spike_window": 5}}
    assert merged["tuner"] == {
        "target_modules": ["all-linear"],
        "lora_rank": 8,
    }  # list replaced, not appended


def test_deep_merge_does_not_mutate_its_inputs():
    base = {"a": {"b": [1], "c": 1}}
    overlay = {"a": {"c": 2}}
    merged = deep_merge(base, overlay)
    merged["a"]["b"].append(2)
    assert base == {"a": {"b": [1], "c": 1}}
    assert overlay == {"a": {"c": 2}}
    assert merged == {"a": {"b": [1, 2], "c": 2}}


def test_extends_cycle_is_reported_with_the_whole_chain(tmp_path):
    a = write(tmp_path / "a.yaml", {"extends": "b.yaml", "training": {"seed": 1}})
    b = write(tmp_path / "b.yaml", {"extends": "a.yaml"})

    with pytest.raises(ConfigError) as info:
        load_yaml_with_extends(a)

    assert info.value.key_path == "extends"
    a, b = a.resolve(), b.resolve()
    assert f"extends cycle: {a} -> {b} -> {a}" in str(info.value)


def test_self_extends_is_a_cycle(tmp_path):
    a = write(tmp_path / "a.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError) as info:
        load_yaml_with_extends(a)
    assert info.value.key_path == "extends"
    assert f"extends cycle: {a.resolve()} -> {a.resolve()}" in str(info.value)


def test_diamond_extends_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", {"training": {"seed": 1}})
    write(tmp_path / "left.yaml", {"extends": "root.yaml", "training": {"learning_rate": 0.1}})
    write(tmp_path / "right.yaml", {"extends": "root.yaml", "training": {"warmup_ratio": 0.5}})
    child = write(tmp_path / "run.yaml", {"extends": ["left.yaml", "right.yaml"]})

    merged, _ = load_yaml_with_extends(child)

    assert merged == {"training": {"seed": 1, "learning_rate": 0.1, "warmup_ratio": 0.5}}


def test_missing_extended_file_names_the_path_and_the_file_that_extends_it(tmp_path):
    child = write(tmp_path / "run.yaml", {"extends": ["nope/base.yaml"]})
    with pytest.raises(ConfigError) as info:
        load_yaml_with_extends(child)
    assert info.value.key_path == "extends"
    assert f"extended file not found: {(tmp_path / 'nope' / 'base.yaml').resolve()}" in str(info.value)
    assert info.value.source == str(child.resolve())


def test_missing_config_file_is_reported_as_the_config_not_as_extends(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_yaml_with_extends(missing)
    assert info.value.key_path == "config"
    assert f"config file not found: {missing.resolve()}" in str(info.value)


@pytest.mark.parametrize("value", [3, {"a": "b.yaml"}, ["ok.yaml", 5]])
def test_extends_must_be_a_path_or_a_list_of_paths(tmp_path, value):
    write(tmp_path / "ok.yaml", {})
    child = write(tmp_path / "run.yaml", {"extends": value})
    with pytest.raises(ConfigError, match="must be a path or a list of paths") as info:
        load_yaml_with_extends(child)
    assert info.value.key_path == "extends"


def test_invalid_yaml_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "training:\n  seed: 1\n  learning_rate: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError) as info:
        read_yaml_mapping(bad)
    message = str(info.value)
    assert "invalid YAML at" in message
    # PyYAML reports the unclosed flow sequence where it notices it (line 4); the location is file:line.
    assert f"{bad}:4" in message


def test_invalid_yaml_in_an_extended_file_names_that_file(tmp_path):
    parent = write(tmp_path / "parent.yaml", "a: 1\nb: : :\n")
    child = write(tmp_path / "run.yaml", {"extends": "parent.yaml"})
    with pytest.raises(ConfigError) as info:
        load_yaml_with_extends(child)
    assert f"{parent.resolve()}:2" in str(info.value)


# --- a key written twice -------------------------------------------------------------------------------


def test_a_key_written_twice_names_the_key_path_file_and_both_lines(tmp_path):
    # The probe that found it: the second llm_kd_weight (0.0) silently made a GKD config plain SFT.
    path = write(
        tmp_path / "run.yaml",
        "rlhf:\n  rlhf_type: gkd\n  llm_kd_weight: 1.0\n  beta: 0.1\n  llm_kd_weight: 0.0\n",
    )
    with pytest.raises(ConfigError) as info:
        read_yaml_mapping(path)
    assert info.value.key_path == "rlhf.llm_kd_weight"
    assert info.value.source == f"{path}:5"
    assert str(info.value) == (
        f"rlhf.llm_kd_weight (in {path}:5): written twice in one mapping (lines 3 and 5); "
        "YAML would keep only the second value: keep one"
    )


def test_a_section_written_twice_is_refused(tmp_path):
    text = "training:\n  seed: 1\nrlhf:\n  beta: 0.1\ntraining:\n  learning_rate: 0.1\n"
    path = write(tmp_path / "run.yaml", text)
    with pytest.raises(ConfigError) as info:
        read_yaml_mapping(path)
    assert info.value.key_path == "training"
    assert "(lines 1 and 5); YAML would keep only the second block: write all its keys in one" in str(
        info.value
    )


def test_a_key_written_twice_in_an_extended_file_names_that_file(tmp_path):
    parent = write(tmp_path / "base.yaml", "custom:\n  visual_kd:\n    weight: 1.0\n    weight: 2.0\n")
    child = write(tmp_path / "run.yaml", {"extends": "base.yaml", "training": {"seed": 1}})
    with pytest.raises(ConfigError) as info:
        load_yaml_with_extends(child)
    assert info.value.key_path == "custom.visual_kd.weight"
    assert info.value.source == f"{parent.resolve()}:4"


def test_a_key_written_twice_in_a_list_item_or_an_override_is_refused(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  columns:\n    - {a: 1, a: 2}\n")
    with pytest.raises(ConfigError) as info:
        read_yaml_mapping(path)
    assert info.value.key_path == "data.columns[0].a" and "(line 3)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_override("custom.visual_kd={weight: 1, weight: 2}")
    assert info.value.key_path == "custom.visual_kd.weight"


def test_one_key_in_several_mappings_overlays_and_merge_keys_are_not_repeats(tmp_path):
    text = (
        "base: &base {seed: 1, learning_rate: 0.1}\n"
        "training:\n  <<: *base\n  learning_rate: 0.2\n"  # a merge key's value, then replaced
        "rlhf:\n  beta: 0.1\ncustom:\n  visual_kd: {weight: 0.0}\n  anchor: {weight: 1.0}\n"
    )
    data = read_yaml_mapping(write(tmp_path / "run.yaml", text))
    assert data["training"] == {"seed": 1, "learning_rate": 0.2}
    assert data["custom"] == {"visual_kd": {"weight": 0.0}, "anchor": {"weight": 1.0}}
    write(tmp_path / "parent.yaml", {"training": {"seed": 1}})
    child = write(tmp_path / "child.yaml", {"extends": "parent.yaml", "training": {"seed": 2}})
    assert load_yaml_with_extends(child)[0] == {"training": {"seed": 2}}  # an overlay sets a key again


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_config_root_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path / "root.yaml", text)
    with pytest.raises(ConfigError, match=f"a config file must hold a mapping, got {kind}") as info:
        read_yaml_mapping(path)
    assert info.value.key_path == "<root>"


def test_empty_config_file_is_an_empty_mapping(tmp_path):
    assert read_yaml_mapping(write(tmp_path / "empty.yaml", "# only a comment\n")) == {}


def test_scientific_notation_without_a_dot_is_a_float_in_files(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 as a string; users mean a number.
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    path = write(tmp_path / "run.yaml", "training:\n  learning_rate: 1e-4\n  tags: [2E3, abc]\n  name: e5\n")
    data = read_yaml_mapping(path)
    assert data["training"]["learning_rate"] == pytest.approx(1e-4)
    assert isinstance(data["training"]["learning_rate"], float)
    assert data["training"]["tags"] == [2000.0, "abc"]
    assert data["training"]["name"] == "e5"


# --- overrides ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("a.b=1", ["a", "b"], 1),
        ("x=[1,2]", ["x"], [1, 2]),
        ("x=null", ["x"], None),
        ("training.learning_rate=1e-4", ["training", "learning_rate"], 1e-4),
        ("model.model=/models/Qwen3-VL-4B", ["model", "model"], "/models/Qwen3-VL-4B"),
        ("x=a=b", ["x"], "a=b"),
        ("rlhf.seq_kd=false", ["rlhf", "seq_kd"], False),
    ],
)
def test_override_value_is_parsed_as_yaml(text, keys, value):
    parsed_keys, parsed_value = parse_override(text)
    assert parsed_keys == keys
    assert parsed_value == value
    assert type(parsed_value) is type(value)


def test_override_scientific_notation_is_a_float_not_a_string():
    assert yaml.safe_load("1e-4") == "1e-4"  # what PyYAML alone would give
    _, value = parse_override("lr=1e-4")
    assert isinstance(value, float)
    assert value == pytest.approx(1e-4)


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1", ".a=1", "a.=1"])
def test_malformed_override_is_rejected(text):
    with pytest.raises(ConfigError, match="must look like section.key=value") as info:
        parse_override(text)
    assert repr(text) in str(info.value)


def test_override_value_that_is_not_yaml_is_rejected():
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        parse_override("tuner.target_modules=[a, b")
    assert info.value.key_path == "tuner.target_modules"


def test_overrides_set_values_and_create_nested_mappings():
    config = {"training": {"seed": 1}, "rlhf": None}
    result = apply_overrides(
        config,
        ["training.learning_rate=1e-4", "custom.visual_kd.weight=0.5", "rlhf.beta=0.1", "training.seed=null"],
    )
    assert result == {
        "training": {"learning_rate": 1e-4},  # seed=null cleared the key: ms-swift's default applies
        "rlhf": {"beta": 0.1},
        "custom": {"visual_kd": {"weight": 0.5}},
    }
    assert config == {"training": {"seed": 1}, "rlhf": None}  # the input is not modified


def test_overrides_apply_in_order_so_the_last_one_wins():
    assert apply_overrides({}, ["a.b=1", "a.b=2"]) == {"a": {"b": 2}}
    assert apply_overrides({}, ["a.b=1", "a=[3]"]) == {"a": [3]}


def test_override_through_a_non_mapping_names_the_path():
    config = {"model": {"model": "/models/x"}}
    with pytest.raises(ConfigError) as info:
        apply_overrides(config, ["model.model.revision=main"])
    assert info.value.key_path == "model.model"
    assert "cannot set model.model.revision: model.model is not a mapping" in str(info.value)


# --- YAML 1.2 booleans ------------------------------------------------------------------------------------


def test_only_true_and_false_are_booleans(tmp_path):
    # YAML 1.1 (PyYAML's default) turns no/yes/on/off into booleans; ms-swift wants eval_strategy "no".
    assert yaml.safe_load("eval_strategy: no") == {"eval_strategy": False}
    path = write(
        tmp_path / "run.yaml", "training:\n  eval_strategy: no\n  a: yes\n  b: off\n  c: true\n  d: False\n"
    )
    assert read_yaml_mapping(path)["training"] == {
        "eval_strategy": "no",
        "a": "yes",
        "b": "off",
        "c": True,
        "d": False,
    }
    assert parse_override("training.eval_strategy=no") == (["training", "eval_strategy"], "no")
    assert parse_override("training.gradient_checkpointing=true") == (
        ["training", "gradient_checkpointing"],
        True,
    )


# --- ${section.key} references -----------------------------------------------------------------------------


def test_reference_takes_the_value_at_that_path():
    config = {
        "model": {"model": "/models/base"},
        "rlhf": {"teacher_model": "${model.model}"},
        "data": {"dataset": ["${model.model}"]},
    }
    resolved = resolve_references(config)
    assert resolved["rlhf"]["teacher_model"] == "/models/base"
    assert resolved["data"]["dataset"] == ["/models/base"]
    assert config["rlhf"]["teacher_model"] == "${model.model}"  # the input is not modified


def test_reference_follows_overrides_and_overlays(tmp_path):
    write(
        tmp_path / "base.yaml", {"model": {"model": "/models/a"}, "rlhf": {"teacher_model": "${model.model}"}}
    )
    child = write(tmp_path / "run.yaml", {"extends": "base.yaml", "model": {"model": "/models/b"}})
    merged, _ = load_yaml_with_extends(child)
    assert resolve_references(merged)["rlhf"]["teacher_model"] == "/models/b"
    overridden = apply_overrides(merged, ["model.model=/models/c"])
    assert resolve_references(overridden)["rlhf"]["teacher_model"] == "/models/c"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${model.revision}", "${model.revision} refers to a key that is not set"),
        ("${rlhf.other}", "${rlhf.other} refers to another reference (${model.model}); give a value"),
        ("${model}", "malformed reference '${model}'"),
        ("${ model.model }", "malformed reference '${ model.model }'"),
    ],
)
def test_bad_reference_names_the_key_that_holds_it(value, expected):
    config = {"model": {"model": "/m"}, "rlhf": {"other": "${model.model}", "teacher_model": value}}
    with pytest.raises(ConfigError) as info:
        resolve_references(config)
    assert info.value.key_path == "rlhf.teacher_model"
    assert expected in str(info.value)
