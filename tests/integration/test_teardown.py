"""A finished multi-rank run exits 0: 20 short 2-rank gloo runs end as ``anchorkd train`` ends a torchrun worker.

The abort this guards against (SIGABRT, "terminate called without an active exception", seen once in CI after
a 2-rank run had finished) came from the process group outliving the interpreter: the run's DDP wrapper sits
in reference cycles, so it and the Gloo group it holds were freed only during interpreter finalisation, where a
Gloo worker thread that needs the GIL is ended by a forced unwind through a ``noexcept`` frame. The abort
itself is rare, so the test checks its cause, which is deterministic (no DDP wrapper alive once the group is
released), and repeats the teardown 20 times for the exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_parallel import free_port

pytestmark = pytest.mark.integration
WORKER = Path(__file__).with_name("teardown_worker.py")
RUNS = 20


def start_rank(rank: int, port: int, out: Path) -> subprocess.Popen:
    """One rank with the environment torchrun gives it (the launcher itself would only add its own start-up)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": "2",
    }
    command = [sys.executable, str(WORKER), str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_rank_teardown_releases_the_group_and_exits_cleanly(tmp_path):
    for attempt in range(RUNS):
        out = tmp_path / f"run{attempt}"
        out.mkdir()
        port = free_port()
        ranks = [start_rank(rank, port, out) for rank in (0, 1)]
        for rank, process in enumerate(ranks):
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, (
                attempt,
                rank,
                process.returncode,
                stdout[-2000:],
                stderr[-4000:],
            )
            assert "terminate called" not in stderr, (attempt, rank, stderr[-4000:])
            report = json.loads((out / f"rank{rank}.json").read_text())
            assert report == {"released": True, "wrappers_alive": 0}, (attempt, rank, report)
