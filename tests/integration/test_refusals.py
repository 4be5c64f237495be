"""Refusals through the real command line under several processes: said once, exit status 2, no torchrun
traceback, nothing written. Cheap: every run here stops in the checks, before a model loads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
DEMO_GKD = Path(__file__).resolve().parents[2] / "configs" / "demo" / "stage_2_llm_lora_gkd.yaml"
# The checks import ms-swift and read the tiny model's tokenizer: well under a minute, even on a loaded machine.
LIMIT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(workdir: Path, command: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run(
        command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=LIMIT_S
    )


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("training.optim=adamw_bogus", "training.optim (in (command line)): unknown value 'adamw_bogus'"),
        # 2 rows per generation buffer fit one process's batch of 2 but not two processes' global batch of 4:
        # the launching process checks the run its ranks will make.
        (
            "rlhf.generation_batch_size=2",
            "rlhf.generation_batch_size (in (command line)): 2 is not a multiple of the global batch "
            "(training.per_device_train_batch_size 2 x 2 process(es) = 4)",
        ),
    ],
)
def test_a_refusal_under_nproc_per_node_is_said_once_before_any_rank_starts(
    demo_workdir, tmp_path, override, said
):
    out = tmp_path / "run"
    result = run(
        demo_workdir,
        [
            sys.executable,
            "-m",
            "anchorkd.cli",
            "train",
            "--config",
            str(DEMO_GKD),
            f"training.output_dir={out}",
        ]
        + ["training.per_device_train_batch_size=2", override],
        NPROC_PER_NODE="2",
        MASTER_PORT=str(free_port()),
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("anchorkd: error:")]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert len(errors) == 1 and errors[0].startswith(f"anchorkd: error: {said}"), errors
    assert "anchorkd: launching" not in result.stdout  # torchrun never started
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_under_torchrun_itself_only_rank_0_says_the_refusal(demo_workdir, tmp_path):
    """Started by torchrun directly (no relaunch to check first), every rank runs the checks; rank 0 says
    what is wrong, the other ranks exit 2 without repeating it."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_port", str(free_port()), "-m", "anchorkd.cli"]
    result = run(
        demo_workdir,
        [
            *torchrun,
            "train",
            "--config",
            str(DEMO_GKD),
            f"training.output_dir={out}",
            "training.adam_beta1=1",
        ],
    )
    errors = [line for line in result.stderr.splitlines() if "anchorkd: error:" in line]
    assert result.returncode != 0
    assert len(errors) == 1, result.stderr[-4000:]
    assert errors[0].endswith("training.adam_beta1 (in (command line)): must be in [0, 1), got 1.0")
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_only_ms_swift_makes_comes_before_the_teacher_answers_anchor_prompts(
    demo_workdir, tmp_path
):
    """``rlhf.gkd_logits_topk: 0`` is refused by ms-swift's argument classes, not by an anchorkd rule. For a run
    whose teacher first answers the anchor prompts, ``train`` builds ms-swift's arguments before the teacher
    loads: the refusal names the key, and no teacher-answer cache and no run folder are written."""
    out, cache = tmp_path / "run", tmp_path / "answers"
    config = DEMO_GKD.with_name("anchor_prompts.yaml")
    anchors = Path(demo_workdir) / "outputs" / "demo" / "data" / "anchor.jsonl"  # prompt-only rows
    result = run(
        demo_workdir,
        [sys.executable, "-m", "anchorkd.cli", "train", str(config), f"training.output_dir={out}"]
        + [f"custom.anchor.dataset=[{anchors}]", f"custom.teacher_targets.cache_dir={cache}"]
        + ["rlhf.gkd_logits_topk=0"],
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "rlhf.gkd_logits_topk" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not cache.exists()
