"""Limits on the waits anchorkd writes itself: ranks waiting for another rank's files, and its collectives.

Every such wait ends, either with what it waited for or with :class:`WaitLimitExceeded`, whose message
names what was awaited and where the log of the process that should have delivered it is. The limits are
seconds, read from the environment when a wait starts (torchrun gives every rank the same environment):

=============================  =======  ===================================================================
``ANCHORKD_WAIT_LIMIT_S``        86400  the longest a rank waits for another rank's files (the teacher's
                                        answers that rank 0 writes), in all
``ANCHORKD_WRITER_SILENCE_S``      600  the longest it waits without a sign of life from that writer
``ANCHORKD_COLLECTIVE_LIMIT_S``   3600  the longest anchorkd's own all-reduce waits for the other ranks
=============================  =======  ===================================================================

A writer shows it is alive with a heartbeat file (:class:`WriterHeartbeat`) that it rewrites every few
seconds while it works and removes when it stops. A waiter therefore stops soon after the writer dies,
however long a living writer may take; a heartbeat that vanishes before the files appear means the writer
stopped with an error (in its log). The waiter judges the heartbeat by its content changing, not by
clocks, so ranks on machines with different clocks agree.

ms-swift's own collectives are bounded by the process group's timeout, ``training.ddp_timeout`` (ms-swift's
default is 18000000 s); under torchrun a rank that dies stops every other rank anyway.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anchorkd.errors import ConfigError
from anchorkd.io import atomic_write_json

logger = logging.getLogger("anchorkd")

WAIT_LIMIT_ENV = "ANCHORKD_WAIT_LIMIT_S"
WRITER_SILENCE_ENV = "ANCHORKD_WRITER_SILENCE_S"
COLLECTIVE_LIMIT_ENV = "ANCHORKD_COLLECTIVE_LIMIT_S"
DEFAULT_WAIT_LIMIT_S = 24 * 3600.0
# Long enough for a loaded machine or a network file system's attribute cache (up to a minute) to delay
# a heartbeat many times over; short enough that a dead writer is noticed within minutes, not hours.
DEFAULT_WRITER_SILENCE_S = 600.0
# Ranks reach anchorkd's all-reduce at the start of each generation buffer; one may arrive later by a
# checkpoint save or a long on-policy sample, never by an hour.
DEFAULT_COLLECTIVE_LIMIT_S = 3600.0

# How often a writer rewrites its heartbeat, as a share of the silence limit (and at most every 10 s).
_BEATS_PER_SILENCE = 10
_MAX_BEAT_S = 10.0
_LOG_EVERY_S = 60.0


class WaitLimitExceeded(TimeoutError):
    """A wait ran past its limit, or the process it waited for stopped; the message says what and where."""


def _limit(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(name, f"must be a number of seconds above 0, got {raw!r}")
    return value


def wait_limit_s() -> float:
    return _limit(WAIT_LIMIT_ENV, DEFAULT_WAIT_LIMIT_S)


def writer_silence_s() -> float:
    return _limit(WRITER_SILENCE_ENV, DEFAULT_WRITER_SILENCE_S)


def collective_limit_s() -> float:
    return _limit(COLLECTIVE_LIMIT_ENV, DEFAULT_COLLECTIVE_LIMIT_S)


def check_limits() -> None:
    """Read every limit, so that a bad value is refused before anything loads rather than mid-run."""
    wait_limit_s()
    writer_silence_s()
    collective_limit_s()


def _rank() -> str:
    return os.environ.get("RANK", "0")


def where_this_process_logs() -> str:
    """Where this process's log (its stderr) goes: a file's path when it is redirected to one, else a
    description a user can act on."""
    try:
        target = os.readlink("/proc/self/fd/2")  # Linux; a terminal, a pipe or a file
    except OSError:
        target = ""
    if target.startswith("/") and Path(target).is_file():
        return target
    return (
        f"the console output of rank {_rank()} (pid {os.getpid()} on {socket.gethostname()}): the terminal "
        "or log of the command that started the run"
    )


# --- a writer's heartbeat -----------------------------------------------------------------------------


class WriterHeartbeat:
    """While the block runs, rewrite ``path`` every few seconds with who writes ``what`` and where its log
    is, so that ranks waiting for its files can tell a slow writer from a dead one. The file is removed
    when the block ends, whether the files were written or an error stopped the writer."""

    def __init__(self, path: Path, what: str, *, interval_s: float | None = None) -> None:
        self.path = Path(path)
        self.what = what
        self.interval_s = interval_s or min(writer_silence_s() / _BEATS_PER_SILENCE, _MAX_BEAT_S)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0
        self._identity = {
            "writer": f"rank {_rank()}, pid {os.getpid()} on {socket.gethostname()}",
            "log": where_this_process_logs(),
            "writes": what,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _beat(self) -> None:
        self._beats += 1
        try:
            atomic_write_json(self.path, {**self._identity, "beat": self._beats})
        except OSError as error:  # the waiters then time out, naming this writer's log: say why there
            if self._beats == 1 or self._beats % 100 == 0:
                logger.warning("cannot write the heartbeat %s: %s", self.path, error)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def __enter__(self) -> WriterHeartbeat:
        self._beat()  # before the block: a waiter sees a writer from the start
        self._thread = threading.Thread(target=self._run, name="anchorkd-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)


def _read_heartbeat(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent (written atomically, so never half there)
        return None
    return document if isinstance(document, dict) else None


# --- waiting for files ----------------------------------------------------------------------------------


def wait_for_files(
    paths: Sequence[Path],
    *,
    what: str,
    heartbeat: Path | None = None,
    hint: str = "",
    poll_s: float = 2.0,
    limit_s: float | None = None,
    silence_s: float | None = None,
) -> None:
    """Block until every path exists (each written atomically, so existing means complete).

    ``heartbeat`` is the writer's :class:`WriterHeartbeat` file. Raises :class:`WaitLimitExceeded` when the
    writer has given no sign of life for ``silence_s`` (``ANCHORKD_WRITER_SILENCE_S``), when its heartbeat
    vanishes without the files (it stopped), or after ``limit_s`` in all (``ANCHORKD_WAIT_LIMIT_S``); the
    message names ``what`` was awaited, the missing files, the writer's log, and ``hint``.
    """
    limit = wait_limit_s() if limit_s is None else limit_s
    silence = writer_silence_s() if silence_s is None else silence_s
    paths = [Path(p) for p in paths]
    started = last_sign = last_log = time.monotonic()
    # What the heartbeat holds now may be a dead writer's leftover: only a change is a sign of life.
    beat = _read_heartbeat(heartbeat)
    writer = beat
    while True:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return
        now = time.monotonic()
        previous, beat = beat, _read_heartbeat(heartbeat)
        if beat is not None and beat != previous:
            last_sign, writer = now, beat
        elif beat is None and previous is not None:
            # The writer wrote its files before removing its heartbeat: look again before judging.
            missing = [p for p in paths if not p.is_file()]
            if not missing:
                return
            raise _exceeded(
                what, missing, writer, hint, now - started, "its writer stopped without writing them"
            )
        if now - last_sign >= silence:
            reason = (
                f"its writer ({writer['writer']}) has given no sign of life for {silence:.0f} s "
                f"({WRITER_SILENCE_ENV}): it died or hangs"
                if writer is not None
                else f"no writer has given a sign of life in {silence:.0f} s ({WRITER_SILENCE_ENV}): it died "
                "before it began, or this rank does not share its file system"
            )
            raise _exceeded(what, missing, writer, hint, now - started, reason)
        if now - started >= limit:
            reason = f"the wait reached its limit of {limit:.0f} s ({WAIT_LIMIT_ENV})"
            raise _exceeded(what, missing, writer, hint, now - started, reason)
        if now - last_log >= _LOG_EVERY_S:
            logger.info("waited %.0f s for %s: %s", now - started, what, [str(p) for p in missing])
            last_log = now
        deadline = min(last_sign + silence, started + limit)
        time.sleep(max(min(poll_s, deadline - now), 0.0))


def _exceeded(
    what: str, missing: list[Path], writer: dict[str, Any] | None, hint: str, waited: float, reason: str
) -> WaitLimitExceeded:
    log = writer.get("log") if writer else None
    log = (
        log
        or "the output of the rank that writes them (the terminal or log of the command that started the run)"
    )
    shown = ", ".join(str(p) for p in missing[:3]) + (
        f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    )
    return WaitLimitExceeded(
        f"rank {_rank()} waited {waited:.0f} s for {what}: {reason}. Missing: {shown}. "
        f"The writer's log: {log}." + (f" {hint}" if hint else "")
    )


# --- waiting for the other ranks in a collective ------------------------------------------------------


def wait_for_collective(work: Any, *, what: str, limit_s: float) -> None:
    """Wait for an asynchronous collective (``torch.distributed`` ``Work``) to complete, at most ``limit_s``.

    Polls ``is_completed`` rather than calling ``wait(timeout)``: under NCCL ``wait`` only orders the CUDA
    stream and returns, and the host would then block, unbounded, on the first read of the result.
    """
    deadline = time.monotonic() + limit_s
    pause = 0.0005
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise WaitLimitExceeded(
                f"rank {_rank()} waited {limit_s:.0f} s ({COLLECTIVE_LIMIT_ENV}) for the other ranks to join "
                f"{what}: one of them stopped or hangs. Its output says which: every rank logs to the "
                f"console or log of the command that started the run (this rank: {where_this_process_logs()})."
            )
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    work.wait()  # raises the backend's error when the collective failed (a peer that closed its connection)
