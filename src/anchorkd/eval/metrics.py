"""Caption metrics: did object hallucination drop, and did caption quality hold?

All functions are pure: they take captions plus ground truth and return numbers, so the same code
scores a live evaluation, a saved prediction file, or a hand-written unit-test case.

Counting conventions (chosen once here so that every metric agrees):

* A *mention* is a lexicon object named by a caption, **counted once per caption** however often it
  is repeated, as in the original CHAIR (Rohrbach et al., 2018): "a rack next to another rack" is one
  mention of ``rack``. Dense captions name objects through their ``name:`` prefix, so a dense caption
  with three ``cable`` lines also mentions ``cable`` once.
* Ground truth is reduced to the set of its object names, canonicalised through the lexicon; names the
  lexicon does not know cannot be detected in text, so they are left out of recall and reported as
  ``gt_outside_lexicon``.
* CHAIR-i = hallucinated mentions / mentions, where a mention is hallucinated when its object is not
  in the image's ground truth. CHAIR-s = captions with at least one hallucinated mention / captions.
* Object recall = ground-truth objects mentioned / ground-truth objects, summed over captions before
  dividing (micro average), so an image with many objects weighs more than one with a single object.
* OOD domain-object rate = fraction of out-of-domain captions (scene != ``domain_scene``) that name at
  least one domain object (lexicon ``domain: true``) that is not in that image's ground truth; naming
  a domain object that really is in the picture is not domain leakage.
* Dense field scores match predicted ``name: [x1, y1, x2, y2]`` lines (read by
  :func:`anchorkd.data.dense_caption.parse_dense_caption`) to ground-truth boxes one-to-one (greedy by
  IoU, same name, IoU >= threshold) and micro-average over the set. Malformed lines are false
  positives: a model that breaks the format must not look better for it.
* A ratio with an empty denominator is reported as 0.0 together with its (zero) count, rather than
  NaN, so reports and JSON stay well-formed; read the count to tell "0 of 0" from "0 of 50".

BLEU (sacreBLEU corpus BLEU, 0-100) and ROUGE-L F (rouge-score, 0-1, stemmed) compare free-text
("general") captions with their references.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from anchorkd.data.dense_caption import (
    DenseCaption,
    DenseField,
    field_name,
    ordered_box,
    parse_dense_caption,
)
from anchorkd.eval.lexicon import Lexicon


class CaptionSample(NamedTuple):
    """A caption with what is really in its image: ground-truth object names and the scene kind."""

    caption: str
    objects: Collection[str]
    scene: str


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


# --------------------------------------------------------------------------------------------------
# Object mentions: CHAIR, recall, OOD domain-object rate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionObjects:
    """What one caption says about objects, compared with its image's ground truth."""

    mentioned: frozenset[str]
    ground_truth: frozenset[str]
    gt_outside_lexicon: tuple[str, ...]
    hallucinated_spans: tuple[tuple[int, int], ...]

    @property
    def hallucinated(self) -> frozenset[str]:
        return self.mentioned - self.ground_truth

    @property
    def recalled(self) -> frozenset[str]:
        return self.mentioned & self.ground_truth

    @property
    def missed(self) -> frozenset[str]:
        return self.ground_truth - self.mentioned


def analyze_caption(caption: str, ground_truth: Iterable[str], lexicon: Lexicon) -> CaptionObjects:
    """Compare the objects ``caption`` names with the ground-truth names (any lexicon synonym accepted)."""
    mentions = lexicon.find_mentions(caption)
    gt_known, gt_unknown = lexicon.canonicalize_all(ground_truth)
    return CaptionObjects(
        mentioned=frozenset(m.object for m in mentions),
        ground_truth=frozenset(gt_known),
        gt_outside_lexicon=tuple(gt_unknown),
        hallucinated_spans=tuple(m.span for m in mentions if m.object not in gt_known),
    )


@dataclass(frozen=True)
class ChairScores:
    """CHAIR-i / CHAIR-s with the counts behind them (mentions are per-caption distinct objects)."""

    chair_i: float
    chair_s: float
    mentions: int
    hallucinated_mentions: int
    captions: int
    hallucinated_captions: int


@dataclass(frozen=True)
class RecallScores:
    """Micro-averaged object recall with its counts."""

    object_recall: float
    gt_objects: int
    recalled_objects: int
    gt_outside_lexicon: int


@dataclass(frozen=True)
class OodScores:
    """Domain-object leakage into out-of-domain captions (mentions are per-caption distinct objects)."""

    ood_domain_object_rate: float
    ood_captions: int
    ood_captions_with_domain_object: int
    ood_domain_mentions: int
    ood_domain_mentions_per_caption: float


def _chair_from(analyses: Sequence[CaptionObjects]) -> ChairScores:
    mentions = sum(len(a.mentioned) for a in analyses)
    hallucinated = sum(len(a.hallucinated) for a in analyses)
    hallucinated_captions = sum(1 for a in analyses if a.hallucinated)
    return ChairScores(
        chair_i=_ratio(hallucinated, mentions),
        chair_s=_ratio(hallucinated_captions, len(analyses)),
        mentions=mentions,
        hallucinated_mentions=hallucinated,
        captions=len(analyses),
        hallucinated_captions=hallucinated_captions,
    )


def _recall_from(analyses: Sequence[CaptionObjects]) -> RecallScores:
    gt_objects = sum(len(a.ground_truth) for a in analyses)
    recalled = sum(len(a.recalled) for a in analyses)
    return RecallScores(
        object_recall=_ratio(recalled, gt_objects),
        gt_objects=gt_objects,
        recalled_objects=recalled,
        gt_outside_lexicon=sum(len(a.gt_outside_lexicon) for a in analyses),
    )


def _ood_from(ood_analyses: Sequence[CaptionObjects], domain_objects: frozenset[str]) -> OodScores:
    leaked_per_caption = [len(a.hallucinated & domain_objects) for a in ood_analyses]
    leaked_total = sum(leaked_per_caption)
    return OodScores(
        ood_domain_object_rate=_ratio(sum(1 for n in leaked_per_caption if n), len(ood_analyses)),
        ood_captions=len(ood_analyses),
        ood_captions_with_domain_object=sum(1 for n in leaked_per_caption if n),
        ood_domain_mentions=leaked_total,
        ood_domain_mentions_per_caption=_ratio(leaked_total, len(ood_analyses)),
    )


def chair(samples: Iterable[CaptionSample], lexicon: Lexicon) -> ChairScores:
    """CHAIR-i and CHAIR-s over ``samples`` (mentions deduplicated per caption, see module docstring)."""
    return _chair_from([analyze_caption(s.caption, s.objects, lexicon) for s in samples])


def object_recall(samples: Iterable[CaptionSample], lexicon: Lexicon) -> RecallScores:
    """Micro-averaged fraction of ground-truth objects that the captions name."""
    return _recall_from([analyze_caption(s.caption, s.objects, lexicon) for s in samples])


def ood_domain_object_rate(
    samples: Iterable[CaptionSample], lexicon: Lexicon, domain_scene: str = "indoor"
) -> OodScores:
    """How often captions of out-of-domain scenes name fine-tuning-domain objects that are not there.

    This is the leakage the KL anchor is meant to prevent: a model fine-tuned on equipment rooms that
    starts seeing racks on a tower site.
    """
    ood = [analyze_caption(s.caption, s.objects, lexicon) for s in samples if s.scene != domain_scene]
    return _ood_from(ood, lexicon.domain_objects)


# --------------------------------------------------------------------------------------------------
# Dense captions: field-level precision / recall / F1
# --------------------------------------------------------------------------------------------------


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (1.0 for identical degenerate boxes)."""
    ax1, ay1, ax2, ay2 = ordered_box(a)
    bx1, by1, bx2, by2 = ordered_box(b)
    intersection = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - intersection
    if union <= 0:
        return 1.0 if (ax1, ay1, ax2, ay2) == (bx1, by1, bx2, by2) else 0.0
    return intersection / union


def match_fields(
    predicted: Sequence[DenseField], reference: Sequence[DenseField], iou_threshold: float = 0.5
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching: highest-IoU same-name pairs first; returns (pred, ref, IoU) triples."""
    candidates = [
        (box_iou(p.box, r.box), pi, ri)
        for pi, p in enumerate(predicted)
        for ri, r in enumerate(reference)
        if p.name == r.name
    ]
    candidates = [c for c in candidates if c[0] >= iou_threshold]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_pred: set[int] = set()
    used_ref: set[int] = set()
    matches = []
    for iou, pi, ri in candidates:
        if pi not in used_pred and ri not in used_ref:
            used_pred.add(pi)
            used_ref.add(ri)
            matches.append((pi, ri, iou))
    return matches


@dataclass(frozen=True)
class FieldScores:
    """Micro-averaged dense-caption scores; ``name_*`` ignore the boxes (multiset match of names)."""

    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    false_negatives: int
    name_precision: float
    name_recall: float
    name_f1: float
    malformed_lines: int
    captions: int


@dataclass
class _FieldCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    name_tp: int = 0
    name_fp: int = 0
    name_fn: int = 0
    malformed: int = 0
    captions: int = 0

    def add(self, parsed: DenseCaption, reference: Sequence[DenseField], iou_threshold: float) -> None:
        matched = len(match_fields(parsed.fields, reference, iou_threshold))
        malformed = len(parsed.malformed_lines)
        self.tp += matched
        self.fp += len(parsed.fields) - matched + malformed
        self.fn += len(reference) - matched
        predicted_names = Counter(f.name for f in parsed.fields)
        reference_names = Counter(f.name for f in reference)
        name_matched = sum((predicted_names & reference_names).values())
        self.name_tp += name_matched
        self.name_fp += len(parsed.fields) - name_matched + malformed
        self.name_fn += len(reference) - name_matched
        self.malformed += malformed
        self.captions += 1

    def scores(self) -> FieldScores:
        precision, recall = _ratio(self.tp, self.tp + self.fp), _ratio(self.tp, self.tp + self.fn)
        name_precision = _ratio(self.name_tp, self.name_tp + self.name_fp)
        name_recall = _ratio(self.name_tp, self.name_tp + self.name_fn)
        return FieldScores(
            precision=precision,
            recall=recall,
            f1=_f1(precision, recall),
            true_positives=self.tp,
            false_positives=self.fp,
            false_negatives=self.fn,
            name_precision=name_precision,
            name_recall=name_recall,
            name_f1=_f1(name_precision, name_recall),
            malformed_lines=self.malformed,
            captions=self.captions,
        )


def _reference_fields(
    objects: Iterable[Mapping[str, Any]], canonicalize: Callable[[str], str | None] | None
) -> list[DenseField]:
    return [DenseField(field_name(o["name"], canonicalize), ordered_box(o["box"])) for o in objects]


def dense_field_scores(
    pairs: Iterable[tuple[str, Iterable[Mapping[str, Any]]]],
    iou_threshold: float = 0.5,
    canonicalize: Callable[[str], str | None] | None = None,
) -> FieldScores:
    """Field-level P/R/F1 of dense captions against ground-truth objects.

    ``pairs`` holds (predicted dense caption text, ground-truth objects ``[{"name", "box"}, ...]``).
    """
    counts = _FieldCounts()
    for caption, objects in pairs:
        counts.add(
            parse_dense_caption(caption, canonicalize),
            _reference_fields(objects, canonicalize),
            iou_threshold,
        )
    return counts.scores()


# --------------------------------------------------------------------------------------------------
# Free text: BLEU and ROUGE-L
# --------------------------------------------------------------------------------------------------


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (0-100, default 13a tokenisation, one reference per hypothesis)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    # Imported here so that importing the metrics (e.g. only for CHAIR) does not require or load it.
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def mean_rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0-1, Porter-stemmed) of each hypothesis against its reference."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    # Imported here: rouge-score loads nltk, which takes about a second.
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)
    ]
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------------------------------
# Everything for a prediction set
# --------------------------------------------------------------------------------------------------


class GroundTruthObject(BaseModel):
    """One annotated object of an eval image."""

    model_config = ConfigDict(extra="ignore")

    name: str
    box: tuple[float, float, float, float]


class EvalRecord(BaseModel):
    """One scored prediction; unknown keys (image path, prompt, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    id: str | int
    caption: str
    reference: str = ""
    scene: str
    style: Literal["general", "dense"]
    objects: list[GroundTruthObject] = Field(default_factory=list)


@dataclass
class _Group:
    """Records of one (scene, style) group, or of all, with their per-caption analyses."""

    records: list[EvalRecord] = field(default_factory=list)
    analyses: list[CaptionObjects] = field(default_factory=list)
    dense_parses: list[DenseCaption | None] = field(default_factory=list)  # None for general captions


def _field_metric_items(scores: FieldScores) -> list[tuple[str, float | int]]:
    """Field scores under the flat, prefixed keys used in score_captions' metric dicts."""
    return [
        ("field_precision", scores.precision),
        ("field_recall", scores.recall),
        ("field_f1", scores.f1),
        ("field_true_positives", scores.true_positives),
        ("field_false_positives", scores.false_positives),
        ("field_false_negatives", scores.false_negatives),
        ("name_precision", scores.name_precision),
        ("name_recall", scores.name_recall),
        ("name_f1", scores.name_f1),
        ("malformed_lines", scores.malformed_lines),
    ]


def _group_metrics(group: _Group, lexicon: Lexicon, domain_scene: str, iou_threshold: float) -> dict:
    """Every metric of one group as a flat dict; metrics that do not apply to the group are None."""
    metrics: dict[str, Any] = {"captions": len(group.records)}
    metrics.update(asdict(_chair_from(group.analyses)))
    metrics.update(asdict(_recall_from(group.analyses)))

    ood = [a for r, a in zip(group.records, group.analyses, strict=True) if r.scene != domain_scene]
    ood_scores = asdict(_ood_from(ood, lexicon.domain_objects))
    if not ood:  # not applicable, rather than a misleading 0.0
        ood_scores = {key: (0 if key == "ood_captions" else None) for key in ood_scores}
    metrics.update(ood_scores)

    dense_counts = _FieldCounts()
    general_hypotheses, general_references = [], []
    for record, parsed in zip(group.records, group.dense_parses, strict=True):
        if record.style == "dense":
            reference = _reference_fields([o.model_dump() for o in record.objects], lexicon.canonicalize)
            dense_counts.add(parsed, reference, iou_threshold)
        else:
            general_hypotheses.append(record.caption)
            general_references.append(record.reference)
    field_scores = dense_counts.scores()
    has_dense = field_scores.captions > 0
    metrics["dense_captions"] = field_scores.captions
    for key, value in _field_metric_items(field_scores):
        metrics[key] = value if has_dense else None

    has_general = bool(general_hypotheses)
    metrics["general_captions"] = len(general_hypotheses)
    metrics["bleu"] = corpus_bleu(general_hypotheses, general_references) if has_general else None
    metrics["rouge_l"] = mean_rouge_l(general_hypotheses, general_references) if has_general else None
    return metrics


def _sample_detail(record: EvalRecord, analysis: CaptionObjects, parsed: DenseCaption | None) -> dict:
    detail = {
        "id": record.id,
        "scene": record.scene,
        "style": record.style,
        "caption": record.caption,
        "reference": record.reference,
        "ground_truth": sorted(analysis.ground_truth),
        "mentioned": sorted(analysis.mentioned),
        "hallucinated": sorted(analysis.hallucinated),
        "hallucinated_spans": [list(span) for span in analysis.hallucinated_spans],
        "missed": sorted(analysis.missed),
    }
    if parsed is not None:
        detail["malformed_lines"] = list(parsed.malformed_lines)
    return detail


def _validate_records(records: Iterable[Mapping[str, Any]]) -> list[EvalRecord]:
    validated = []
    for index, raw in enumerate(records):
        try:
            validated.append(EvalRecord.model_validate(raw))
        except ValidationError as error:
            record_id = raw.get("id", "?") if isinstance(raw, Mapping) else "?"
            raise ValueError(f"record {index} (id={record_id}) is invalid:\n{error}") from None
    return validated


def score_captions(
    records: Iterable[Mapping[str, Any]],
    lexicon: Lexicon,
    domain_scene: str = "indoor",
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Score a prediction set: every metric overall and per (scene, style), plus per-sample details.

    ``records`` are ``{id, caption, reference, scene, style: "general"|"dense", objects: [{name, box}]}``.
    Returns a JSON-ready dict::

        {"domain_scene", "iou_threshold",
         "summary": flat headline metrics (the keys write_comparison_report expects),
         "overall": metrics over all records,
         "groups": {"indoor/general": metrics, "outdoor/dense": metrics, ...},
         "samples": [{id, scene, style, caption, reference, ground_truth, mentioned,
                      hallucinated, hallucinated_spans, missed[, malformed_lines]}, ...]}

    Metrics that do not apply to a group (field F1 without dense captions, BLEU without general ones,
    OOD rate without out-of-domain scenes) are None.
    """
    validated = _validate_records(records)
    overall = _Group()
    groups: dict[str, _Group] = defaultdict(_Group)
    samples = []
    for record in validated:
        analysis = analyze_caption(record.caption, [o.name for o in record.objects], lexicon)
        parsed = (
            parse_dense_caption(record.caption, lexicon.canonicalize) if record.style == "dense" else None
        )
        for group in (overall, groups[f"{record.scene}/{record.style}"]):
            group.records.append(record)
            group.analyses.append(analysis)
            group.dense_parses.append(parsed)
        samples.append(_sample_detail(record, analysis, parsed))

    overall_metrics = _group_metrics(overall, lexicon, domain_scene, iou_threshold)
    group_metrics = {
        key: _group_metrics(group, lexicon, domain_scene, iou_threshold)
        for key, group in sorted(groups.items())
    }
    indomain_dense = group_metrics.get(f"{domain_scene}/dense", {})
    summary = {
        "ood_domain_object_rate": overall_metrics["ood_domain_object_rate"],
        "chair_i": overall_metrics["chair_i"],
        "chair_s": overall_metrics["chair_s"],
        "object_recall": overall_metrics["object_recall"],
        "indomain_f1": indomain_dense.get("field_f1"),
        "indomain_name_f1": indomain_dense.get("name_f1"),
        "bleu": overall_metrics["bleu"],
        "rouge_l": overall_metrics["rouge_l"],
    }
    return {
        "domain_scene": domain_scene,
        "iou_threshold": iou_threshold,
        "summary": summary,
        "overall": overall_metrics,
        "groups": group_metrics,
        "samples": samples,
    }
