"""DeepSpeed ZeRO-2 / ZeRO-3 on the CPU (gloo, 2 ranks under torchrun) give the numbers of unsharded training.

Each run is a real ``NPROC_PER_NODE=2 anchorkd train`` of the shipped stage-2 GKD demo config (base-anchor
teacher, fused loss) on the tiny model, per-device batch 2, in its own processes; the helpers and the
comparison (every logged term of every step, then every adapter tensor, relative 1e-5) are those of
``test_data_parallel``. References: the same two ranks without an engine (DDP over gloo), and one process
with batch 4 on the same samples.

``zero3_head_worker.py`` checks the gather the fused loss relies on where the LM head itself trains (a full
fine-tune), with a head of its own and with one tied to the input embedding: a 2-rank
``deepspeed.initialize`` on a small module, against one process on an unsharded copy.

DeepSpeed is an optional dependency; ``scripts/setup.sh`` installs it, so these run in CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_parallel import (
    DISTINCT_STUDENT,
    STEPS,
    assert_same_run,
    free_port,
    overrides,
    step_records,
    two_ranks,
)

from anchorkd.trainers.pipeline import run_training

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (pip install 'anchorkd[deepspeed]'; scripts/setup.sh installs it)",
    ),
]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "stage_2_llm_lora_gkd.yaml"
HEAD_WORKER = Path(__file__).with_name("zero3_head_worker.py")
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def runs(demo_workdir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded-engines")
    engines = {"ddp": (), "zero3": ("training.deepspeed=zero3",), "zero2": ("training.deepspeed=zero2",)}
    for name, extra in engines.items():
        two_ranks(demo_workdir, CONFIG, overrides(root / name, batch=2, extra=(*extra, *DISTINCT_STUDENT)))
    cwd = os.getcwd()
    os.chdir(demo_workdir)
    try:
        run_training(CONFIG, overrides(root / "one_process", batch=4, extra=DISTINCT_STUDENT))
    finally:
        os.chdir(cwd)
    return {name: root / name for name in (*engines, "one_process")}


def test_zero3_matches_unsharded_ddp(runs):
    assert (
        step_records(runs["zero3"])[0]["llm_kd_loss"] > 0.01
    )  # far above its rounding noise (see DISTINCT_STUDENT)
    assert_same_run(runs["zero3"], runs["ddp"])


def test_zero3_matches_one_process_with_the_whole_batch(runs):
    assert_same_run(runs["zero3"], runs["one_process"])


def test_zero2_matches_unsharded_ddp(runs):
    assert_same_run(runs["zero2"], runs["ddp"])


def test_the_runs_really_used_their_engines(runs):
    """ms-swift records the engine config it resolved; the unsharded runs have none."""
    stages = {}
    for name, run in runs.items():
        args = json.loads((run / "args.json").read_text())
        deepspeed = args.get("deepspeed") or {}
        stages[name] = deepspeed.get("zero_optimization", {}).get("stage")
        assert args.get("fp16") is False, f"{name}: fp16 must be off on the CPU"
    assert stages == {"ddp": None, "zero3": 3, "zero2": 2, "one_process": None}
    # ZeRO-3 writes its partitioned optimizer/parameter state per rank; the others do not.
    assert list((runs["zero3"] / f"checkpoint-{STEPS}").glob("global_step*/*zero_pp_rank_1*"))
    assert not list((runs["ddp"] / f"checkpoint-{STEPS}").glob("global_step*"))


@pytest.fixture(scope="module")
def head_worker(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zero3-head") / "head.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(HEAD_WORKER),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    return result


@pytest.mark.parametrize(
    ("case", "trained"),
    [
        ("own_head", {"body.weight", "body.bias", "lm_head.weight"}),
        # Tied to the input embedding: the head's gradient adds to the embedding's (one parameter).
        ("tied_head", {"embed.weight", "body.weight", "body.bias"}),
    ],
)
def test_zero3_gather_gives_a_training_lm_head_its_unsharded_gradient(head_worker, case, trained):
    result = head_worker[case]
    assert result["partitioned"] is True  # the heads held no weights outside the gather
    assert result["tokens"] == 24 + 19  # supervised tokens over both ranks (the ranks differ)
    assert result["loss"] == pytest.approx(result["reference_loss"], rel=RELATIVE)
    assert set(result["grad_rel"]) == trained
    for name, rel in result["grad_rel"].items():
        assert rel <= RELATIVE, f"{name}: gradient relative difference {rel:.2e}"
    for name, rel in result["step_rel"].items():  # the SGD step applied it to the partitions
        assert result["moved"][name] > 10 * RELATIVE  # a step that did nothing would be seen
        assert rel <= RELATIVE, f"{name}: weights after the step, relative difference {rel:.2e}"
