"""Lexicon matching and caption metrics on hand-written captions with hand-computed answers."""

from __future__ import annotations

import pytest

from anchorkd.data.dense_caption import parse_dense_caption
from anchorkd.errors import LexiconError
from anchorkd.eval.lexicon import DEFAULT_LEXICON_PATH, lexicon_from_mapping, load_lexicon
from anchorkd.eval.metrics import (
    CaptionSample,
    box_iou,
    chair,
    corpus_bleu,
    dense_field_scores,
    match_fields,
    mean_rouge_l,
    object_recall,
    ood_domain_object_rate,
    score_captions,
)

# A small lexicon, so that the expected numbers below do not change when the shipped one grows.
SMALL_LEXICON = {
    "objects": {
        "rack": {"synonyms": ["rack", "racks", "cabinet", "cabinets"], "domain": True},
        "bbu": {"synonyms": ["bbu", "bbus", "baseband unit"], "domain": True},
        "cable": {"synonyms": ["cable", "cables"], "domain": True},
        "patch_panel": {"synonyms": ["patch panel", "patch panels"], "domain": True},
        "panel": {"synonyms": ["panel", "panels"], "domain": False},
        "tower": {"synonyms": ["tower", "towers"], "domain": False},
        "antenna": {"synonyms": ["antenna", "antennas"], "domain": False},
        "tree": {"synonyms": ["tree", "trees"], "domain": False},
    },
    "ignored_phrases": ["server room"],
}


@pytest.fixture(scope="module")
def lexicon():
    return lexicon_from_mapping(SMALL_LEXICON, source="small.yaml")


def objects_of(text: str, lexicon) -> list[str]:
    return [m.object for m in lexicon.find_mentions(text)]


# ------------------------------------------------------------------------------------------ lexicon


def test_mentions_are_case_insensitive_and_in_order(lexicon):
    mentions = lexicon.find_mentions("Two RACKS, a Bbu and a Tower.")
    assert [(m.object, m.surface) for m in mentions] == [
        ("rack", "RACKS"),
        ("bbu", "Bbu"),
        ("tower", "Tower"),
    ]
    assert mentions[0].span == (4, 9)


def test_longest_synonym_wins_over_shorter_one_inside_it(lexicon):
    # "panel" is an object of its own, but must not be found again inside "patch panels".
    assert objects_of("two patch panels and a panel", lexicon) == ["patch_panel", "panel"]


def test_word_boundaries(lexicon):
    assert objects_of("rackmount cabinetry, cables", lexicon) == ["cable"]
    assert objects_of("rack2 rack-1 (rack)", lexicon) == ["rack"] * 2  # digits glue, '-' and '(' separate


def test_underscores_hyphens_and_spaces_are_equivalent(lexicon):
    assert objects_of("patch_panel, Patch-Panel, patch   panel", lexicon) == ["patch_panel"] * 3


def test_dense_caption_lines_are_recognised_by_name(lexicon):
    text = "patch_panel: [10, 20, 300, 400]\nrack: [0, 0, 5, 5]\nwidget: [1, 2, 3, 4]"
    assert objects_of(text, lexicon) == ["patch_panel", "rack"]


def test_ignored_phrase_shadows_object_word(lexicon):
    assert objects_of("A server room with a rack.", lexicon) == ["rack"]


def test_canonicalize(lexicon):
    assert lexicon.canonicalize("Patch Panels") == "patch_panel"
    assert lexicon.canonicalize("baseband_unit") == "bbu"
    assert lexicon.canonicalize("server room") is None
    assert lexicon.canonicalize("widget") is None
    assert lexicon.domain_objects == {"rack", "bbu", "cable", "patch_panel"}


def test_synonym_claimed_by_two_objects_is_an_error():
    data = {
        "objects": {
            "rack": {"synonyms": ["cabinet"], "domain": True},
            "box": {"synonyms": ["Cabinet"], "domain": True},
        }
    }
    with pytest.raises(
        LexiconError, match=r"my\.yaml: objects\.box\.synonyms: 'cabinet' is already claimed by objects\.rack"
    ):
        lexicon_from_mapping(data, source="my.yaml")


def test_errors_name_file_and_key_path(tmp_path):
    path = tmp_path / "lex.yaml"
    path.write_text(
        "objects:\n  rack:\n    synonyms: [rack]\n    domain: true\n    colour: red\n  Bad: {synonyms: [x], domain: false}\n"
    )
    with pytest.raises(LexiconError) as error:
        load_lexicon(path)
    message = str(error.value)
    assert f"{path}: objects.rack.colour: Extra inputs are not permitted" in message
    assert f"{path}: objects.Bad" in message


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(LexiconError, match="cannot read"):
        load_lexicon(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("objects: [unclosed\n")
    with pytest.raises(LexiconError, match="not valid YAML"):
        load_lexicon(broken)


def test_ignored_phrase_may_not_be_a_synonym():
    data = {"objects": {"rack": {"synonyms": ["rack"], "domain": True}}, "ignored_phrases": ["Rack"]}
    with pytest.raises(LexiconError, match=r"ignored_phrases\.0: 'Rack' is a synonym of objects\.rack"):
        lexicon_from_mapping(data)


def test_shipped_lexicon_covers_the_synthetic_world():
    lexicon = load_lexicon()
    assert DEFAULT_LEXICON_PATH.is_file()
    indoor = "An indoor equipment room with 2 racks, a BBU, 3 cables and a patch panel."
    outdoor = "An outdoor scene with a tower, 2 antennas and a tree under a blue sky."
    assert objects_of(indoor, lexicon) == ["rack", "bbu", "cable", "patch_panel"]
    assert objects_of(outdoor, lexicon) == ["tower", "antenna", "tree", "sky"]
    assert {"rack", "bbu", "cable", "patch_panel", "label"} <= lexicon.domain_objects
    assert not {"tower", "antenna", "tree", "sky", "building"} & lexicon.domain_objects
    assert {"rru", "mast", "pole", "server", "switch"} <= lexicon.objects
    assert objects_of("fiber optic cables in a server room", lexicon) == ["cable"]


# ------------------------------------------------------------------------------------------ CHAIR


def test_chair_counts_each_object_once_per_caption(lexicon):
    samples = [
        # mentions {rack}; ground truth rack, bbu -> 1 mention, 0 hallucinated
        CaptionSample("A room with 2 racks and another rack.", ["rack", "bbu"], "indoor"),
        # mentions {tower, rack}; rack is not there -> 2 mentions, 1 hallucinated
        CaptionSample("A tower with a rack.", {"tower", "tree"}, "outdoor"),
        # mentions {patch_panel, cable} (cables twice, counted once); patch panel absent -> 2 / 1
        CaptionSample("A patch panel next to cables, and more cables.", ["cable"], "indoor"),
    ]
    scores = chair(samples, lexicon)
    assert (scores.mentions, scores.hallucinated_mentions) == (5, 2)
    assert scores.chair_i == pytest.approx(2 / 5)
    assert (scores.captions, scores.hallucinated_captions) == (3, 2)
    assert scores.chair_s == pytest.approx(2 / 3)

    recall = object_recall(samples, lexicon)
    # ground truth 2 + 2 + 1 = 5 objects, of which rack, tower, cable are named
    assert (recall.gt_objects, recall.recalled_objects) == (5, 3)
    assert recall.object_recall == pytest.approx(3 / 5)


def test_ground_truth_synonyms_and_unknown_names(lexicon):
    samples = [CaptionSample("Cabinets and a baseband unit.", ["rack", "baseband_unit", "widget"], "indoor")]
    assert chair(samples, lexicon).hallucinated_mentions == 0
    recall = object_recall(samples, lexicon)
    assert (recall.gt_objects, recall.recalled_objects, recall.gt_outside_lexicon) == (2, 2, 1)


def test_no_mentions_gives_zero_rates_with_zero_counts(lexicon):
    samples = [CaptionSample("", ["rack"], "indoor"), CaptionSample("Nothing to see.", [], "outdoor")]
    scores = chair(samples, lexicon)
    assert (scores.chair_i, scores.mentions, scores.chair_s, scores.captions) == (0.0, 0, 0.0, 2)
    assert object_recall(samples, lexicon).object_recall == 0.0
    empty = chair([], lexicon)
    assert (empty.chair_i, empty.chair_s, empty.mentions, empty.captions) == (0.0, 0.0, 0, 0)


def test_ood_domain_object_rate(lexicon):
    samples = [
        CaptionSample("A tower, a rack and a cabinet.", ["tower"], "outdoor"),  # leaks rack (once)
        CaptionSample("A tower with a BBU and cables.", ["tower"], "outdoor"),  # leaks bbu, cable
        CaptionSample("A tower and trees.", ["tower", "tree"], "outdoor"),  # clean
        CaptionSample("A rack outside.", ["rack"], "outdoor"),  # the rack is really there: no leak
        CaptionSample("Racks and a tower.", ["rack"], "indoor"),  # in-domain scene: not counted
    ]
    scores = ood_domain_object_rate(samples, lexicon, domain_scene="indoor")
    assert (scores.ood_captions, scores.ood_captions_with_domain_object) == (4, 2)
    assert scores.ood_domain_object_rate == pytest.approx(2 / 4)
    assert scores.ood_domain_mentions == 3
    assert scores.ood_domain_mentions_per_caption == pytest.approx(3 / 4)
    assert ood_domain_object_rate([], lexicon).ood_domain_object_rate == 0.0


# ------------------------------------------------------------------------------------------ dense


def test_dense_parser_tolerates_common_variations():
    text = "\n".join(
        [
            "```",
            "rack: [0, 0, 100, 100]",
            "- Patch Panel: (10 20 30 40),",
            "2. bbu [5.5, 6, 7, 8]",
            "cable: [300, 300, 200, 200]",  # swapped corners are reordered
            "",
            "rack: [1, 2, 3]",  # three numbers
            "label: [a, b, c, d]",
            "just a sentence",
            "```",
        ]
    )
    parsed = parse_dense_caption(text)
    assert [(f.name, f.box) for f in parsed.fields] == [
        ("rack", (0, 0, 100, 100)),
        ("patch_panel", (10, 20, 30, 40)),
        ("bbu", (5.5, 6, 7, 8)),
        ("cable", (200, 200, 300, 300)),
    ]
    assert parsed.malformed_lines == ("rack: [1, 2, 3]", "label: [a, b, c, d]", "just a sentence")


def test_dense_parser_canonicalizes_synonyms(lexicon):
    parsed = parse_dense_caption("Cabinet: [0, 0, 1, 1]\nwidget_x: [0, 0, 1, 1]", lexicon.canonicalize)
    assert [f.name for f in parsed.fields] == ["rack", "widget_x"]


def test_box_iou():
    assert box_iou([0, 0, 100, 100], [0, 0, 100, 100]) == 1.0
    assert box_iou([0, 0, 100, 100], [200, 200, 300, 300]) == 0.0
    assert box_iou([200, 0, 300, 100], [190, 0, 290, 100]) == pytest.approx(9000 / 11000)
    assert box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 1.0


def test_field_scores_hand_computed():
    reference = [
        {"name": "rack", "box": [0, 0, 100, 100]},
        {"name": "rack", "box": [200, 0, 300, 100]},
        {"name": "bbu", "box": [0, 200, 100, 300]},
    ]
    prediction = "\n".join(
        [
            "rack: [0, 0, 100, 100]",  # IoU 1      -> TP
            "rack: [190, 0, 290, 100]",  # IoU 0.818 -> TP
            "bbu: [500, 500, 600, 600]",  # IoU 0    -> FP (and the reference bbu is a FN)
            "cable: [0, 0, 10, 10]",  # not in the reference -> FP
            "this is not a field",  # malformed -> FP
        ]
    )
    scores = dense_field_scores([(prediction, reference)])
    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (2, 3, 1)
    assert scores.precision == pytest.approx(2 / 5)
    assert scores.recall == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(0.5)
    # names only: rack, rack, bbu match; cable and the malformed line are false positives
    assert scores.name_precision == pytest.approx(3 / 5)
    assert scores.name_recall == 1.0
    assert scores.name_f1 == pytest.approx(0.75)
    assert scores.malformed_lines == 1

    strict = dense_field_scores([(prediction, reference)], iou_threshold=0.9)
    assert (strict.true_positives, strict.false_negatives) == (1, 2)


def test_field_scores_micro_average_over_captions():
    one_box = [{"name": "rack", "box": [0, 0, 10, 10]}]
    pairs = [
        ("rack: [0, 0, 10, 10]", one_box),
        ("", one_box),
        ("rack: [0, 0, 10, 10]\nrack: [0, 0, 10, 10]", one_box),
    ]
    scores = dense_field_scores(pairs)
    # TP 2; FP 1 (the duplicate box cannot match twice); FN 1 (empty caption)
    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (2, 1, 1)
    assert scores.f1 == pytest.approx(2 / 3)
    assert scores.captions == 3


def test_greedy_matching_prefers_highest_iou():
    predicted = parse_dense_caption("rack: [12, 0, 112, 100]\nrack: [0, 0, 100, 100]").fields
    reference = parse_dense_caption("rack: [0, 0, 100, 100]\nrack: [10, 0, 110, 100]").fields
    matches = match_fields(predicted, reference)
    assert sorted((p, r) for p, r, _ in matches) == [(0, 1), (1, 0)]


def test_all_malformed_dense_lines():
    scores = dense_field_scores(
        [("garbage\nrack [1, 2, 3]\nbbu: [a, b, c, d]", [{"name": "rack", "box": [0, 0, 1, 1]}])]
    )
    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (0, 3, 1)
    assert (scores.precision, scores.recall, scores.f1, scores.malformed_lines) == (0.0, 0.0, 0.0, 3)
    empty = dense_field_scores([])
    assert (empty.f1, empty.true_positives, empty.captions) == (0.0, 0, 0)


# ------------------------------------------------------------------------------------------ text


def test_bleu_and_rouge():
    assert corpus_bleu(["a rack and a cable in a room"], ["a rack and a cable in a room"]) == pytest.approx(
        100.0
    )
    assert corpus_bleu([], []) == 0.0
    # LCS("the cat sat", "the cat sat on the mat") = 3 -> P 1, R 0.5, F 2/3
    assert mean_rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        corpus_bleu(["a"], ["a", "b"])


# ------------------------------------------------------------------------------------------ score_captions


def _records():
    indoor_objects = [{"name": "rack", "box": [0, 0, 100, 100]}, {"name": "bbu", "box": [0, 200, 100, 300]}]
    outdoor_objects = [
        {"name": "tower", "box": [400, 0, 600, 900]},
        {"name": "tree", "box": [0, 500, 200, 900]},
    ]
    return [
        {
            "id": "in-gen",
            "scene": "indoor",
            "style": "general",
            "caption": "A room with a rack, a BBU and a patch panel.",
            "reference": "A room with a rack and a BBU.",
            "objects": indoor_objects,
            "image": "ignored.png",
        },
        {
            "id": "in-dense",
            "scene": "indoor",
            "style": "dense",
            "caption": "rack: [0, 0, 100, 100]\nbbu: [0, 0, 50, 50]",
            "reference": "",
            "objects": indoor_objects,
        },
        {
            "id": "out-gen",
            "scene": "outdoor",
            "style": "general",
            "caption": "A tower and racks.",
            "reference": "A tower and a tree.",
            "objects": outdoor_objects,
        },
    ]


def test_score_captions_groups_overall_and_samples(lexicon):
    scores = score_captions(_records(), lexicon)
    assert set(scores["groups"]) == {"indoor/general", "indoor/dense", "outdoor/general"}

    overall = scores["overall"]
    # mentions: {rack, bbu, patch_panel} + {rack, bbu} + {tower, rack}; hallucinated: patch_panel, rack
    assert (overall["mentions"], overall["hallucinated_mentions"]) == (7, 2)
    assert overall["chair_i"] == pytest.approx(2 / 7)
    assert overall["chair_s"] == pytest.approx(2 / 3)
    # ground truth 2 + 2 + 2; named: rack, bbu, rack, bbu, tower
    assert overall["object_recall"] == pytest.approx(5 / 6)
    assert (overall["ood_captions"], overall["ood_domain_object_rate"]) == (1, 1.0)
    # dense: rack matches (IoU 1), bbu box misses (IoU 0) -> TP 1, FP 1, FN 1
    assert overall["field_f1"] == pytest.approx(0.5)
    assert overall["name_f1"] == pytest.approx(1.0)

    dense = scores["groups"]["indoor/dense"]
    assert dense["bleu"] is None and dense["rouge_l"] is None  # no free text in this group
    assert dense["ood_domain_object_rate"] is None and dense["ood_captions"] == 0
    general = scores["groups"]["indoor/general"]
    assert general["field_f1"] is None and general["bleu"] > 0

    assert scores["summary"]["indomain_f1"] == pytest.approx(0.5)
    assert scores["summary"]["chair_i"] == overall["chair_i"]

    samples = {s["id"]: s for s in scores["samples"]}
    assert samples["in-gen"]["hallucinated"] == ["patch_panel"]
    caption = samples["in-gen"]["caption"]
    start, end = samples["in-gen"]["hallucinated_spans"][0]
    assert caption[start:end] == "patch panel"
    assert samples["out-gen"]["missed"] == ["tree"]
    assert samples["in-dense"]["malformed_lines"] == []


def test_score_captions_rejects_bad_records(lexicon):
    bad = _records()
    bad[1]["style"] = "poem"
    with pytest.raises(ValueError, match=r"record 1 \(id=in-dense\) is invalid"):
        score_captions(bad, lexicon)
