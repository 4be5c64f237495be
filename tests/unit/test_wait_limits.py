"""``anchorkd.waits``: every wait anchorkd writes ends, with what it waited for or with an error naming what was
awaited and where the writer's log is. The writers and ranks here are real processes where it matters (a
writer that is killed, a rank that never joins an all-reduce); limits are short, margins generous, and no
test asserts a duration."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from anchorkd import waits
from anchorkd.config import ConfigLoader
from anchorkd.errors import ConfigError
from anchorkd.trainers import teacher_targets as tt
from anchorkd.waits import WaitLimitExceeded, WriterHeartbeat

# Long enough never to be what ends a test on a loaded 2-core machine, unless a test means it to.
GENEROUS_S = 300.0
SPAWN = multiprocessing.get_context("spawn")


def seq_kd_config(tmp_path: Path, tiny_model_dir: Path, synthetic_data_dir: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((synthetic_data_dir / "train.jsonl").read_text().splitlines()[:2]) + "\n")
    config = {
        "model": {"model": str(tiny_model_dir), "model_type": "qwen3_vl", "torch_dtype": "float32"},
        "data": {"dataset": [str(data)]},
        "template": {"max_pixels": 16384},
        "tuner": {"tuner_type": "lora"},
        "training": {"output_dir": str(tmp_path / "runs" / "run")},
        "rlhf": {"rlhf_type": "gkd", "teacher_model": str(tiny_model_dir), "lmbda": 0.0, "seq_kd": True},
        "custom": {"trainer_variant": "gkd_monitor"},
    }
    path = tmp_path / "seq_kd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def writer_rank_that_hangs_in_generation(config_path: str, log_path: str, generating) -> None:
    """Rank 0 of a seq_kd run whose teacher never finishes its first batch (run in its own process)."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)  # this rank's log is a file, as under `torchrun --log-dir`

    def generate_forever(*args, **kwargs):
        generating.set()
        time.sleep(3600)

    tt.load_model = lambda *args, **kwargs: object()
    tt.generate_responses = generate_forever
    tt.with_teacher_targets(ConfigLoader.resolve(config_path), writer=True)


def test_a_killed_writer_stops_the_waiting_rank_with_an_error_naming_the_files_and_its_log(
    tmp_path, tiny_model_dir, synthetic_data_dir, monkeypatch
):
    config_path = seq_kd_config(tmp_path, tiny_model_dir, synthetic_data_dir)
    monkeypatch.setenv(waits.WRITER_SILENCE_ENV, "2")  # the writer inherits it: it beats every 0.2 s
    monkeypatch.setenv(waits.WAIT_LIMIT_ENV, str(GENEROUS_S))
    writer_log = tmp_path / "rank0.log"
    generating = SPAWN.Event()
    writer = SPAWN.Process(
        target=writer_rank_that_hangs_in_generation, args=(str(config_path), str(writer_log), generating)
    )
    writer.start()
    try:
        assert generating.wait(GENEROUS_S), "the writer never reached generation"
        config = ConfigLoader.resolve(config_path)
        killer = threading.Timer(1.0, writer.kill)  # SIGKILL while this rank waits: nothing cleans up
        killer.start()
        with pytest.raises(WaitLimitExceeded) as raised:
            tt.with_teacher_targets(config, writer=False)
        killer.join()
    finally:
        writer.kill()
        writer.join(GENEROUS_S)
    message = str(raised.value)
    job = tt.TargetJob.from_config(config)
    awaited = tt.target_file(job, job.sources[0], tt.teacher_fingerprint(job.teacher, job.cache_dir))
    assert "rank 0's teacher answers" in message and str(awaited) in message
    assert f"pid {writer.pid}" in message and "no sign of life for 2 s (ANCHORKD_WRITER_SILENCE_S)" in message
    assert f"The writer's log: {writer_log}." in message
    assert not awaited.exists() and writer.exitcode == -9


def _files(tmp_path: Path) -> list[Path]:
    return [tmp_path / "out" / "a.jsonl", tmp_path / "out" / "b.jsonl"]


def _run_writer(heartbeat: Path, body) -> threading.Thread:
    def write():
        with contextlib.suppress(RuntimeError), WriterHeartbeat(heartbeat, "two files", interval_s=0.05):
            body()  # a RuntimeError passes through the heartbeat (which ends) and stops here

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_a_writer_that_finishes_lets_the_waiting_rank_go_on(tmp_path):
    heartbeat, files = tmp_path / "writers" / "job.json", _files(tmp_path)

    def write_files():
        time.sleep(0.3)
        for path in files:
            path.parent.mkdir(exist_ok=True)
            path.write_text("{}\n")

    thread = _run_writer(heartbeat, write_files)
    waits.wait_for_files(files, what="two files", heartbeat=heartbeat, poll_s=0.02)
    thread.join()
    assert all(path.is_file() for path in files) and not heartbeat.exists()


def test_a_writer_that_fails_stops_the_waiting_rank_without_its_limits(tmp_path):
    heartbeat, files = tmp_path / "writers" / "job.json", _files(tmp_path)

    def fail():
        time.sleep(0.3)
        raise RuntimeError("the teacher did not load")

    thread = _run_writer(heartbeat, fail)
    with pytest.raises(WaitLimitExceeded, match="its writer stopped without writing them") as raised:
        waits.wait_for_files(
            files,
            what="two files",
            heartbeat=heartbeat,
            poll_s=0.02,
            limit_s=GENEROUS_S,
            silence_s=GENEROUS_S,
        )
    thread.join()
    assert f"pid {os.getpid()}" in str(raised.value) and str(files[0]) in str(raised.value)


def test_a_dead_writers_leftover_heartbeat_is_no_sign_of_life(tmp_path):
    heartbeat, files = tmp_path / "writers" / "job.json", _files(tmp_path)
    heartbeat.parent.mkdir()
    leftover = {"writer": "rank 0, pid 4242 on node-a", "log": "/logs/rank0.log", "beat": 7}
    heartbeat.write_text(json.dumps(leftover))
    with pytest.raises(WaitLimitExceeded) as raised:
        waits.wait_for_files(
            files, what="two files", heartbeat=heartbeat, poll_s=0.02, limit_s=GENEROUS_S, silence_s=0.5
        )
    message = str(raised.value)
    assert "its writer (rank 0, pid 4242 on node-a) has given no sign of life" in message
    assert "The writer's log: /logs/rank0.log." in message


def test_without_a_writer_the_wait_ends_naming_a_file_system_the_ranks_may_not_share(tmp_path):
    files = _files(tmp_path)
    with pytest.raises(WaitLimitExceeded) as raised:
        waits.wait_for_files(
            files,
            what="two files",
            heartbeat=tmp_path / "writers" / "job.json",
            hint="Run the writer first.",
            poll_s=0.02,
            limit_s=GENEROUS_S,
            silence_s=0.5,
        )
    message = str(raised.value)
    assert "no writer has given a sign of life" in message and "does not share its file system" in message
    assert "Missing: " + ", ".join(str(p) for p in files) in message and message.endswith(
        "Run the writer first."
    )


def test_a_living_writer_is_waited_for_up_to_the_overall_limit(tmp_path):
    heartbeat, files = tmp_path / "writers" / "job.json", _files(tmp_path)
    finish = threading.Event()
    thread = _run_writer(heartbeat, lambda: finish.wait(GENEROUS_S))
    try:
        with pytest.raises(WaitLimitExceeded, match=r"reached its limit of 1 s \(ANCHORKD_WAIT_LIMIT_S\)"):
            waits.wait_for_files(
                files, what="two files", heartbeat=heartbeat, poll_s=0.02, limit_s=1.0, silence_s=GENEROUS_S
            )
    finally:
        finish.set()
        thread.join()


@pytest.mark.parametrize(
    "variable", [waits.WAIT_LIMIT_ENV, waits.WRITER_SILENCE_ENV, waits.COLLECTIVE_LIMIT_ENV]
)
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "an hour"])
def test_a_limit_that_is_no_number_of_seconds_is_refused_naming_its_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        waits.check_limits()
    assert raised.value.key_path == variable and repr(value) in str(raised.value)


def test_limits_have_defaults_and_read_the_environment(monkeypatch):
    for variable in (waits.WAIT_LIMIT_ENV, waits.WRITER_SILENCE_ENV, waits.COLLECTIVE_LIMIT_ENV):
        monkeypatch.delenv(variable, raising=False)
    assert (waits.wait_limit_s(), waits.writer_silence_s(), waits.collective_limit_s()) == (
        86400.0,
        600.0,
        3600.0,
    )
    monkeypatch.setenv(waits.COLLECTIVE_LIMIT_ENV, "2.5")
    assert waits.collective_limit_s() == 2.5


def test_the_log_of_a_process_writing_to_a_file_is_that_file(tmp_path):
    """Run in a child whose stderr is a file (pytest captures this process's own)."""
    import subprocess
    import sys

    log = tmp_path / "rank.log"
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", "from anchorkd.waits import where_this_process_logs as w; print(w())"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=GENEROUS_S,
        )
    assert done.stdout.strip() == str(log)


# --- anchorkd's own all-reduce ------------------------------------------------------------------------------


def rank_of_two(rank: int, port: int, results, skip_second_reduce) -> None:
    """One of two gloo ranks: both sum token counts once; rank 1 then never joins the second sum."""
    import torch.distributed as dist

    from anchorkd.trainers.sharding import global_window_tokens

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results.put((rank, "first", global_window_tokens([rank + 1, 10])))
    if rank == 1:
        skip_second_reduce.wait(GENEROUS_S)  # alive, but elsewhere: a rank that hangs
        return
    try:
        global_window_tokens([1, 1])
        results.put((rank, "second", "returned"))
    except WaitLimitExceeded as error:
        results.put((rank, "second", str(error)))


def test_an_all_reduce_a_rank_never_joins_ends_at_the_limit_naming_it(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv(waits.COLLECTIVE_LIMIT_ENV, "2")
    results, rank_1_released = SPAWN.Queue(), SPAWN.Event()
    ranks = [SPAWN.Process(target=rank_of_two, args=(r, port, results, rank_1_released)) for r in (0, 1)]
    for process in ranks:
        process.start()
    try:
        got = [results.get(timeout=GENEROUS_S) for _ in range(3)]
    finally:
        rank_1_released.set()
        for process in ranks:
            process.kill()
            process.join(GENEROUS_S)
    by_key = {(rank, step): value for rank, step, value in got}
    assert by_key[(0, "first")] == by_key[(1, "first")] == [3, 20]
    message = by_key[(0, "second")]
    assert message.startswith("rank 0 waited 2 s (ANCHORKD_COLLECTIVE_LIMIT_S) for the other ranks to join")
    assert "the accumulation window's token counts (an all-reduce over 2 ranks)" in message
