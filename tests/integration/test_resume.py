"""A resumed run continues the same run: the straight run's numbers, one history, the newest complete checkpoint.

- For SFT, GKD (forward-only and on-policy), GKD with visual KD and GKD with anchor prompts: a straight run (checkpoints every 3
  steps) is copied and the copy resumed from its ``checkpoint-3``. The resume trims the copy's later
  records and moves its later checkpoints aside, then redoes the steps: every logged term of every step,
  the alerts and the final adapter weights equal the straight run's (relative 1e-5).
- A ``python -m anchorkd.cli train`` process killed (SIGKILL) after a checkpoint, while later steps run,
  then ``resume_from_checkpoint: auto`` with ms-swift's ``add_version`` on: the run goes on in its own
  folder from its newest complete checkpoint (a half-written one is never picked) and ends with one clean
  history equal to the straight run's.

Runs are tiny (tiny model, short captions, batch 2); the six samples make 3 steps per epoch, so every
resume after step 3 crosses an epoch (the case ms-swift's GKD sampler got wrong).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gkd_harness as h
import pytest
from safetensors.torch import load_file

import anchorkd
from anchorkd.checkpoints import is_complete_checkpoint, list_checkpoints, newest_complete_checkpoint
from anchorkd.trainers.resume import SUPERSEDED_DIR

pytestmark = pytest.mark.integration

SAVE_EVERY = 3
# Thresholds low enough that the tiny model's rising KD term fires spike alerts after the resume point,
# so the alert history depends on the monitor state carried over the restart.
TIGHT_MONITOR = (
    "custom.monitor.kd_spike_factor=1.5",
    "custom.monitor.kd_spike_min_history=2",
    "custom.monitor.kd_spike_min_threshold=0.0",
)
MODES = {
    "sft": (h.CONFIGS_DIR / "demo" / "stage_2_llm_lora.yaml", 6, ()),
    "gkd": (h.STAGE2_GKD_DEMO, 8, TIGHT_MONITOR),
    "gkd_on_policy": (h.STAGE2_GKD_DEMO, 6, ("rlhf.lmbda=0.5", "rlhf.max_completion_length=8")),
    "gkd_visual_kd": (h.CONFIGS_DIR / "demo" / "stage_3_visual_kd.yaml", 6, ()),
    # ms-swift's own GKD trainer (custom.trainer_variant: default), which has the same sampler fault
    "gkd_stock": (h.STAGE2_GKD_DEMO, 6, ("custom.trainer_variant=default", "rlhf.llm_kd_weight=1.0")),
    # KD-only anchor prompts without answers (the teacher writes them once): the resumed run must draw the
    # straight run's anchor rows for every later buffer
    "gkd_anchor": (h.STAGE2_GKD_DEMO, 6, ("custom.anchor.ratio=0.5", "rlhf.max_completion_length=8")),
}
# Per-process timings and memory: not part of the run's numbers.
NOT_COMPARED = {"elapsed_time", "remaining_time", "train_speed(s/it)", "memory(GiB)", "percentage"}
TERMS = {
    "sft": {"loss", "grad_norm", "learning_rate", "token_acc", "epoch"},
    "gkd": {"loss", "sft_loss", "llm_kd_loss", "token_accuracy", "token_count", "grad_norm", "learning_rate"},
}
TERMS["gkd_visual_kd"] = TERMS["gkd"] | {"vision_kd_loss"}
TERMS["gkd_on_policy"] = TERMS["gkd"]
TERMS["gkd_stock"] = {"loss", "grad_norm", "learning_rate"}
TERMS["gkd_anchor"] = TERMS["gkd"] | {"anchor_kd_loss"}


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


def mode_overrides(env, mode: str, name: str, extra=()) -> list[str]:
    _, steps, mode_extra = MODES[mode]
    if mode == "gkd_anchor":
        anchors = env.data_dir / "anchor.jsonl"
        mode_extra = (
            *mode_extra,
            f"custom.anchor.dataset=[{anchors}]",
            f"custom.teacher_targets.cache_dir={env.work / 'resume-anchor-targets'}",
        )
    base = (f"training.save_steps={SAVE_EVERY}", "training.save_total_limit=10", "template.max_length=256")
    return env.overrides(name, steps=steps, batch=2, extra=(*base, *mode_extra, *extra))


_STRAIGHT: dict[str, Path] = {}


def straight_run(env, mode: str) -> Path:
    """The uninterrupted run of ``mode`` (once per session)."""
    if mode not in _STRAIGHT:
        config, steps, _ = MODES[mode]
        summary = h.run_training(config, mode_overrides(env, mode, f"resume-{mode}-straight"))
        assert summary["global_step"] == steps
        _STRAIGHT[mode] = Path(summary["output_dir"])
    return _STRAIGHT[mode]


def history(run_dir: Path) -> list[dict]:
    """The per-step training records, checked to be steps 1, 2, ... once each, without a torn line."""
    records = h.step_records(run_dir / "logging.jsonl")
    steps = [int(r["global_step/max_steps"].split("/")[0]) for r in records]
    assert steps == list(range(1, len(steps) + 1)), steps
    return records


def assert_same_history(actual: list[dict], expected: list[dict], terms: set[str]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        assert terms <= want.keys(), terms - want.keys()
        for key, value in want.items():
            if key in NOT_COMPARED:
                continue
            if isinstance(value, float):
                # logging.jsonl rounds to 8 decimals: a term near 1e-8 differs in that digit at most.
                assert got[key] == pytest.approx(value, rel=1e-5, abs=2e-8), (
                    want["global_step/max_steps"],
                    key,
                )
            else:
                assert got[key] == value, (want["global_step/max_steps"], key)


def end_summaries(run_dir: Path) -> list[dict]:
    return [r for r in h.read_jsonl(run_dir / "logging.jsonl") if "train_runtime" in r or "log_history" in r]


def alerts(run_dir: Path) -> list[tuple]:
    path = run_dir / "alerts.jsonl"
    records = h.read_jsonl(path) if path.is_file() else []
    return [(a["step"], a["rule"], a["metric"], pytest.approx(a["value"], rel=1e-5)) for a in records]


def assert_same_adapter(actual: Path, expected: Path) -> None:
    got, want = (
        load_file(actual / "adapter_model.safetensors"),
        load_file(expected / "adapter_model.safetensors"),
    )
    assert got.keys() == want.keys()
    moved = 0
    for name, tensor in want.items():
        scale = float(tensor.abs().max())
        assert float((got[name] - tensor).abs().max()) <= 1e-5 * max(scale, 1e-12), name
        moved += bool("lora_B" in name and scale > 0)
    assert moved, "training must have moved the adapter"


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_from_checkpoint_3_equals_the_straight_run(env, mode):
    straight = straight_run(env, mode)
    config, steps, _ = MODES[mode]
    resumed = env.work / f"resume-{mode}-resumed"
    shutil.copytree(straight, resumed, symlinks=True)  # the run went on after checkpoint-3, then stopped
    checkpoint = resumed / f"checkpoint-{SAVE_EVERY}"

    summary = h.run_training(
        config,
        mode_overrides(env, mode, resumed.name, extra=[f"training.resume_from_checkpoint={checkpoint}"]),
    )

    assert Path(summary["output_dir"]) == resumed and summary["global_step"] == steps
    assert_same_history(history(resumed), history(straight), TERMS[mode])
    assert len(end_summaries(resumed)) == 2  # one end-of-training pair: the resumed run's own
    assert alerts(resumed) == alerts(straight)
    if mode == "gkd":
        assert any(a[0] > SAVE_EVERY for a in alerts(straight)), "the tight monitor must fire after step 3"
    final = f"checkpoint-{steps}"
    assert [p.name for p in list_checkpoints(resumed)] == [
        f"checkpoint-{s}" for s in range(SAVE_EVERY, steps + 1, SAVE_EVERY)
    ] + ([final] if steps % SAVE_EVERY else [])
    assert (resumed / SUPERSEDED_DIR / f"checkpoint-{2 * SAVE_EVERY}").is_dir()  # the straight run's, kept
    assert_same_adapter(resumed / final, straight / final)
    if mode == "gkd":
        assert_report_shows_every_step(resumed, steps)


def assert_report_shows_every_step(run_dir: Path, steps: int) -> None:
    from anchorkd.monitor.report import make_telemetry_report

    report = make_telemetry_report(run_dir)
    assert (report["last_step"], report["max_steps"], report["other_logs"]) == (steps, steps, [])
    markdown = (run_dir / "telemetry_report.md").read_text()
    assert f"- records: {steps} train, 0 eval; last step {steps}/{steps}" in markdown


def logged_steps(log: Path) -> list[int]:
    """Steps of the complete training records of a log a kill may have cut in the middle of a line."""
    steps = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record and "train_runtime" not in record:
            steps.append(int(record["global_step/max_steps"].split("/")[0]))
    return steps


KILL_POINT_WORKER = Path(__file__).with_name("kill_point_worker.py")
HELD_AFTER_STEP = SAVE_EVERY + 1  # checkpoint-3 complete, step 4 logged, steps 5.. not yet run
# Generous: the child loads ms-swift and the tiny model and trains 4 steps, on a loaded 2-core machine.
HOLD_LIMIT_S = 900.0


def wait_until_held(process: subprocess.Popen, marker: Path) -> None:
    """Wait (at most ``HOLD_LIMIT_S``) for the child to reach its hold; fail at once if it exits instead."""
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not marker.is_file():
        assert process.poll() is None, "the run ended before it reached the kill point"
        assert time.monotonic() < deadline, (
            f"the run did not reach step {HELD_AFTER_STEP} in {HOLD_LIMIT_S:.0f} s"
        )
        time.sleep(0.2)


def test_sigkill_then_auto_resume_gives_one_clean_history(env):
    mode = "gkd"
    config, steps, _ = MODES[mode]
    straight = straight_run(env, mode)
    root = env.work / "resume-gkd-killed"
    overrides = mode_overrides(env, mode, root.name, extra=["training.add_version=true"])
    marker = env.work / "resume-gkd-killed.held"
    command = [sys.executable, str(KILL_POINT_WORKER), str(marker), str(HELD_AFTER_STEP)]
    command += ["--config", str(config), *overrides]
    source_root = str(Path(anchorkd.__file__).resolve().parents[1])  # this checkout's package first
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")])),
    }
    output = env.work / "resume-gkd-killed.log"
    with output.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env)
        try:
            wait_until_held(process, marker)
            process.send_signal(signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, output.read_text()[-3000:]
    (run_dir,) = root.glob("v*-*")
    assert newest_complete_checkpoint(run_dir).name == f"checkpoint-{SAVE_EVERY}"
    assert max(logged_steps(run_dir / "logging.jsonl")) == HELD_AFTER_STEP < steps

    # A save cut short after the weights, newer than every complete one: a kill during a save leaves this.
    newest = newest_complete_checkpoint(run_dir)
    half = run_dir / f"checkpoint-{int(newest.name.rpartition('-')[2]) + 1}"
    half.mkdir()
    shutil.copy(newest / "adapter_model.safetensors", half)
    incomplete = sorted(p.name for p in list_checkpoints(run_dir) if not is_complete_checkpoint(p))
    assert half.name in incomplete

    summary = h.run_training(config, [*overrides, "training.resume_from_checkpoint=auto"])

    assert Path(summary["output_dir"]) == run_dir and summary["global_step"] == steps
    assert [p.name for p in root.iterdir()] == [run_dir.name], "the resume must not start a new v<N> folder"
    assert sorted(p.name for p in (run_dir / SUPERSEDED_DIR).iterdir()) == incomplete
    assert_same_history(history(run_dir), history(straight), TERMS[mode])
    assert len(end_summaries(run_dir)) == 2
    assert alerts(run_dir) == alerts(straight)
    assert_same_adapter(run_dir / f"checkpoint-{steps}", straight / f"checkpoint-{steps}")
