"""The one dense-caption grammar: what the writer emits, the parser reads back; model slips are tolerated."""

from __future__ import annotations

import numpy as np
import pytest

from anchorkd.data.dense_caption import dense_caption, normalize_phrase, parse_dense_caption
from anchorkd.demo.scenes import SCENE_KINDS, draw_scene
from anchorkd.demo.synthetic import DENSE_WORDS, scene_annotations
from anchorkd.eval.lexicon import load_lexicon


def test_writer_output_is_the_documented_format():
    objects = [{"name": "patch_panel", "box": [0, 1, 2, 3]}, {"name": "bbu", "box": [4, 5, 6, 7]}]
    assert dense_caption(objects, DENSE_WORDS) == "- patch panel: [0, 1, 2, 3]\n- BBU: [4, 5, 6, 7]"
    assert dense_caption(objects) == "- patch_panel: [0, 1, 2, 3]\n- bbu: [4, 5, 6, 7]"
    assert dense_caption([]) == ""


@pytest.mark.parametrize("kind", SCENE_KINDS)
@pytest.mark.parametrize("grid", [10, 1000])
def test_writer_then_parser_round_trip_on_drawn_scenes(kind, grid):
    lexicon = load_lexicon()
    for seed in range(5):
        objects = scene_annotations(draw_scene(kind, np.random.default_rng(seed), 192), grid)
        # Words that are not the canonical name in another spelling ("car" for vehicle) are read back
        # through the lexicon, as evaluation reads model output.
        for words, canonicalize in ((DENSE_WORDS, lexicon.canonicalize), (None, None)):
            parsed = parse_dense_caption(dense_caption(objects, words), canonicalize)
            assert parsed.malformed_lines == ()
            assert [(f.name, list(f.box)) for f in parsed.fields] == [(o["name"], o["box"]) for o in objects]


def test_parser_tolerates_model_slips_and_keeps_the_rest_as_malformed():
    text = "\n".join(
        [
            "rack: [52, 104, 312, 958]",
            "  patch_panel :[1,2 ,3,  4]  ",
            "Here are the objects:",
            "bbu: [1, 2, 3]",
            "cable: [1, 2, 3, 4, 5]",
            "label: [1.5, 2, 3, 4]",  # a decimal coordinate is still a box
            "tower [1, 2, 3, 4]",  # and so is a line without the colon
            "",
            "- patch panel: [0, 1, 2, 3]",
            "-BBU: [4, 5, 6, 7]",
            "* Patch-Panel: (8 9 10 11).",
            "- widget: [3, 3, 2, 2]",  # unknown names are kept; swapped corners reordered
        ]
    )
    parsed = parse_dense_caption(text)
    assert [(f.name, f.box) for f in parsed.fields] == [
        ("rack", (52, 104, 312, 958)),
        ("patch_panel", (1, 2, 3, 4)),
        ("label", (1.5, 2, 3, 4)),
        ("tower", (1, 2, 3, 4)),
        ("patch_panel", (0, 1, 2, 3)),
        ("bbu", (4, 5, 6, 7)),
        ("patch_panel", (8, 9, 10, 11)),
        ("widget", (2, 2, 3, 3)),
    ]
    assert parsed.malformed_lines == ("Here are the objects:", "bbu: [1, 2, 3]", "cable: [1, 2, 3, 4, 5]")
    assert parse_dense_caption("") == parse_dense_caption("```\n\n```") == parse_dense_caption("\n")
    assert parse_dense_caption("").fields == ()


def test_canonicalize_decides_names_it_knows():
    known = {"cabinet": "rack"}
    parsed = parse_dense_caption(
        "- Cabinet: [0, 0, 1, 1]\n- Baseband Unit: [0, 0, 1, 1]", lambda name: known.get(name.lower())
    )
    assert [f.name for f in parsed.fields] == ["rack", "baseband_unit"]


def test_normalize_phrase():
    assert normalize_phrase("  Patch_Panel ") == "patch panel"
    assert normalize_phrase("patch -  panel") == "patch panel"
