"""ServerProcess: the one owner of a server child — start it, wait until it answers, stop it.

Every server gonogo starts (its own `gonogo serve`, vLLM's OpenAI server, a user's command) is a
child in a process group of its own with its output in a log file, so stopping it stops
everything it started (vLLM's engine-core processes included). The wait for readiness is
bounded and reports the tail of the log when the child dies or the time is up.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from gonogo.errors import StageFailed

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (the server binds it a moment later; a clash shows as a failed start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server on this machine (a wider bind needs an API key)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Runs first in the child, then execs the server in the same process: PR_SET_PDEATHSIG survives
# exec, so the server gets SIGTERM when gonogo dies without stopping it (Linux; elsewhere only
# the atexit stop is there). A launcher instead of preexec_fn, which is unsafe with threads.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "try:\n"
                    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG\n"
                    "except (OSError, AttributeError):\n"
                    "    pass\n"
                    "if os.getppid() != int(sys.argv[1]):\n"
                    "    sys.exit('gonogo exited before the server started')\n"
                    "os.execvp(sys.argv[2], sys.argv[2:])\n")


class ServerProcess:
    """A server child. Its URL is known up front (``url``) or read from ``ready_file`` (gonogo's
    `serve --ready-file`, which binds port 0 itself)."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, url: Optional[str] = None,
                 ready_file: Optional[Path] = None, env: Optional[dict[str, str]] = None,
                 health_path: str = "/health", name: str = "server", die_with_parent: bool = False):
        assert (url is None) != (ready_file is None), "give the URL or the ready file, not both"
        self.argv, self.log_path, self.env, self.name = list(argv), Path(log_path), env, name
        self.url, self.ready_file, self.health_path = url, ready_file, health_path
        self.die_with_parent = die_with_parent
        self.process: Optional[subprocess.Popen] = None
        self.startup_seconds: Optional[float] = None
        self._started_at = 0.0

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> "ServerProcess":
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s: %s (log %s)", self.name, " ".join(self.argv), self.log_path)
        self._started_at = time.monotonic()
        argv = self.argv
        if self.die_with_parent:
            argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
        with self.log_path.open("a") as log_file:
            try:
                self.process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
            except OSError as error:
                raise StageFailed(f"cannot start {self.name} ({self.argv[0]}): {error}") from None
        return self

    def wait_healthy(self, timeout: float) -> str:
        """The URL once the server answers ``health_path`` with 200, within ``timeout`` seconds.

        StageFailed with the tail of the log if the child exits first or the time is up (the
        child is left running then: the caller stops it, as it stops it on any error)."""
        import httpx

        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StageFailed(f"{self.name} exited with code {self.process.returncode} during start-up "
                                  f"(log {self.log_path}):\n{self.log_tail()}")
            url = self.url or self._url_from_ready_file()
            if url is not None:
                try:
                    if httpx.get(f"{url}{self.health_path}", timeout=2.0).status_code == 200:
                        self.url = url
                        self.startup_seconds = time.monotonic() - self._started_at
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(POLL_SECONDS)
        raise StageFailed(f"{self.name} did not answer {self.health_path} within {timeout:.0f} s (raise "
                          f"startup_timeout_s if it is just slow); see {self.log_path}:\n{self.log_tail(600)}")

    def _url_from_ready_file(self) -> Optional[str]:
        assert self.ready_file is not None
        if not self.ready_file.is_file():
            return None
        try:
            return json.loads(self.ready_file.read_text())["url"]
        except (ValueError, KeyError):  # being written
            return None

    def log_text(self) -> str:
        """Everything the child has written so far ("" when there is no log yet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, characters: int = 1500) -> str:
        return self.log_text()[-characters:]

    def stop(self, grace: float = 10.0) -> Optional[int]:
        """Stop the whole process group (SIGTERM, then SIGKILL after ``grace``); idempotent.
        The child's exit code (None: never started)."""
        from gonogo.procs import stop_group

        if self.process is None:
            return None
        stop_group(self.process, grace=grace)
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

