"""Step time and peak memory of KD training vs plain SFT, on the tiny Qwen3-VL (see docs/performance.md).

One invocation builds the tiny model and a fixed data set (16 image + dense-caption samples per
sequence length, batch 4), then trains every variant for 3 steps, each run in its own process
(``bench/_kd_step_worker.py``), interleaved over rounds (``for round: for seq_len: for variant``) in
a priority order that a time budget (``--budget-s``, default 600 s) cuts from the end; see
``make_plan``. Skipped runs are printed, shown in the table and listed in the JSON, never estimated.

Variants (LoRA rank 8 on the language model, vision tower and aligner frozen, forward-only GKD with
lmbda 0, beta 0.1, sft_alpha 1, temperature 1 wherever there is a KD term):

* ``stock_sft``        ms-swift ``SwiftSft`` + ``Seq2SeqTrainer`` (the baseline of every ratio)
* ``stock_gkd``        ms-swift ``SwiftRLHF`` + ``GKDTrainer``; teacher = the model path, so ms-swift
                       uses the student with its LoRA adapter disabled (no second copy of the weights)
* ``gkd_reference``    anchorkd ``GKDTrainerWithMetrics``, ``kd_loss_impl: reference`` (full logits),
                       separate frozen teacher (a second path to the same checkpoint)
* ``gkd_fused``        same, ``kd_loss_impl: fused`` (chunked CE + JSD from hidden states)
* ``gkd_base_anchor``  fused, teacher = the model path (LoRA-disabled student, no second copy)
* ``gkd_cached``       fused top-k + tail JSD from the separate teacher's cache (``custom.teacher_cache``,
                       k = 64, written once per length by ``anchorkd teacher-cache`` before the first
                       timed run, untimed): no teacher loaded

Per run: median wall time of the steps after the first ``--warmup-steps`` (2), and the worker's own
peak RSS. Per (seq_len, variant): the median over rounds of the per-run medians and the median peak
RSS; ratios are to ``stock_sft`` at the same sequence length.

    python bench/kd_step.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_kd_step_worker.py"

VARIANTS = ("stock_sft", "stock_gkd", "gkd_reference", "gkd_fused", "gkd_base_anchor", "gkd_cached")
STOCK_VARIANTS = ("stock_sft", "stock_gkd")
SEQ_LENS = (450, 1800)
NUM_SAMPLES = 16
BATCH_SIZE = 4
IMAGE_SIZE = 256  # 16 x 16 patches of 16 px, merged 2 x 2: 64 visual tokens

# Targets of the issue, on this machine: (variant, metric) -> largest allowed ratio to stock SFT.
TARGETS = {
    ("gkd_fused", "time_ratio"): 2.0,
    ("gkd_fused", "memory_ratio"): 1.25,
    ("gkd_base_anchor", "memory_ratio"): 1.15,
    ("gkd_cached", "time_ratio"): 1.15,  # issue 17 §4 (and peak memory no higher than gkd_fused's)
}
# Top-k of the teacher cache the gkd_cached variant trains from.
CACHE_K = 64

TEACHERS = {
    "stock_sft": "none",
    "stock_gkd": "base_anchor (ms-swift: student with LoRA disabled)",
    "gkd_reference": "separate frozen copy",
    "gkd_fused": "separate frozen copy",
    "gkd_base_anchor": "base_anchor (student with LoRA disabled)",
    "gkd_cached": "none loaded: the separate copy's top-64 cache",
}


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------


def _ensure_src_on_path() -> None:
    src = str(REPO_ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def model_sizes(size: str):
    """``tiny``: the project's default tiny model; ``large``: text hidden 1024, 8 layers (for GPUs)."""
    from anchorkd.demo.tiny_model import TinyQwen3VLSizes

    if size == "tiny":
        return TinyQwen3VLSizes()
    return TinyQwen3VLSizes(
        text_hidden=1024,
        text_layers=8,
        text_heads=16,
        text_kv_heads=8,
        head_dim=64,
        text_intermediate=3072,
        mrope_section=(8, 12, 12),
    )


def build_model(out_dir: Path, size: str) -> Path:
    from anchorkd.demo.tiny_model import make_tiny_model

    return make_tiny_model(out_dir, seed=0, sizes=model_sizes(size))


_ATTRIBUTES = (
    "grey 42U cabinet",
    "front door closed",
    "status LED green",
    "fibre pair, yellow jacket",
    "copper patch lead",
    "printed asset tag",
    "blanking plate",
    "power feed A",
    "power feed B",
    "cable tray above",
)


def _caption_lines(rng, objects: list[dict]):
    """An endless dense caption: the scene's real objects first, then more boxed parts of the room."""
    from anchorkd.demo.scenes import INDOOR_OBJECTS

    for obj in objects:
        yield f"{obj['name']}: [{', '.join(str(v) for v in obj['box'])}]\n"
    while True:
        name = INDOOR_OBJECTS[int(rng.integers(len(INDOOR_OBJECTS)))]
        x1, y1 = (int(v) for v in rng.integers(0, 900, size=2))
        x2, y2 = x1 + int(rng.integers(10, 1000 - x1)), y1 + int(rng.integers(10, 1000 - y1))
        note = _ATTRIBUTES[int(rng.integers(len(_ATTRIBUTES)))]
        yield f"{name}: [{x1}, {y1}, {x2}, {y2}] ({note})\n"


@dataclass
class DataSet:
    seq_len: int
    path: Path
    planned_tokens: list[int] = field(default_factory=list)


# Tokens the qwen3_vl template adds around the answer with one image and the dense prompt: the chat
# markers, the prompt text and the image placeholder expanded to 64 visual tokens. Checked against
# the template's own encoding in every run (reported as "tokens per sample").
_TEMPLATE_OVERHEAD = 84
# Of those, the answer's closing ``<|im_end|>`` and newline are supervised too.
_SUPERVISED_OVERHEAD = _TEMPLATE_OVERHEAD - 2


def build_data(out_dir: Path, seq_len: int, tokenizer, seed: int = 0) -> DataSet:
    """``NUM_SAMPLES`` samples (one synthetic equipment-room image, a dense caption) of ~``seq_len`` tokens."""
    import numpy as np

    from anchorkd.demo.scenes import draw_scene
    from anchorkd.demo.synthetic import DENSE_PROMPT, scene_annotations
    from anchorkd.io import write_jsonl

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    target_answer = seq_len - _TEMPLATE_OVERHEAD
    path = out_dir / f"train_{seq_len}.jsonl"
    data = DataSet(seq_len, path)

    def records():
        for index in range(NUM_SAMPLES):
            rng = np.random.default_rng([seed, seq_len, index])
            scene = draw_scene("indoor", rng, IMAGE_SIZE)
            image_path = images / f"{seq_len}-{index:02d}.png"
            scene.image.save(image_path, format="PNG")
            answer, used = "", 0
            for line in _caption_lines(rng, scene_annotations(scene)):
                ids = tokenizer(line, add_special_tokens=False)["input_ids"]
                if used + len(ids) > target_answer:  # end on a cut line, to land on the target
                    answer += tokenizer.decode(ids[: target_answer - used])
                    used = target_answer
                    break
                answer, used = answer + line, used + len(ids)
            data.planned_tokens.append(used + _TEMPLATE_OVERHEAD)
            yield {
                "messages": [
                    {"role": "user", "content": DENSE_PROMPT},
                    {"role": "assistant", "content": answer.rstrip("\n")},
                ],
                "images": [str(image_path)],
            }

    write_jsonl(path, records())
    return data


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def run_config(
    variant: str,
    model: Path,
    teacher_copy: Path,
    data: DataSet,
    steps: int,
    output_dir: Path,
    dtype: str,
    teacher_cache: Path | None = None,
) -> dict:
    """The anchorkd YAML (as a dict) of one run (``teacher_cache``: the cache folder of ``gkd_cached``)."""
    config = {
        "model": {
            "model": str(model),
            "model_type": "qwen3_vl",
            "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        },
        "data": {"dataset": [str(data.path)], "split_dataset_ratio": 0.0, "dataset_num_proc": 1},
        "template": {"template": "qwen3_vl", "max_length": 4096, "max_pixels": IMAGE_SIZE * IMAGE_SIZE},
        "tuner": {
            "tuner_type": "lora",
            "target_modules": ["all-linear"],
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "freeze_llm": False,
            "freeze_vit": True,
            "freeze_aligner": True,
        },
        "training": {
            "output_dir": str(output_dir),
            "add_version": False,
            "max_steps": steps,
            "per_device_train_batch_size": BATCH_SIZE,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1.0e-4,
            "warmup_ratio": 0.0,
            "gradient_checkpointing": False,
            "logging_steps": 1,
            "eval_strategy": "no",
            "save_strategy": "no",
            "report_to": ["none"],
            "dataloader_num_workers": 0,
            "seed": 0,
        },
    }
    if variant != "stock_sft":
        teacher = model if variant in ("stock_gkd", "gkd_base_anchor") else teacher_copy
        config["rlhf"] = {
            "rlhf_type": "gkd",
            "teacher_model": str(teacher),
            "teacher_model_type": "qwen3_vl",
            "beta": 0.1,
            "sft_alpha": 1.0,
            "lmbda": 0.0,
            "seq_kd": False,
            "temperature": 1.0,
        }
    if variant.startswith("gkd_"):
        config["rlhf"]["llm_kd_weight"] = 1.0
        config["custom"] = {
            "trainer_variant": "gkd_monitor",
            "kd_loss_impl": "reference" if variant == "gkd_reference" else "fused",
        }
    if variant == "gkd_cached":
        config["custom"]["teacher_cache"] = str(teacher_cache)
    return config


def ensure_teacher_cache(config: dict, folder: Path, threads: int) -> str:
    """Write the gkd_cached run's teacher cache with ``anchorkd teacher-cache`` (the live separate teacher;
    the command ignores ``custom.teacher_cache``) unless it is there; returns a line to print."""
    import yaml

    if (folder / "cache.json").is_file() and any(folder.glob("shard-*.safetensors")):
        return f"teacher cache {folder}: already written"
    folder.parent.mkdir(parents=True, exist_ok=True)
    config_path = folder.parent / f"{folder.name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "anchorkd.cli", "teacher-cache", "--config", str(config_path)]
    command += ["--out", str(folder), "--k", str(CACHE_K)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=folder.parent)
    if done.returncode != 0:
        raise RuntimeError(f"anchorkd teacher-cache failed: {(done.stdout + done.stderr)[-2000:]}")
    summary = [line for line in done.stdout.splitlines() if line.startswith("anchorkd: teacher cache")]
    return f"{(summary or ['teacher cache written'])[-1]} ({time.perf_counter() - start:.0f} s with start-up)"


# --------------------------------------------------------------------------------------------------
# Running one worker
# --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    variant: str
    seq_len: int
    round: int
    steps: int
    status: str  # ok | failed | killed-memory | killed-time
    record: dict = field(default_factory=dict)
    wall_s: float = 0.0
    sampled_peak_rss_mb: float = 0.0
    message: str = ""


MIN_FREE_MB = 768  # kill the run when the machine has less memory available than this


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_worker(
    variant: str,
    seq_len: int,
    round_index: int,
    steps: int,
    config: dict,
    run_dir: Path,
    threads: int,
    mem_cap_mb: float,
    time_cap_s: float,
) -> RunResult:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out_path = run_dir / "result.json"
    log_path = run_dir / "worker.log"
    cmd = [sys.executable, str(WORKER), "--variant", variant, "--config", str(config_path)]
    cmd += ["--out", str(out_path), "--threads", str(threads)]
    if variant in STOCK_VARIANTS:
        cmd.append("--stock")
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    result = RunResult(variant, seq_len, round_index, steps, "ok")
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while proc.poll() is None:
            rss = _rss_mb(proc.pid)
            result.sampled_peak_rss_mb = max(result.sampled_peak_rss_mb, rss)
            elapsed = time.perf_counter() - start
            # Others may share the machine: stop before the kernel's OOM killer picks a process.
            low_memory = _mem_available_mb() < MIN_FREE_MB
            if rss > mem_cap_mb or low_memory or elapsed > time_cap_s:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if rss > mem_cap_mb:
                    result.status = "killed-memory"
                    result.message = f"RSS {rss:.0f} MB passed the cap of {mem_cap_mb:.0f} MB"
                elif low_memory:
                    result.status = "killed-memory"
                    result.message = f"the machine ran out of memory (less than {MIN_FREE_MB} MB available) at RSS {rss:.0f} MB"
                else:
                    result.status = "killed-time"
                    result.message = f"still running after {time_cap_s:.0f} s"
                break
            time.sleep(0.2)
    result.wall_s = time.perf_counter() - start
    if result.status == "ok" and proc.returncode == -signal.SIGKILL:
        result.status = "killed-memory"
        result.message = f"SIGKILL from outside (the kernel's OOM killer?) at sampled RSS {result.sampled_peak_rss_mb:.0f} MB"
    elif result.status == "ok":
        if proc.returncode != 0 or not out_path.exists():
            result.status = "failed"
            lines = [
                line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()
            ]
            errors = [line for line in lines if "Error" in line or "Exception" in line]
            last = (errors or lines or ["no output"])[-1]
            result.message = f"exit {proc.returncode}: {last[:200]} (log: {log_path})"
        else:
            result.record = json.loads(out_path.read_text())
    return result


# --------------------------------------------------------------------------------------------------
# The plan: which runs, in which order, and what is skipped
# --------------------------------------------------------------------------------------------------

# Variants whose step is far slower than the rest (full [B, T, V] logits for student and teacher): by
# default they run in the first round only, with the fewest steps that leave one timed step.
SLOW_VARIANTS = ("stock_gkd", "gkd_reference")
# Rough step time vs stock SFT, used only to budget a variant that has not run yet (stock GKD: the
# 10.8x of shared/FACTS.md; the others: guesses, replaced by measurements as soon as there are any).
PRIOR_STEP_FACTOR = {
    "stock_sft": 1.0,
    "stock_gkd": 11.0,
    "gkd_reference": 6.0,
    "gkd_fused": 3.0,
    "gkd_base_anchor": 3.0,
    "gkd_cached": 1.5,
}


@dataclass
class PlannedRun:
    seq_len: int
    variant: str
    round: int
    steps: int


def make_plan(args: argparse.Namespace) -> list[list[PlannedRun]]:
    """Groups of runs in priority order; every run is its own process.

    A group is one round of the fast variants (stock SFT, fused, base anchor) at one length, or one
    slow full-logits variant (stock GKD, reference) at one length. Default order:

    1. round 1 at each length (every target row gets a measurement first);
    2. rounds 2..R at the first (shortest) length;
    3. the slow variants, round 1 only, at each length;
    4. rounds 2..R at the other lengths.

    Under ``--budget-s`` a group predicted to end past the budget is skipped whole (so the variants of
    a round stay side by side) and later, smaller groups may still run. ``--full``: every variant in
    every round, ``for round: for seq_len: for variant``, no budget.
    """
    if args.full:
        return [
            [PlannedRun(seq, v, r, args.steps[seq]) for v in args.variants]
            for r in range(1, args.rounds + 1)
            for seq in args.seq_lens
        ]
    fast = [v for v in args.variants if v not in SLOW_VARIANTS]
    slow = [v for v in args.variants if v in SLOW_VARIANTS]
    first, rest = args.seq_lens[0], args.seq_lens[1:]

    def fast_round(seq: int, r: int) -> list[PlannedRun]:
        return [PlannedRun(seq, v, r, args.steps[seq]) for v in fast]

    groups = [fast_round(seq, 1) for seq in args.seq_lens]
    groups += [fast_round(first, r) for r in range(2, args.rounds + 1)]
    groups += [[PlannedRun(seq, v, 1, args.slow_steps)] for seq in args.seq_lens for v in slow]
    groups += [fast_round(seq, r) for r in range(2, args.rounds + 1) for seq in rest]
    return [g for g in groups if g]


def _median(values):
    return statistics.median(values) if values else None


class Predictor:
    """Predicts the wall time and peak RSS of a run from the runs already done (None: no basis)."""

    def __init__(self, supervised: dict[int, float]) -> None:
        self.supervised = supervised  # seq_len -> supervised tokens per batch
        self.done: list[RunResult] = []

    def _ok(self, variant=None, seq_len=None):
        return [
            r
            for r in self.done
            if r.status == "ok"
            and (variant is None or r.variant == variant)
            and (seq_len is None or r.seq_len == seq_len)
        ]

    def _scale(self, seq_len: int, other: int) -> float:
        return self.supervised.get(seq_len, seq_len) / self.supervised.get(other, other)

    def wall_s(self, run: PlannedRun) -> float | None:
        same = self._ok(run.variant, run.seq_len)
        if same:
            r = same[-1]
            overhead = r.wall_s - sum(r.record["step_s"])
            return overhead + statistics.median(r.record["step_s"]) * run.steps
        for variant, factor in ((run.variant, 1.0), ("stock_sft", PRIOR_STEP_FACTOR[run.variant])):
            shorter = [r for r in self._ok(variant) if r.seq_len <= run.seq_len]
            if shorter:
                r = shorter[-1]
                overhead = r.wall_s - sum(r.record["step_s"])
                step = statistics.median(r.record["step_s"][-2:]) * self._scale(run.seq_len, r.seq_len)
                return overhead + step * factor * run.steps
        return None

    def peak_rss_mb(self, run: PlannedRun) -> float | None:
        """Vocabulary-sized tensors grow with the positions: scale the variant's excess over SFT."""
        for r in self.done:  # killed at the cap at this length or a shorter one: it needs more still
            if r.variant == run.variant and r.status == "killed-memory" and r.seq_len <= run.seq_len:
                return r.sampled_peak_rss_mb * self._scale(run.seq_len, r.seq_len)
        if self._ok(run.variant, run.seq_len):
            return None  # it already ran at this length: no guessing needed
        sft_here = self._ok("stock_sft", run.seq_len)
        for r in self._ok(run.variant):
            base = self._ok("stock_sft", r.seq_len)
            if r.seq_len < run.seq_len and base and sft_here:
                excess = r.record["peak_rss_mb"] - base[-1].record["peak_rss_mb"]
                return sft_here[-1].record["peak_rss_mb"] + excess * self._scale(run.seq_len, r.seq_len)
        return None


# --------------------------------------------------------------------------------------------------
# Aggregation and output
# --------------------------------------------------------------------------------------------------


def summarise(results: list[RunResult], skipped: list[dict], args) -> list[dict]:
    rows = []
    for seq_len in args.seq_lens:
        base = None
        for variant in args.variants:
            runs = [r for r in results if r.seq_len == seq_len and r.variant == variant]
            ok = [r for r in runs if r.status == "ok" and len(r.record["step_s"]) > args.warmup_steps]
            row = {"seq_len": seq_len, "variant": variant, "teacher": TEACHERS[variant]}
            if not ok:
                reasons = [f"{r.status}: {r.message}" for r in runs if r.status != "ok"]
                reasons += [
                    s["reason"] for s in skipped if s["seq_len"] == seq_len and s["variant"] == variant
                ]
                row["skipped"] = "; ".join(dict.fromkeys(reasons)) or "not run"
                rows.append(row)
                continue
            per_run = [statistics.median(r.record["step_s"][args.warmup_steps :]) for r in ok]
            per_run_cpu = [statistics.median(r.record["step_cpu_s"][args.warmup_steps :]) for r in ok]
            row.update(
                step_s_median=statistics.median(per_run),
                peak_rss_mb=statistics.median(r.record["peak_rss_mb"] for r in ok),
                step_cpu_s_median=statistics.median(per_run_cpu),
                rounds=len(ok),
                steps=ok[0].steps,
                timed_steps_per_run=ok[0].steps - args.warmup_steps,
                step_s_per_run=per_run,
                trainer=ok[0].record.get("trainer"),
                teacher_loaded=ok[0].record.get("teacher"),
            )
            if "peak_gpu_mb" in ok[0].record:
                row["peak_gpu_mb"] = statistics.median(r.record["peak_gpu_mb"] for r in ok)
            if variant == "stock_sft":
                base = row
            rows.append(row)
        memory_key = "peak_gpu_mb" if base and "peak_gpu_mb" in base else "peak_rss_mb"
        for row in rows:
            if row["seq_len"] != seq_len or "skipped" in row:
                continue
            if base is None:
                row["time_ratio"] = row["memory_ratio"] = row["cpu_ratio"] = None
                continue
            row["time_ratio"] = row["step_s_median"] / base["step_s_median"]
            row["cpu_ratio"] = row["step_cpu_s_median"] / base["step_cpu_s_median"]
            row["memory_ratio"] = row[memory_key] / base[memory_key]
    return rows


def _target_mark(row: dict, metric: str) -> str:
    limit = TARGETS.get((row["variant"], metric))
    if limit is None or row.get(metric) is None:
        return ""
    return f" {'✓' if row[metric] <= limit else '✗'} (≤{limit:g})"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| seq_len | variant | step_s_median | peak_rss_mb | time_ratio | memory_ratio | cpu_ratio | rounds x timed steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "skipped" in row:
            reason = row["skipped"] if len(row["skipped"]) <= 160 else row["skipped"][:157] + "..."
            lines.append(f"| {row['seq_len']} | {row['variant']} | skipped: {reason} | | | | | |")
            continue
        time_ratio = "-" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        memory_ratio = "-" if row["memory_ratio"] is None else f"{row['memory_ratio']:.2f}"
        cpu_ratio = "-" if row.get("cpu_ratio") is None else f"{row['cpu_ratio']:.2f}"
        lines.append(
            f"| {row['seq_len']} | {row['variant']} | {row['step_s_median']:.2f} | {row['peak_rss_mb']:.0f} "
            f"| {time_ratio}{_target_mark(row, 'time_ratio')} "
            f"| {memory_ratio}{_target_mark(row, 'memory_ratio')} | {cpu_ratio} "
            f"| {row['rounds']} x {row['timed_steps_per_run']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Kernel floor (bench/loss_floor.py, a subprocess per variant there too)
# --------------------------------------------------------------------------------------------------


def run_loss_floor(n: int, threads: int, out_dir: Path) -> dict | None:
    """CE alone vs fused CE + JSD, forward + backward incl. the LM-head GEMMs, on ``n`` positions."""
    script = Path(__file__).resolve().parent / "loss_floor.py"
    if not script.exists():
        return {"error": "bench/loss_floor.py not found"}
    out = out_dir / "loss_floor.json"
    cmd = [sys.executable, str(script), "--n", str(n), "--threads", str(threads), "--beta", "0.1"]
    cmd += ["--temperature", "1.0", "--repeats", "1", "--warmup", "1", "--json", str(out)]
    cmd += ["--variants", "ce_plain", "fused_jsd_ce"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"loss_floor.py exited {proc.returncode}: " + " | ".join(tail)}
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    ce = results["ce_plain"]["median_s"]
    return {
        "n_positions": n,
        "ce_plain_s": ce,
        "fused_jsd_ce_s": results["fused_jsd_ce"]["median_s"],
        "floor_ratio": results["fused_jsd_ce"]["median_s"] / ce,
    }


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _code_state() -> dict:
    """Which code was measured: the commit, and hashes of the files the KD step runs through."""
    from anchorkd.io import sha256_file

    state = {}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=REPO_ROOT, capture_output=True, text=True
        )
        state["commit"] = head.stdout.strip() or None
        state["src_modified"] = bool(dirty.stdout.strip())
    except OSError:
        pass
    for name in ("losses/fused.py", "trainers/gkd_monitor.py"):
        path = REPO_ROOT / "src" / "anchorkd" / name
        if path.exists():
            state[name] = sha256_file(path)[:12]
    return state


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _parse_steps(text: str) -> dict[int, int]:
    """``4`` (every length) or ``450:4,1800:3``."""
    if ":" not in text:
        return {0: int(text)}
    return {int(k): int(v) for k, v in (part.split(":") for part in text.split(","))}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--steps",
        default="3",
        help="optimizer steps per run: N, or per sequence length as 450:4,1800:3 (default 3); the "
        "first --warmup-steps are not timed",
    )
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument(
        "--slow-steps", type=int, default=3, help="steps per run of stock_gkd / gkd_reference (default 3)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every variant in every round, no time budget (well over an hour on 2 cores)",
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads per run (default 2)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=600,
        help="start no run predicted to end past this many seconds after the start (default 600; "
        "0: no limit); runs not started are reported as skipped",
    )
    parser.add_argument(
        "--mem-cap-mb",
        type=float,
        default=0,
        help="kill a run whose RSS passes this, and skip runs predicted to (default: 90%% of MemAvailable)",
    )
    parser.add_argument("--model-size", choices=("tiny", "large"), default="tiny")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--no-floor", action="store_true", help="skip the loss-floor measurement")
    parser.add_argument("--workdir", type=Path, help="keep model, data, configs and logs here")
    args = parser.parse_args(argv)
    steps = _parse_steps(args.steps)
    args.steps = {seq: steps.get(seq, steps.get(0, max(steps.values()))) for seq in args.seq_lens}
    if min(args.steps.values()) <= args.warmup_steps or args.slow_steps <= args.warmup_steps:
        parser.error("every run needs more steps than --warmup-steps")
    if args.full:
        args.budget_s = 0
    args.variants = [v for v in VARIANTS if v in args.variants]  # stock_sft first: it is the baseline
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    _ensure_src_on_path()
    from anchorkd.offline import configure_network

    configure_network()
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="anchorkd-kd-step-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mem_cap = args.mem_cap_mb or 0.9 * _mem_available_mb()
    load_start = os.getloadavg()
    code = _code_state()
    print(
        f"kd_step: {platform.node()} cpus={os.cpu_count()} threads/run={args.threads} load={load_start[0]:.1f} "
        f"mem cap {mem_cap:.0f} MB workdir {workdir}",
        flush=True,
    )
    if load_start[0] > max(1.0, (os.cpu_count() or 2) - args.threads + 0.5):
        print(
            "kd_step: WARNING: the machine is busy (1-min load average above the spare cores): timings will "
            "be inflated; ratios come from interleaved runs, cpu_ratio is the more robust one",
            flush=True,
        )

    from transformers import Qwen2TokenizerFast

    from anchorkd.demo.tiny_model import tokenizer_files_dir

    model = workdir / f"model-{args.model_size}"
    if not model.exists():
        build_model(model, args.model_size)
    teacher_copy = workdir / f"teacher-{args.model_size}"  # same weights, another path: a separate teacher
    if not teacher_copy.exists():
        teacher_copy.symlink_to(model, target_is_directory=True)
    tokenizer = Qwen2TokenizerFast.from_pretrained(str(tokenizer_files_dir()))
    datasets = {seq: build_data(workdir / "data", seq, tokenizer) for seq in args.seq_lens}
    print(f"kd_step: model + data ready in {time.perf_counter() - started:.0f} s", flush=True)

    # The loss floor first: its time then counts against the budget like everything else.
    supervised = {seq: BATCH_SIZE * (seq - _SUPERVISED_OVERHEAD) for seq in args.seq_lens}
    floor = None
    if not args.no_floor:
        n = supervised[min(args.seq_lens)]
        print(f"kd_step: loss floor (bench/loss_floor.py, N={n} positions) ...", flush=True)
        floor = run_loss_floor(n, args.threads, workdir)
        print(f"kd_step: loss floor done at {time.perf_counter() - started:.0f} s", flush=True)

    groups = make_plan(args)
    total_runs = sum(len(g) for g in groups)
    predictor = Predictor(supervised)
    results: list[RunResult] = []
    skipped: list[dict] = []
    index = 0
    for group in groups:
        elapsed = time.perf_counter() - started
        predictions = [predictor.wall_s(run) for run in group]
        group_s = sum(p for p in predictions if p is not None)
        # 10% + 15 s of slack: predictions are rough, and the table and JSON come after the last run.
        over_budget = bool(args.budget_s) and elapsed + 1.1 * group_s + 15 > args.budget_s
        for run in group:
            index += 1
            label = f"[{index}/{total_runs}] round {run.round} seq {run.seq_len} {run.variant} ({run.steps} steps)"
            predicted_rss = predictor.peak_rss_mb(run)
            reason = None
            if predicted_rss is not None and predicted_rss > mem_cap:
                reason = f"predicted peak RSS {predicted_rss / 1024:.0f} GB > cap {mem_cap / 1024:.0f} GB"
            elif over_budget:
                reason = (
                    f"time budget: this group predicted {group_s:.0f} s, "
                    f"{max(0.0, args.budget_s - elapsed):.0f} s of --budget-s {args.budget_s:.0f} left"
                )
            if reason:
                print(f"{label}: skipped ({reason})", flush=True)
                skipped.append(
                    {"seq_len": run.seq_len, "variant": run.variant, "round": run.round, "reason": reason}
                )
                continue
            cache = workdir / "teacher-cache" / f"{args.model_size}-{run.seq_len}-k{CACHE_K}"
            config = run_config(
                run.variant,
                model,
                teacher_copy,
                datasets[run.seq_len],
                run.steps,
                workdir / "runs" / f"r{run.round}-{run.seq_len}-{run.variant}" / "output",
                args.dtype,
                teacher_cache=cache,
            )
            if run.variant == "gkd_cached":  # the cache pass, once per length, outside the timed run
                print(f"{label}: {ensure_teacher_cache(config, cache, args.threads)}", flush=True)
            result = run_worker(
                run.variant,
                run.seq_len,
                run.round,
                run.steps,
                config,
                workdir / "runs" / f"r{run.round}-{run.seq_len}-{run.variant}",
                args.threads,
                mem_cap,
                time_cap_s=max(args.budget_s * 1.5, 600) if args.budget_s else float("inf"),
            )
            result.record["load_avg"] = os.getloadavg()[0]
            results.append(result)
            predictor.done.append(result)
            if result.status == "ok":
                steps = ", ".join(f"{s:.1f}" for s in result.record["step_s"])
                print(
                    f"{label}: steps [{steps}] s, peak RSS {result.record['peak_rss_mb']:.0f} MB, "
                    f"process {result.wall_s:.0f} s",
                    flush=True,
                )
            else:
                print(f"{label}: {result.status}: {result.message}", flush=True)

    rows = summarise(results, skipped, args)
    total_s = time.perf_counter() - started
    tokens = {}
    for r in results:
        if r.status == "ok" and r.seq_len not in tokens:
            tokens[r.seq_len] = _token_summary(r.record.get("dataset"), datasets[r.seq_len])
    print()
    for seq, summary in tokens.items():
        print(f"seq_len {seq}: {summary}")
    print()
    print(format_table(rows))
    if floor:
        if "error" in floor:
            print(f"\nkernel floor: {floor['error']}")
        else:
            print(
                f"\nkernel floor (loss alone, fwd+bwd, N={floor['n_positions']}, V=151936): CE {floor['ce_plain_s']:.2f} s, "
                f"fused CE+JSD {floor['fused_jsd_ce_s']:.2f} s "
                f"-> floor ratio {floor['floor_ratio']:.2f}x (vs gkd_fused step time_ratio above)"
            )
    print(f"\nkd_step: total {total_s:.0f} s, load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")

    if args.json:
        payload = {
            "runs": [
                {
                    key: row.get(key)
                    for key in (
                        "seq_len",
                        "variant",
                        "step_s_median",
                        "peak_rss_mb",
                        "time_ratio",
                        "memory_ratio",
                        "rounds",
                        "steps",
                        "timed_steps_per_run",
                        "step_cpu_s_median",
                        "cpu_ratio",
                        "step_s_per_run",
                        "peak_gpu_mb",
                        "teacher",
                        "teacher_loaded",
                        "trainer",
                    )
                    if key in row
                }
                for row in rows
                if "skipped" not in row
            ],
            "skipped": [
                {k: row[k] for k in ("seq_len", "variant", "skipped")} for row in rows if "skipped" in row
            ],
            "targets": {f"{v}.{m}": limit for (v, m), limit in TARGETS.items()},
            "loss_floor": floor,
            "tokens_per_sample": {str(k): v for k, v in tokens.items()},
            "settings": {
                "batch_size": BATCH_SIZE,
                "num_samples": NUM_SAMPLES,
                "warmup_steps": args.warmup_steps,
                "threads": args.threads,
                "model_size": args.model_size,
                "dtype": args.dtype,
                "budget_s": args.budget_s,
                "mem_cap_mb": mem_cap,
                "full": args.full,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "load_avg_start": load_start[0],
                "load_avg_end": os.getloadavg()[0],
                "python": platform.python_version(),
            },
            "code": code,
            "total_s": total_s,
            "per_process": [
                {
                    "seq_len": r.seq_len,
                    "variant": r.variant,
                    "round": r.round,
                    "status": r.status,
                    "message": r.message,
                    "wall_s": r.wall_s,
                    "step_s": r.record.get("step_s"),
                    "step_cpu_s": r.record.get("step_cpu_s"),
                    "peak_rss_mb": r.record.get("peak_rss_mb"),
                    "load_avg": r.record.get("load_avg"),
                }
                for r in results
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"kd_step: wrote {args.json}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _token_summary(dataset: dict | None, data: DataSet) -> str:
    if dataset and "tokens" in dataset:
        tok, sup = dataset["tokens"], dataset["supervised_tokens"]
        return (
            f"{len(tok)} samples, tokens per sample {min(tok)}-{max(tok)} (mean {statistics.mean(tok):.0f}), "
            f"supervised {min(sup)}-{max(sup)} (mean {statistics.mean(sup):.0f}), as encoded by the qwen3_vl template"
        )
    planned = data.planned_tokens
    return f"{len(planned)} samples, planned tokens per sample {min(planned)}-{max(planned)} (template not checked)"


if __name__ == "__main__":
    sys.exit(main())
