"""The anchoring testbed: does KL anchoring keep a fine-tuned model from drifting? Measured, end to end.

On the embedded default (tiny Qwen3-VL, synthetic scenes) this runs the whole story a user cares about:
1. ``base``: the random tiny model learns general captions of four scene families (indoor racks, outdoor
   sites, kitchens, streets), the dense box format on the three that are not the domain, plus text-only
   chat (full fine-tuning, ``configs/testbed/base.yaml``). A fifth family (fields) is held out of every
   training set. Built once and cached by a content hash of everything that determines it.
2. Domain fine-tuning on indoor dense captions only, from the same base (``DOMAIN_RUNS``): ``sft``
   (vanilla), ``gkd`` (forward-only KL-anchored SFT), ``gkd_visual`` (plus visual KD), ``gkd_seqkd`` (the
   base's own answers as targets), ``gkd_anchor`` (plus KD-only anchor prompts, at the domain rows' KD
   weight 5, 1 and 2; and at the earlier anchor settings), and the baselines: ``anchor_only`` (SFT plus
   the KD-only anchor rows), ``replay`` (SFT on the domain rows plus anchor rows with the base's answers,
   CE only) and the WiSE-FT interpolations of the SFT adapter (``sft_wise0.25`` ...: no training, the
   adapter scaled). The anchor set is built by ``anchorkd anchors build``'s code from the domain prompts
   on fresh images of the near-OOD families, plus the general prompt and text questions
   (``build_testbed_anchor_set``).
3. Every model is evaluated on held-out images of each out-of-domain family (general and dense prompt:
   are indoor domain objects named where there are none?), reported per family and pooled into near OOD
   (the families the base learnt) and far OOD (the held-out one), with each run's share of SFT's excess
   over the base removed; on indoor images (dense prompt: field F1) and text-only chat (perplexity vs the
   base). All of it lands in ``report.md`` / ``report.json`` / PNGs, with the Pareto chart.
Several seeds (of the domain runs) give a mean and a spread per metric.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import DataError
from ..io import (
    atomic_write_text,
    iter_jsonl,
    read_json_object,
    real_number,
    sha256_bytes,
    sha256_file,
    write_jsonl,
)
from ..resources import shipped_configs_dir
from .assets import DATA_DIR, TINY_MODEL_DIR, TINY_MODEL_STAMP, prepare_demo_assets
from .synthetic import GENERAL_PROMPT, HELD_OUT_FAMILIES, NEAR_OOD_FAMILIES, OOD_FAMILIES, SPLIT_FILES

if TYPE_CHECKING:
    from ..data.anchor_set import AnchorSetRequest

logger = logging.getLogger("anchorkd")


@dataclass(frozen=True)
class DomainRun:
    """A domain run of the testbed: what it trains (or whose checkpoint it evaluates) and which shared
    testbed inputs it reads."""

    config: str | None  # its recipe in configs/testbed; None: no training (see checkpoint_of)
    overrides: tuple[str, ...] = ()  # on top of the recipe, e.g. another KD weight
    anchor_set: bool = False  # custom.anchor.dataset is the testbed's built anchor set
    teacher_targets: bool = False  # the teacher writes targets: one cache for every seed
    replay: bool = False  # trains on the domain rows plus anchor rows with the base's answers (CE only)
    checkpoint_of: str | None = None  # evaluates this run's checkpoint of the same seed instead
    adapter_scale: float | None = None  # ... with its LoRA update scaled (WiSE-FT-style interpolation)
    teacher_cache: bool = False  # trains from the teacher's cached top-k (no teacher loaded)


# The SFT adapter's interpolations towards the base (WiSE-FT): evaluated, never trained.
WISE_SCALES = (0.25, 0.5, 0.75)
# The anchored run whose recipe and settings every run on the anchor set shares (its teacher answers too).
ANCHOR_RUN = "gkd_anchor"
DOMAIN_RUNS = {
    "sft": DomainRun("domain_sft.yaml"),
    "gkd": DomainRun("domain_gkd.yaml"),
    "gkd_visual": DomainRun("domain_gkd_visual.yaml"),
    "gkd_seqkd": DomainRun("domain_gkd_seqkd.yaml", teacher_targets=True),
    ANCHOR_RUN: DomainRun("domain_gkd_anchor.yaml", anchor_set=True, teacher_targets=True),
    **{
        f"gkd_anchor_w{weight}": DomainRun(
            "domain_gkd_anchor.yaml",
            overrides=(f"rlhf.llm_kd_weight={weight}.0",),
            anchor_set=True,
            teacher_targets=True,
        )
        for weight in (1, 2)
    },
    # The earlier anchor settings, kept to reproduce docs/evaluation.md: the first stated one (the anchor
    # rows' weight 1, a quarter of each step) and weight 5 at that quarter.
    **{
        f"{ANCHOR_RUN}_{suffix}": DomainRun(
            "domain_gkd_anchor.yaml", overrides=overrides, anchor_set=True, teacher_targets=True
        )
        for suffix, overrides in (
            ("aw1r025", ("custom.anchor.weight=1.0", "custom.anchor.ratio=0.25")),
            ("r025", ("custom.anchor.ratio=0.25",)),
        )
    },
    # The KD runs trained from the teacher's top-k cache (`anchorkd teacher-cache`) instead of a live teacher.
    "gkd_cached": DomainRun("domain_gkd.yaml", teacher_cache=True),
    f"{ANCHOR_RUN}_cached": DomainRun(
        "domain_gkd_anchor.yaml", anchor_set=True, teacher_targets=True, teacher_cache=True
    ),
    "anchor_only": DomainRun("domain_anchor_only.yaml", anchor_set=True, teacher_targets=True),
    "replay": DomainRun("domain_replay.yaml", replay=True),
    **{
        f"sft_wise{scale:g}": DomainRun(None, checkpoint_of="sft", adapter_scale=scale)
        for scale in WISE_SCALES
    },
}
RUN_NAMES = ("base", *DOMAIN_RUNS)
# What `anchorkd demo` runs unless told otherwise: the README's main job, sized to stay within 25 minutes
# cold and 15 warm on 2 CPU cores.
DEFAULT_RUNS = ("sft", "gkd", ANCHOR_RUN)
# Names of run selections: `--runs baselines` is issue 16's comparison (the anchored settings and every
# baseline), `--runs cache` the KD runs live and from the teacher cache, `--runs all` every run.
RUN_GROUPS = {
    "all": tuple(DOMAIN_RUNS),
    "cache": ("sft", "gkd", "gkd_cached", ANCHOR_RUN, f"{ANCHOR_RUN}_cached"),
    "baselines": (
        "sft",
        "gkd",
        ANCHOR_RUN,
        "gkd_anchor_w1",
        "gkd_anchor_w2",
        "anchor_only",
        "replay",
        *(f"sft_wise{scale:g}" for scale in WISE_SCALES),
    ),
}
DRIFT_RUN = "sft"
BASE_CONFIG = "base.yaml"
# Out-of-domain images of every family under both prompts (is indoor equipment named where there is
# none?), indoor images under the dense prompt (domain skill) and under the general prompt (does the box
# format bleed into plain descriptions?).
EVAL_FILES = (
    SPLIT_FILES["eval_indoor"],
    SPLIT_FILES["eval_indoor_general"],
    *(SPLIT_FILES[f"eval_{family}"] for family in OOD_FAMILIES),
    *(SPLIT_FILES[f"eval_{family}_dense"] for family in OOD_FAMILIES),
)
# How the report pools the out-of-domain families: the ones the base learnt, and the held-out one.
SCENE_GROUPS = {"near": NEAR_OOD_FAMILIES, "far": HELD_OUT_FAMILIES}
HEADLINE_METRICS = (
    "ood_domain_object_rate",
    "ood_domain_object_rate_near",
    "ood_domain_object_rate_far",
    "ood_excess_removed_near",
    "ood_excess_removed_far",
    "chair_i",
    "object_recall",
    "indomain_f1",
    "indomain_name_f1",
    "rouge_l",
    "text_ppl",
    "text_ppl_change_pct",
)


@dataclass(frozen=True)
class TestbedSizes:
    """Everything that sets the testbed's cost. ``quick()`` is for tests (minutes, not meaningful)."""

    data: str = "default"  # SyntheticSizes preset: default | quick
    base_steps: int = 240
    base_batch: int = 8
    domain_steps: int = 100
    domain_batch: int = 4
    eval_limit: int = 40  # samples per eval file (at most; see SyntheticSizes.eval_ood / eval_indoor)
    text_eval_limit: int | None = None
    max_new_tokens: int = 160
    eval_batch: int = 8
    max_completion_length: int | None = None  # teacher answers' limit; None keeps each run config's
    anchor_rows: int = 160  # rows of the built anchor set (ANCHOR_SHARES of them per kind)

    @classmethod
    def quick(cls) -> TestbedSizes:
        return cls(
            data="quick",
            base_steps=3,
            base_batch=2,
            domain_steps=2,
            domain_batch=2,
            eval_limit=2,
            max_new_tokens=16,
            eval_batch=4,
            max_completion_length=16,
            anchor_rows=8,
        )


@dataclass
class TestbedPaths:
    root: Path
    configs: Path

    @property
    def model(self) -> Path:
        return self.root / TINY_MODEL_DIR

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def teacher_targets(self) -> Path:
        return self.root / "cache" / "teacher_targets"

    def teacher_cache(self, base: Path) -> Path:
        """``base``'s top-k distributions over every KD run's rows: one folder per base, since a cache is
        keyed by its teacher and refuses another; the runs share its other settings, so a row cached for one
        run is read by the others."""
        return self.root / "cache" / f"teacher_topk-{base.name}"

    @property
    def anchor_set_dir(self) -> Path:
        """The anchor set, what it was built from, and the replay data set made from it."""
        return self.root / "anchor_set"

    @property
    def anchor_set(self) -> Path:
        return self.anchor_set_dir / "anchors.jsonl"

    @property
    def replay_set(self) -> Path:
        return self.anchor_set_dir / "replay_train.jsonl"

    def base_cache(self, key: str) -> Path:
        return self.root / "cache" / f"base-{key}"

    def seed_dir(self, seed: int) -> Path:
        return self.root / f"seed-{seed}"


def testbed_paths(root: str | Path, configs: str | Path | None = None) -> TestbedPaths:
    """The testbed under ``root``; its recipes come from ``configs`` or, by default, the shipped ones."""
    configs = shipped_configs_dir() / "testbed" if configs is None else configs
    return TestbedPaths(Path(root).resolve(), Path(configs).resolve())


@dataclass
class TestbedResult:
    report_dir: Path
    runs: dict[str, dict]
    per_seed: dict[int, dict[str, dict]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    base_cached: bool = False


def _training_content_digest(jsonl: Path) -> str:
    """Hash of what training reads from a JSONL file: the messages and the image bytes, in order.

    ``meta`` (ground truth for the evaluator) and the images' absolute paths are left out, so the base
    stays cached when only the domain / eval data change or the folder moves.
    """
    content = []
    for _, record in iter_jsonl(jsonl):
        images = [sha256_file(image) for image in record.get("images", [])]
        content.append(json.dumps([record["messages"], images], sort_keys=True).encode())
    # One digest of the concatenation: the same value as feeding the records to it one by one.
    return sha256_bytes(b"".join(content))


def base_cache_key(paths: TestbedPaths, sizes: TestbedSizes, seed: int) -> str:
    """Hash of everything that determines the base checkpoint."""
    parts = {
        "model": read_json_object(paths.model / TINY_MODEL_STAMP),
        "weights": sha256_file(paths.model / "model.safetensors"),
        "data": _training_content_digest(paths.data / "base_train.jsonl"),
        # Parsed, so that editing a comment does not retrain the base.
        "config": yaml.safe_load((paths.configs / BASE_CONFIG).read_text()),
        "steps": sizes.base_steps,
        "batch": sizes.base_batch,
        "seed": seed,
    }
    return sha256_bytes(json.dumps(parts, sort_keys=True).encode())[:16]


def _train(config: Path, overrides: list[str]) -> dict:
    from ..trainers.pipeline import run_training

    return run_training(config, overrides)


def _final_checkpoint(run_dir: Path) -> Path:
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not checkpoints:
        raise RuntimeError(f"training in {run_dir} saved no checkpoint")
    return checkpoints[-1]


def build_base(paths: TestbedPaths, sizes: TestbedSizes, seed: int = 0) -> tuple[Path, bool]:
    """Return the cached base checkpoint, training it first if needed. (path, was_cached)."""
    key = base_cache_key(paths, sizes, seed)
    cached = paths.base_cache(key)
    if (cached / "config.json").is_file():
        return cached, True
    work = paths.root / "cache" / f".base-{key}.run"
    shutil.rmtree(work, ignore_errors=True)
    _train(
        paths.configs / BASE_CONFIG,
        [
            f"model.model={paths.model}",
            f"data.dataset=[{paths.data / 'base_train.jsonl'}]",
            f"training.output_dir={work}",
            f"training.max_steps={sizes.base_steps}",
            f"training.per_device_train_batch_size={sizes.base_batch}",
            f"training.save_steps={sizes.base_steps}",
            f"training.seed={seed}",
        ],
    )
    checkpoint = _final_checkpoint(work)
    staging = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(
        checkpoint, staging, ignore=shutil.ignore_patterns("optimizer.pt", "*.pth", "scheduler.pt")
    )
    shutil.copy2(work / "logging.jsonl", staging / "base_logging.jsonl")
    staging.rename(cached)
    shutil.rmtree(work, ignore_errors=True)
    return cached, False


# The testbed's anchor set (``anchorkd anchors build``'s code): the domain prompt and the general prompt on
# fresh images of the near-OOD families, and text questions, in these shares (docs/evaluation.md).
ANCHOR_SHARES = {"training_prompts": 0.5, "general": 0.25, "text": 0.25}
ANCHOR_SET_SEED = 0  # data, like the synthetic set: the same anchor (and replay) rows for every seed
ANCHOR_IMAGES_FILE = "off_domain_images.jsonl"
ANCHOR_GENERAL_FILE = "general_prompts.txt"
ANCHOR_TEXT_FILE = "text_questions.jsonl"


def anchor_set_request(paths: TestbedPaths, sizes: TestbedSizes) -> AnchorSetRequest:
    """What the testbed asks ``anchorkd anchors build`` for, after writing the inputs it names into
    ``paths.anchor_set_dir``: the fresh images of the near-OOD families from the data set's anchor split
    (never an indoor image, the domain, nor a field, held out), the testbed's one general prompt (the only
    one its base knows) and the anchor split's fresh text questions. Every eval file is named, so the
    builder leaves out any eval image (by SHA-256)."""
    from ..data.anchor_set import AnchorSetRequest

    folder = paths.anchor_set_dir
    folder.mkdir(parents=True, exist_ok=True)
    images, questions = [], []
    for _, record in iter_jsonl(paths.data / SPLIT_FILES["anchor"]):
        scene = record["meta"]["scene"]
        if scene in NEAR_OOD_FAMILIES:
            images.extend({"image": image, "meta": {"scene": scene}} for image in record["images"])
        elif not record.get("images"):
            questions.append({"messages": record["messages"]})
    write_jsonl(folder / ANCHOR_IMAGES_FILE, images)
    write_jsonl(folder / ANCHOR_TEXT_FILE, questions)
    atomic_write_text(
        folder / ANCHOR_GENERAL_FILE,
        f"# The testbed's general prompt: the only one its base knows.\n{GENERAL_PROMPT}\n",
    )
    return AnchorSetRequest(
        train=(paths.data / SPLIT_FILES["train"],),
        out=paths.anchor_set,
        images=(folder / ANCHOR_IMAGES_FILE,),
        evals=tuple(paths.data / filename for filename in EVAL_FILES),
        rows=sizes.anchor_rows,
        shares=dict(ANCHOR_SHARES),
        general_prompts=folder / ANCHOR_GENERAL_FILE,
        text_questions=folder / ANCHOR_TEXT_FILE,
        seed=ANCHOR_SET_SEED,
        force=True,  # the same inputs give the same bytes, so the teacher's cached answers still match
    )


def build_testbed_anchor_set(paths: TestbedPaths, sizes: TestbedSizes) -> Path:
    """Build the anchored runs' anchor set (and its summary beside it) with ``anchorkd anchors build``'s code."""
    from ..data.anchor_set import build_anchor_set, describe

    built = build_anchor_set(anchor_set_request(paths, sizes))
    for line in describe(built):
        logger.info("testbed: %s", line.removeprefix("anchorkd: "))
    return built.path


def training_overrides(
    name: str, paths: TestbedPaths, base: Path, sizes: TestbedSizes, seed: int, replay_rows_per_step: int = 0
) -> list[str]:
    """The overrides that run ``name``'s recipe from ``base`` on the testbed's data at ``sizes``.

    ``replay_rows_per_step``: the replay rows a ``replay`` step adds to its ``sizes.domain_batch`` domain
    rows (the anchored runs' anchor rows per step, :func:`build_replay_set`)."""
    run = DOMAIN_RUNS[name]
    if run.config is None:
        raise ValueError(f"{name} trains nothing: it evaluates the checkpoint of {run.checkpoint_of}")
    if run.replay and replay_rows_per_step < 1:
        raise ValueError(f"{name} needs the replay rows per step (build_replay_set)")
    dataset = paths.replay_set if run.replay else paths.data / SPLIT_FILES["train"]
    batch = sizes.domain_batch + (replay_rows_per_step if run.replay else 0)
    overrides = [
        f"model.model={base}",
        f"data.dataset=[{dataset}]",
        f"training.output_dir={paths.seed_dir(seed) / 'runs' / name}",
        f"training.max_steps={sizes.domain_steps}",
        f"training.per_device_train_batch_size={batch}",
        f"training.save_steps={sizes.domain_steps}",
        f"training.seed={seed}",
    ]
    if run.anchor_set:
        overrides.append(f"custom.anchor.dataset=[{paths.anchor_set}]")
    if run.teacher_targets:
        # Keyed by row, teacher and settings: the base answers each prompt once for all seeds and runs.
        overrides.append(f"custom.teacher_targets.cache_dir={paths.teacher_targets}")
        if sizes.max_completion_length is not None:
            overrides.append(f"rlhf.max_completion_length={sizes.max_completion_length}")
    if run.teacher_cache:
        overrides.append(f"custom.teacher_cache={paths.teacher_cache(base)}")
    return [*overrides, *run.overrides]


def train_domain_run(
    name: str, paths: TestbedPaths, base: Path, sizes: TestbedSizes, seed: int, replay_rows_per_step: int = 0
) -> Path:
    """Train one domain run from ``base``; returns its adapter checkpoint."""
    out = paths.seed_dir(seed) / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    overrides = training_overrides(name, paths, base, sizes, seed, replay_rows_per_step)
    _train(paths.configs / DOMAIN_RUNS[name].config, overrides)
    return _final_checkpoint(out)


def write_replay_set(domain: Path, answered: Path, out: Path, rows_per_step: int, domain_batch: int) -> int:
    """The ``replay`` run's data set: every domain row, then anchor rows with the base's answers as their
    assistant turns, as many as make ``rows_per_step`` of every ``domain_batch + rows_per_step`` rows (the
    anchored runs' share), drawn per kind in ``ANCHOR_SHARES`` (seeded). Returns the replay rows written.

    ``answered`` is the anchor set with the teacher's answers (the teacher-answer cache's data file). A
    replay row keeps the prompt, the answer and the images, and a ``meta`` shaped like the domain rows'."""
    from ..data.anchor_set import KINDS, draw, rows_per_kind

    domain_rows = [record for _, record in iter_jsonl(domain)]
    by_kind: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for line_no, record in iter_jsonl(answered):
        if record["messages"][-1]["role"] != "assistant":
            raise DataError(str(answered), "an anchor row without the teacher's answer", line_no)
        by_kind[record["meta"]["kind"]].append(record)
    count = round(len(domain_rows) * rows_per_step / domain_batch)
    replay = []
    for kind, wanted in rows_per_kind(count, ANCHOR_SHARES).items():
        if wanted and not by_kind[kind]:
            raise DataError(str(answered), f"holds no {kind} row to replay")
        for index in draw(wanted, len(by_kind[kind]), ANCHOR_SET_SEED, f"replay-{kind}") if wanted else ():
            record = by_kind[kind][index]
            row = {"messages": record["messages"]}
            if record.get("images"):
                row["images"] = record["images"]
            row["meta"] = {
                "id": f"replay-{record['meta']['id']}",
                "scene": "replay",
                "style": kind,
                "objects": [],
            }
            replay.append(row)
    write_jsonl(out, [*domain_rows, *replay])
    return len(replay)


def answered_anchor_set(paths: TestbedPaths, base: Path, sizes: TestbedSizes) -> tuple[Path, float]:
    """The anchor set with the base's answer to every row, from the teacher-answer cache that the anchored
    runs fill (generated here where it is missing: the same job, so the same answers), and the anchored
    recipe's ``custom.anchor.ratio``."""
    from ..config import ConfigLoader
    from ..trainers.teacher_targets import TargetJob, write_teacher_targets

    overrides = training_overrides(ANCHOR_RUN, paths, base, sizes, seed=0)
    config = ConfigLoader.resolve(
        paths.configs / DOMAIN_RUNS[ANCHOR_RUN].config, overrides, check_files=False
    )
    job = TargetJob.for_anchor_prompts(config)
    destinations, _ = write_teacher_targets(job)
    return destinations[job.sources[0]], config.custom.anchor.ratio


def build_replay_set(paths: TestbedPaths, base: Path, sizes: TestbedSizes) -> int:
    """Write ``paths.replay_set`` (:func:`write_replay_set`); returns the replay rows per step."""
    from ..config.schema import anchor_rows_for

    answered, ratio = answered_anchor_set(paths, base, sizes)
    per_step = anchor_rows_for(sizes.domain_batch, ratio)
    written = write_replay_set(
        paths.data / SPLIT_FILES["train"], answered, paths.replay_set, per_step, sizes.domain_batch
    )
    logger.info(
        "testbed: replay set %s: the domain rows and %d answered anchor rows", paths.replay_set, written
    )
    return per_step


def build_teacher_cache(paths: TestbedPaths, base: Path, sizes: TestbedSizes, runs: tuple[str, ...]) -> int:
    """Cache the base's top-k distributions over the rows of every run in ``runs`` that trains from the
    cache (``anchorkd teacher-cache``'s code, at its default k), once for all seeds; rows already cached are
    kept. Returns the rows written."""
    from ..config import ConfigLoader
    from ..trainers.teacher_cache import write_teacher_cache

    folder = paths.teacher_cache(base)
    staging_run = folder.with_name(f".{folder.name}.run")  # the trainer's output_dir; nothing is kept
    written = 0
    for name in runs:
        if not DOMAIN_RUNS[name].teacher_cache:
            continue
        # The run's own settings (writing ignores custom.teacher_cache); the seed changes no row.
        overrides = [
            *training_overrides(name, paths, base, sizes, seed=0),
            f"training.output_dir={staging_run}",
        ]
        config = ConfigLoader.resolve(paths.configs / DOMAIN_RUNS[name].config, overrides, check_files=False)
        written += write_teacher_cache(config, folder).rows_written
    shutil.rmtree(staging_run, ignore_errors=True)
    return written


def selected_runs(runs: tuple[str, ...]) -> tuple[str, ...]:
    """``runs`` in the testbed's order, with the runs whose checkpoints they evaluate (the WiSE runs need
    ``sft``); ValueError naming an unknown run."""
    unknown = [name for name in runs if name not in DOMAIN_RUNS]
    if unknown:
        raise ValueError(f"unknown testbed run(s) {', '.join(unknown)}; runs: {', '.join(DOMAIN_RUNS)}")
    wanted = set(runs) | {DOMAIN_RUNS[name].checkpoint_of for name in runs} - {None}
    return tuple(name for name in DOMAIN_RUNS if name in wanted)


def evaluate_run(name, paths, base, adapter, sizes, seed, base_text_ppl=None, adapter_scale=None) -> Path:
    from ..eval.evaluate import evaluate_checkpoint

    out = paths.seed_dir(seed) / "eval" / name
    shutil.rmtree(out, ignore_errors=True)
    evaluate_checkpoint(
        base,
        adapter,
        [paths.data / filename for filename in EVAL_FILES],
        paths.data / "text_eval.jsonl",
        out,
        base_text_ppl=base_text_ppl,
        batch_size=sizes.eval_batch,
        max_new_tokens=sizes.max_new_tokens,
        limit=sizes.eval_limit,
        max_regression_pct=float("inf"),  # the testbed reports regressions; it does not gate on them
        show_progress=True,
        adapter_scale=adapter_scale,
    )
    return out


def aggregate_seeds(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Mean of every numeric metric over seeds, with ``<metric>_std`` (sample std; 0 for one seed).

    The share of SFT's excess removed is a ratio, so it is taken of the seed-mean rates,
    ``(mean_sft - mean_run) / (mean_sft - mean_base)``, rather than averaged: a seed where SFT barely
    exceeds the base would otherwise swing the mean, or (undefined there) drop it. Its per-seed values
    stay in each seed's report.
    """
    from ..eval.compare import EXCESS_REMOVED_PREFIX, excess_removed

    runs: dict[str, dict] = {}
    for name in RUN_NAMES:
        rows = [metrics[name] for metrics in per_seed.values() if name in metrics]
        if not rows:
            continue
        merged: dict = {"seeds": len(rows)}
        for key in dict.fromkeys(key for row in rows for key in row):
            if key.startswith(EXCESS_REMOVED_PREFIX):
                continue
            values = [row.get(key) for row in rows]
            if all(real_number(v) is not None for v in values):
                merged[key] = statistics.fmean(values)
                merged[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        runs[name] = merged
    excess_keys = dict.fromkeys(
        key
        for metrics in per_seed.values()
        for run in metrics.values()
        for key in run
        if key.startswith(EXCESS_REMOVED_PREFIX)
    )
    if "base" in runs and DRIFT_RUN in runs:
        for key in excess_keys:
            rate_key = "ood_domain_object_rate" + key.removeprefix(EXCESS_REMOVED_PREFIX)
            drift, base = runs[DRIFT_RUN].get(rate_key), runs["base"].get(rate_key)
            for name, merged in runs.items():
                if name not in ("base", DRIFT_RUN):
                    merged[key] = excess_removed(merged.get(rate_key), drift, base)
    return runs


def run_testbed(
    root: str | Path = "outputs/testbed",
    configs: str | Path | None = None,
    seeds: tuple[int, ...] = (0,),
    sizes: TestbedSizes | None = None,
    runs: tuple[str, ...] = DEFAULT_RUNS,
) -> TestbedResult:
    from ..eval.compare import compare_runs, example_captions
    from ..eval.report import write_comparison_report
    from ..eval.score import TEXT_EVAL_FILE, read_text_eval

    sizes = sizes or TestbedSizes()
    paths = testbed_paths(root, configs)
    timings: dict[str, float] = {}
    started = time.monotonic()

    def lap(label: str, since: float) -> float:
        now = time.monotonic()
        timings[label] = round(now - since, 1)
        logger.info("testbed: %s took %.0f s", label, now - since)
        return now

    # The assets are those of the demo (seed 0); the testbed's seeds vary only the domain runs.
    prepare_demo_assets(paths.root, seed=0, quick=sizes.data == "quick")
    mark = lap("assets", started)

    base, cached = build_base(paths, sizes)
    mark = lap("base_cached" if cached else "base_train", mark)

    runs = selected_runs(runs)
    if any(DOMAIN_RUNS[name].anchor_set or DOMAIN_RUNS[name].replay for name in runs):
        build_testbed_anchor_set(paths, sizes)
        mark = lap("anchor_set", mark)
    if any(DOMAIN_RUNS[name].teacher_cache for name in runs):
        build_teacher_cache(paths, base, sizes, runs)
        mark = lap("teacher_cache", mark)

    per_seed: dict[int, dict[str, dict]] = {}
    first_seed_evals: dict[str, Path] = {}
    base_eval = None
    replay_rows_per_step = 0
    for seed in seeds:
        eval_dirs: dict[str, Path] = {}
        if base_eval is None:
            base_eval = evaluate_run("base", paths, base, None, sizes, seeds[0])
            mark = lap("eval_base", mark)
        eval_dirs["base"] = base_eval
        base_ppl = read_text_eval(base_eval / TEXT_EVAL_FILE)["ppl"]
        checkpoints: dict[str, Path] = {}
        for name in runs:
            run = DOMAIN_RUNS[name]
            if run.checkpoint_of is not None:
                adapter = checkpoints[run.checkpoint_of]
            else:
                if run.replay and not replay_rows_per_step:
                    replay_rows_per_step = build_replay_set(paths, base, sizes)
                    mark = lap("replay_set", mark)
                adapter = checkpoints[name] = train_domain_run(
                    name, paths, base, sizes, seed, replay_rows_per_step if run.replay else 0
                )
                mark = lap(f"train_{name}_seed{seed}", mark)
            eval_dirs[name] = evaluate_run(
                name,
                paths,
                base,
                adapter,
                sizes,
                seed,
                base_text_ppl=base_ppl,
                adapter_scale=run.adapter_scale,
            )
            mark = lap(f"eval_{name}_seed{seed}", mark)
        first_seed_evals = first_seed_evals or eval_dirs
        per_seed[seed] = compare_runs(
            eval_dirs,
            paths.seed_dir(seed) / "report",
            title=f"anchorkd testbed, seed {seed}",
            scene_groups=SCENE_GROUPS,
            drift_name=DRIFT_RUN if DRIFT_RUN in eval_dirs else None,
        )

    report_dir = paths.root / "report"
    aggregated = aggregate_seeds(per_seed)
    timings["total"] = round(time.monotonic() - started, 1)
    write_comparison_report(
        report_dir,
        aggregated,
        examples=example_captions(first_seed_evals),
        title=f"anchorkd anchoring testbed ({len(seeds)} seed(s): {', '.join(map(str, seeds))})",
        metadata={
            "seeds": list(seeds),
            "sizes": asdict(sizes),
            "base_checkpoint": str(base),
            "base_cached": cached,
            "timings_s": timings,
            "per_seed": {str(s): m for s, m in per_seed.items()},
        },
        # The Pareto chart: base and SFT as its reference points, the seeds' spread of excess removed.
        base_run="base",
        drift_run=DRIFT_RUN,
        seed_metrics=per_seed,
    )
    return TestbedResult(report_dir, aggregated, per_seed, timings, cached)
