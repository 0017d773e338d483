"""Child processes that can always be stopped: own process group, bounded wait, logged output.

Every multi-process stage runs ``torchrun`` through ``run_process``. The child gets a session
of its own, so a Ctrl-C in the terminal reaches only gonogo, which then stops the whole group
(torchrun and its workers) itself: first SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)

GRACE_SECONDS = 10.0


class ProcessTimeout(Exception):
    def __init__(self, argv: Sequence[str], seconds: float):
        super().__init__(f"{argv[0]} did not finish within {seconds:.0f} s")
        self.seconds = seconds


def stop_group(process: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after ``grace`` seconds."""
    if process.poll() is not None:
        _kill_group(process.pid, signal.SIGKILL)  # stragglers of a finished leader
        return
    _kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        log.error("process %d did not exit after SIGKILL", process.pid)


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_BEFORE_TIMEOUT_STOP: ContextVar[Optional[Callable[[], object]]] = ContextVar("gonogo_before_timeout_stop", default=None)


@contextmanager
def before_timeout_stop(hook: Callable[[], object]):
    """Within this block, a ``run_process`` that passes its timeout calls ``hook()`` before it stops
    the group: the train stage asks its ranks for their stacks (the triage bundle) while they live.
    A context rather than an argument: every ``run_command`` of the stages reaches it unchanged."""
    token = _BEFORE_TIMEOUT_STOP.set(hook)
    try:
        yield
    finally:
        _BEFORE_TIMEOUT_STOP.reset(token)


def run_process(
    argv: Sequence[str],
    *,
    timeout: float,
    log_path: Optional[Path] = None,
    env: Optional[dict[str, str]] = None,
    cwd: Optional[Path] = None,
    on_line: Optional[Callable[[str], None]] = None,
) -> int:
    """Run ``argv`` to completion and return its exit code.

    Output (stdout and stderr together) goes line by line to ``log_path`` and ``on_line``.
    On timeout the group is stopped and ``ProcessTimeout`` raised; on KeyboardInterrupt (or any
    other exception in the waiting thread) the group is stopped before the exception goes on.
    """
    log_file = open(log_path, "a", encoding="utf-8") if log_path else None
    process = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,
        text=True,
        errors="replace",
        bufsize=1,
    )

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if log_file:
                log_file.write(line)
                log_file.flush()
            if on_line:
                on_line(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                code = process.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    hook = _BEFORE_TIMEOUT_STOP.get()
                    if hook is not None:
                        try:
                            hook()
                        except Exception as error:  # the record must never keep the group alive
                            log.warning("before stopping %s after its timeout: %s", argv[0], error)
                    stop_group(process)
                    raise ProcessTimeout(argv, timeout) from None
        # the leader is gone; make sure no worker it started outlives it
        _kill_group(process.pid, signal.SIGKILL)
        reader.join(timeout=5)
        return code
    except BaseException:
        stop_group(process)
        raise
    finally:
        reader.join(timeout=5)
        if log_file:
            log_file.close()
