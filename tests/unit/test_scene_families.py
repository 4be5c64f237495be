"""The kitchen, street and field scene families: determinism, boxes, layout promises, names, captions."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from anchorkd.data.dense_caption import dense_caption, parse_dense_caption
from anchorkd.demo.scenes import (
    FIELD,
    FIELD_OBJECTS,
    KITCHEN,
    KITCHEN_OBJECTS,
    MIN_OBJECT_SIDE,
    OBJECTS_BY_KIND,
    SCENE_KINDS,
    STREET,
    STREET_OBJECTS,
    draw_scene,
)
from anchorkd.demo.synthetic import CAPTION_WORDS, DENSE_WORDS, general_caption, scene_annotations
from anchorkd.eval.lexicon import load_lexicon
from anchorkd.eval.metrics import analyze_caption

FAMILIES = (KITCHEN, STREET, FIELD)
SEEDS = range(12)
SIZE = 192


@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon()


def scenes(kind, seeds=SEEDS, size=SIZE):
    return [draw_scene(kind, np.random.default_rng(seed), size) for seed in seeds]


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_kinds_and_object_tuples_are_exported():
    assert SCENE_KINDS == ("indoor", "outdoor", "kitchen", "street", "field")
    assert OBJECTS_BY_KIND[KITCHEN] == KITCHEN_OBJECTS
    assert OBJECTS_BY_KIND[STREET] == STREET_OBJECTS
    assert OBJECTS_BY_KIND[FIELD] == FIELD_OBJECTS
    assert set(OBJECTS_BY_KIND) == set(SCENE_KINDS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_same_seed_same_bytes_other_seed_other_image(kind):
    for seed in (0, 7):
        a, b = (draw_scene(kind, np.random.default_rng(seed), SIZE) for _ in range(2))
        assert a.kind == b.kind == kind
        assert a.image.tobytes() == b.image.tobytes()
        assert a.objects == b.objects
    images = {scene.image.tobytes() for scene in scenes(kind, range(6))}
    assert len(images) == 6


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("size", [64, SIZE, 512])
def test_boxes_lie_inside_the_image_and_keep_the_minimum_side(kind, size):
    for scene in scenes(kind, size=size):
        assert scene.image.size == (size, size)
        assert any(obj.name != "sky" for obj in scene.objects)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert x1 >= 0 and y1 >= 0 and x2 <= size and y2 <= size, obj
            assert x2 - x1 >= MIN_OBJECT_SIDE and y2 - y1 >= MIN_OBJECT_SIDE, obj


@pytest.mark.parametrize("kind", FAMILIES)
def test_objects_of_one_class_never_overlap_and_sky_and_sun_are_single(kind):
    for scene in scenes(kind):
        counts = Counter(obj.name for obj in scene.objects)
        assert counts["sky"] <= 1 and counts["sun"] <= 1
        for a, b in combinations(scene.objects, 2):
            if a.name == b.name:
                assert not overlap(a.box, b.box), (a, b)


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_class_is_drawn_somewhere_and_nothing_else(kind, lexicon):
    drawn = {obj.name for scene in scenes(kind, range(40)) for obj in scene.objects}
    assert drawn == set(OBJECTS_BY_KIND[kind])
    for name in OBJECTS_BY_KIND[kind]:
        assert name in lexicon.objects
        assert name not in lexicon.domain_objects


def test_layout_promises_of_each_family():
    for scene in scenes(KITCHEN, range(30)):
        surfaces = [o.box for o in scene.objects if o.name in ("stove", "table")]
        for kettle in (o.box for o in scene.objects if o.name == "kettle"):
            # A kettle stands on a stove or a table top, within its width.
            assert any(kettle[3] == s[1] and s[0] <= kettle[0] and kettle[2] <= s[2] for s in surfaces)
        standing = [o.box for o in scene.objects if o.name in ("fridge", "stove", "table")]
        for a, b in combinations(standing, 2):
            assert a[2] <= b[0] or b[2] <= a[0], (a, b)
    for scene in scenes(STREET, range(30)):
        cars = [o.box for o in scene.objects if o.name == "vehicle"]
        kerb = [o.box for o in scene.objects if o.name in ("pole", "traffic_light", "tree")]
        for a, b in combinations(kerb, 2):
            assert a[2] <= b[0] or b[2] <= a[0], (a, b)
        for car in cars:
            assert all(car[1] >= thing[3] for thing in kerb)
    for scene in scenes(FIELD, range(30)):
        by_name = {o.name: o.box for o in scene.objects if o.name in ("sky", "sun")}
        if "sun" in by_name:
            sky, sun = by_name["sky"], by_name["sun"]
            assert sky[0] <= sun[0] and sky[1] <= sun[1] and sun[2] <= sky[2] and sun[3] <= sky[3]
        herd = [o.box for o in scene.objects if o.name in ("cow", "haystack")]
        for a, b in combinations(herd, 2):
            assert a[2] <= b[0] or b[2] <= a[0], (a, b)


def test_caption_words_name_their_own_object_in_the_lexicon(lexicon):
    for kind in FAMILIES:
        for name in OBJECTS_BY_KIND[kind]:
            for word in CAPTION_WORDS[name]:
                assert lexicon.canonicalize(word) == name, (name, word)
                assert [m.object for m in lexicon.find_mentions(f"a {word} here")] == [name]


@pytest.mark.parametrize("kind", FAMILIES)
def test_general_caption_names_exactly_the_drawn_classes_and_no_domain_object(kind, lexicon):
    captions = set()
    for seed, scene in enumerate(scenes(kind, range(20))):
        objects = scene_annotations(scene)
        caption = general_caption(kind, objects, np.random.default_rng(seed))
        captions.add(caption.split(" with ")[0])
        names = [obj["name"] for obj in objects]
        analysis = analyze_caption(caption, names, lexicon)
        assert analysis.mentioned == set(names), caption
        assert analysis.hallucinated_spans == ()
        assert not analysis.mentioned & lexicon.domain_objects
        for name, count in Counter(names).items():
            if count > 1 and name not in ("sky", "sun"):
                assert f"{count} {CAPTION_WORDS[name][1]}" in caption, caption
    assert len(captions) > 1  # more than one sentence frame is used


def test_general_caption_phrases_sky_and_sun_and_rejects_unknown_kinds():
    rng = np.random.default_rng(0)
    objects = [{"name": "sky"}, {"name": "sun"}, {"name": "cow"}, {"name": "cow"}, {"name": "flower"}]
    caption = general_caption(FIELD, objects, rng)
    assert caption.endswith("2 cows and a flower under a blue sky and a bright sun.")
    assert general_caption(FIELD, [{"name": "sky"}], rng) == "An empty field under a blue sky."
    street = general_caption(STREET, [{"name": "vehicle"}, {"name": "sky"}], rng)
    assert street.endswith("a car under a clear sky.")
    with pytest.raises(ValueError, match="unknown scene kind 'beach'"):
        general_caption("beach", objects, rng)
    with pytest.raises(ValueError, match="unknown scene kind 'beach'"):
        draw_scene("beach", np.random.default_rng(0), SIZE)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("grid", [10, 1000])
def test_dense_caption_round_trips(kind, grid, lexicon):
    for scene in scenes(kind, range(6)):
        objects = scene_annotations(scene, grid)
        expected = [(o["name"], o["box"]) for o in objects]
        # The written words ("car", "lamp post") are read back through the lexicon, as evaluation does.
        parsed = parse_dense_caption(dense_caption(objects, DENSE_WORDS), lexicon.canonicalize)
        assert parsed.malformed_lines == ()
        assert [(f.name, list(f.box)) for f in parsed.fields] == expected
        plain = parse_dense_caption(dense_caption(objects))
        assert [(f.name, list(f.box)) for f in plain.fields] == expected
