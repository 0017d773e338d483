"""The triage bundle: what every rank was doing when a training attempt hung, timed out or crashed.

Inside every rank (``install``):

- ``CollectiveLog`` wraps the ``torch.distributed`` collectives (all_reduce, all_gather, FSDP2's
  all-gather and reduce-scatter, barrier, ...) and keeps a small ring buffer of the last ones:
  sequence number, operation, the watchdog's step, the calling frame, and whether it returned.
  This is gonogo's own record on gloo; on NCCL, PyTorch's flight recorder records the same and
  more (``TORCH_NCCL_TRACE_BUFFER_SIZE``, dumped on a timeout, see ``worker_env``).
- Python fatal errors (a segfault, an abort in C++) are written by ``faulthandler`` to
  ``<stage>/heartbeats/rank-N.attempt-K.fatal.txt``, opened before they can happen; the parent
  turns a non-empty one into an incident of that attempt (the crashed rank wrote no record, so
  its frame is read from the dump).
- When the watchdog ends a rank, or an exception leaves the loop, the rank writes
  ``triage/<stage>-attempt-K/rank-N.json`` (step, last heartbeat, the collective it was in, its
  last collectives, its main thread's stack) and ``rank-N.stack.txt`` (faulthandler's dump of
  every thread), and drops a ``REQUEST`` file; a small thread in every other rank polls for it
  and writes its own record. The rank that asked waits (bounded) for its peers' records before
  it exits, since its exit makes torchrun stop them.

In the parent (``finish``, after torchrun returned, success or not): each incident folder gets
``report.md``, which opens with what hung (``diagnose``), ``triage.json``, fatal-error dumps,
NCCL logs and flight-recorder dumps, an NVML snapshot and the kernel's Xid lines where they
can be read (otherwise "unknown" and why); ``triage/README.md`` lists the incidents.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import IO, Any, Optional

log = logging.getLogger(__name__)

TRIAGE_DIR = "triage"
REQUEST_NAME = "REQUEST"
REPORT_NAME = "report.md"
WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
           "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
           "reduce", "gather", "scatter", "all_to_all", "all_to_all_single")
RING_SIZE = 16
PEER_WAIT_S = 4.0   # how long the asking rank waits for its peers' records before it exits
POLL_S = 0.25


def incident_dir(run_dir: Path, stage: str, attempt: int) -> Path:
    return Path(run_dir) / TRIAGE_DIR / f"{stage}-attempt-{attempt}"


def _frame_text(frame) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _caller(frame) -> str:
    """The nearest frame outside torch (the code that asked for the collective), else the caller."""
    first = frame
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name:
            return _frame_text(frame)
        frame = frame.f_back
    return _frame_text(first) if first is not None else "unknown"


class CollectiveLog:
    """A ring buffer of this rank's last collectives (see the module doc)."""

    def __init__(self, step_of=lambda: None, size: int = RING_SIZE):
        self._step_of = step_of
        self._lock = threading.Lock()
        self.seq = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=size)
        self.in_flight: dict[int, dict[str, Any]] = {}
        self._originals: dict[str, Any] = {}

    def install(self, module=None) -> "CollectiveLog":
        if module is None:
            import torch.distributed as module
        for name in WRAPPED:
            original = getattr(module, name, None)
            if original is None or getattr(original, "_gonogo_wrapped", False):
                continue
            self._originals[name] = original
            setattr(module, name, self._wrap(name, original))
        self._module = module
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(self._module, name, original)
        self._originals.clear()

    def _wrap(self, name: str, original):
        def wrapper(*args, **kwargs):
            entry = self.enter(name, sys._getframe(1), async_op=bool(kwargs.get("async_op")))
            try:
                return original(*args, **kwargs)
            finally:
                self.leave(entry)

        wrapper._gonogo_wrapped = True  # type: ignore[attr-defined]
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.__name__ = name
        return wrapper

    def enter(self, op: str, frame, async_op: bool = False) -> dict[str, Any]:
        entry = {"op": op, "step": self._step_of(), "started": time.time(), "seconds": None,
                 "async_op": async_op, "frame": _caller(frame)}
        with self._lock:
            self.seq += 1
            entry["seq"] = self.seq
            self.in_flight[entry["seq"]] = entry
            self.recent.append(entry)
        return entry

    def leave(self, entry: dict[str, Any]) -> None:
        with self._lock:
            entry["seconds"] = round(time.time() - entry["started"], 6)
            self.in_flight.pop(entry["seq"], None)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            waiting = [dict(entry) for entry in self.in_flight.values()]
            return {"count": self.seq, "in_flight": waiting[-1] if waiting else None,
                    "recent": [dict(entry) for entry in self.recent]}


def thread_stacks() -> dict[str, Any]:
    """Every thread's frames (innermost last), keyed by thread name; the main thread's apart."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    main_ident = threading.main_thread().ident
    stacks, main = {}, []
    for ident, frame in sys._current_frames().items():
        frames = [{"file": item.filename, "line": item.lineno, "function": item.name}
                  for item in traceback.extract_stack(frame)]
        stacks[f"{names.get(ident, 'thread')}-{ident}"] = frames
        if ident == main_ident:
            main = frames
    return {"main": main, "threads": stacks}


class Triage:
    """One rank's part of the bundle (see the module doc)."""

    def __init__(self, *, run_dir: Path, stage: str, stage_dir: Path, rank: int, world_size: int,
                 attempt: int, watchdog=None, peer_wait_s: float = PEER_WAIT_S):
        self.dir = incident_dir(run_dir, stage, attempt)
        self.stage, self.rank, self.world_size, self.attempt = stage, rank, world_size, attempt
        self.watchdog = watchdog
        self.peer_wait_s = peer_wait_s
        self.collectives = CollectiveLog(step_of=self._step)
        self.written = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._fatal: Optional[IO[str]] = None
        self.fatal_path = Path(stage_dir) / "heartbeats" / f"rank-{rank:05d}.attempt-{attempt}.fatal.txt"

    def _step(self) -> Optional[int]:
        return self.watchdog.state()["step"] if self.watchdog is not None else None

    def start(self) -> "Triage":
        self.collectives.install()
        try:
            self.fatal_path.parent.mkdir(parents=True, exist_ok=True)
            self._fatal = open(self.fatal_path, "w", encoding="utf-8")
            faulthandler.enable(file=self._fatal, all_threads=True)
        except OSError as error:
            log.warning("triage: cannot open %s for fatal-error dumps: %s", self.fatal_path, error)
        if self.watchdog is not None:
            self.watchdog.on_fire = lambda step, idle: self.request("hang", f"no progress for {idle:.1f} s "
                                                                   f"after step {step} (watchdog)")
        self._thread = threading.Thread(target=self._poll, name="gonogo-triage", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.collectives.uninstall()
        if self._fatal is not None:
            faulthandler.disable()
            self._fatal.close()
            self._fatal = None
            if self.fatal_path.stat().st_size == 0:
                self.fatal_path.unlink(missing_ok=True)

    def _poll(self) -> None:
        request = self.dir / REQUEST_NAME
        while not self._stop.wait(POLL_S):
            if not self.written and request.exists():
                self.write("peer_request", f"asked by {_read_json(request).get('rank', '?')}")
                return

    def request(self, reason: str, detail: str, error: Optional[BaseException] = None) -> None:
        """This rank detected the incident: record it, ask the peers for theirs, wait for them (bounded)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.dir / REQUEST_NAME, "x", encoding="utf-8") as handle:
                    json.dump({"rank": self.rank, "reason": reason, "detail": detail, "time": time.time()}, handle)
            except FileExistsError:
                pass  # a peer detected it first
            self.write(reason, detail, error)
            deadline = time.monotonic() + self.peer_wait_s
            while time.monotonic() < deadline and len(list(self.dir.glob("rank-*.json"))) < self.world_size:
                time.sleep(0.1)
        except Exception as failure:  # the bundle must never be why a rank does not exit
            log.warning("triage: could not record the incident: %s", failure)

    def write(self, reason: str, detail: str, error: Optional[BaseException] = None) -> None:
        with self._lock:
            if self.written:
                return
            self.written = True
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"rank-{self.rank:05d}"
        with open(self.dir / f"{name}.stack.txt", "w", encoding="utf-8") as handle:
            faulthandler.dump_traceback(file=handle, all_threads=True)
        record: dict[str, Any] = {
            "rank": self.rank, "world_size": self.world_size, "attempt": self.attempt, "host": socket.gethostname(),
            "pid": os.getpid(), "time": time.time(), "reason": reason, "detail": detail,
            "watchdog": self.watchdog.state() if self.watchdog is not None else None,
            "collectives": self.collectives.snapshot(), "stacks": thread_stacks(),
        }
        if error is not None:
            record["exception"] = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            record["exception_frames"] = [{"file": item.filename, "line": item.lineno, "function": item.name}
                                          for item in traceback.extract_tb(error.__traceback__)]
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.dir / f"{name}.json")


_current: Optional[Triage] = None


def install(run_dir: Path, stage: str, stage_dir: Path, rank: int, world_size: int, watchdog) -> Triage:
    global _current
    from gonogo.train.fault_injection import restart_count

    _current = Triage(run_dir=run_dir, stage=stage, stage_dir=stage_dir, rank=rank, world_size=world_size,
                      attempt=restart_count(), watchdog=watchdog).start()
    return _current


def on_exception(error: BaseException) -> None:
    """An exception left this rank's loop (a collective timeout, a crash): record it and ask the
    peers for their records. A user's mistake is no incident."""
    from gonogo.errors import UserError

    if _current is None or isinstance(error, (UserError, KeyboardInterrupt, SystemExit)):
        return
    detail = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()[-1]
    kind = "collective timeout" if re.search(r"timed? ?out|timeout", detail, re.IGNORECASE) else "exception"
    _current.request(kind, detail, error)


def worker_env(stage_dir: Path) -> dict[str, str]:
    """NCCL's own records for the bundle (ignored by gloo): the flight recorder, dumped on a
    collective timeout, and NCCL's log in files; settings the user made are kept."""
    import torch

    if not torch.cuda.is_available():
        return {}  # the workers run gloo: nothing of NCCL's to record
    nccl = Path(stage_dir) / "nccl"
    nccl.mkdir(parents=True, exist_ok=True)  # NCCL does not create its log file's folder
    wanted = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(nccl / "flight_recorder_rank_"),
              "NCCL_DEBUG": "INFO", "NCCL_DEBUG_FILE": str(nccl / "nccl.%h.%p.log")}
    return {key: value for key, value in wanted.items() if key not in os.environ}


def ask_ranks(run_dir: Path, stage: str, stage_dir: Path, detail: str,
              wait_s: float = PEER_WAIT_S + 2.0) -> Optional[Path]:
    """The parent's part when the stage's own timeout stops it: ask the ranks of the running attempt
    for their records (a REQUEST, as a rank that detects a hang does) and wait for them, bounded,
    before the group is killed. The ranks are those whose fatal-dump file exists on this node."""
    ranks: dict[int, set[int]] = {}
    for path in (Path(stage_dir) / "heartbeats").glob("rank-*.attempt-*.fatal.txt"):
        match = re.match(r"rank-(\d+)\.attempt-(\d+)\.fatal\.txt", path.name)
        if match:
            ranks.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if not ranks:
        log.warning("triage: no rank of %s had started when its timeout passed: nothing to ask", stage)
        return None
    attempt = max(ranks)
    folder = incident_dir(run_dir, stage, attempt)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(folder / REQUEST_NAME, "x", encoding="utf-8") as handle:
            json.dump({"rank": "runner", "reason": "stage timeout", "detail": detail, "time": time.time()}, handle)
    except FileExistsError:
        pass  # a rank detected the incident first: its request stands
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and len(list(folder.glob("rank-*.json"))) < len(ranks[attempt]):
        time.sleep(0.1)
    return folder


# -- the parent: reading the records ----------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _innermost(frames: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The innermost frame of a stack that is not gonogo's own triage/watchdog machinery."""
    for frame in reversed(frames or []):
        if frame["file"] not in (__file__, threading.__file__):
            return frame
    return None


def _frame_label(frame: Optional[dict[str, Any]]) -> str:
    return f"{frame['file']}:{frame['line']} in {frame['function']}" if frame else "unknown"


def _waiting_in(record: dict[str, Any]) -> Optional[str]:
    """The collective a rank's main thread was inside: from the record of wrapped calls, else from
    its stack (FSDP2 issues its all-gathers and reduce-scatters past the wrapped names, and a
    rank blocked in ``Work.wait()`` shows the torch.distributed frame that waits)."""
    in_flight = (record.get("collectives") or {}).get("in_flight")
    if in_flight:
        return f"{in_flight['op']} #{in_flight['seq']} from {in_flight['frame']}"
    frames = (record.get("stacks") or {}).get("main") or []
    inside = [frame for frame in frames if f"{os.sep}torch{os.sep}distributed{os.sep}" in frame["file"]]
    if not inside:
        return None
    # the code that asked for it: the nearest frame outside torch
    outer = next((frame for frame in reversed(frames[:frames.index(inside[0])])
                  if f"{os.sep}torch{os.sep}" not in frame["file"]), None)
    return (f"{inside[-1]['function']} ({Path(inside[-1]['file']).name}:{inside[-1]['line']}) from "
            f"{_frame_label(outer)}")


def diagnose(records: dict[int, dict[str, Any]], world_size: int) -> dict[str, Any]:
    """Which rank hung (or failed), at which step, in which operation and frame.

    The ranks' collective counts decide: every rank issues the same collectives in the same
    order, so a rank that issued fewer than its peers is the one that stopped; ranks that waited
    inside a collective its peer never reached are the victims. A rank that wrote no record is
    dead or stuck holding the GIL, and is named first. A rank that raised names its exception.
    """
    missing = [rank for rank in range(world_size) if rank not in records]
    counts = {rank: (record.get("collectives") or {}).get("count", 0) for rank, record in records.items()}
    raised = [rank for rank, record in sorted(records.items()) if record.get("exception")]
    why = ""
    crashed = [rank for rank, record in sorted(records.items()) if record.get("reason") == "fatal error"]
    if crashed:
        culprits, why = crashed, "crashed in native code (faulthandler's dump)"
    elif missing:
        culprits = missing
        why = "wrote no record (dead, or stuck in native code holding the interpreter)"
    elif raised:
        culprits = raised
        why = "raised an exception"
    elif counts and len(set(counts.values())) > 1:
        low = min(counts.values())
        culprits = sorted(rank for rank, count in counts.items() if count == low)
        why = (f"issued {low} collectives while its peers issued {max(counts.values())}: it stopped before the "
               f"next collective, the others waited for it there")
    else:
        waiting = sorted(rank for rank, record in records.items() if _waiting_in(record))
        idle = sorted(set(records) - set(waiting))
        if waiting and idle:
            culprits, why = idle, "was outside any collective while its peers waited inside one"
        else:
            culprits, why = [], ("every rank was at the same point" + (" inside the same collective: suspect the "
                                 "fabric (NCCL logs, NVLink/NIC state) or a peer outside this job" if waiting else ""))
    diagnosis: dict[str, Any] = {"ranks": culprits, "why": why, "missing_ranks": missing, "collective_counts": counts}
    if culprits and culprits[0] in records:
        record = records[culprits[0]]
        frames = record.get("exception_frames") or (record.get("stacks") or {}).get("main") or []
        frame = _innermost(frames)
        collectives = record.get("collectives") or {}
        in_flight = _waiting_in(record)
        last = (collectives.get("recent") or [None])[-1]
        operation = (f"in {in_flight}" if in_flight else
                     f"outside any collective (last: {last['op']} #{last['seq']} from {last['frame']})" if last else
                     "outside any collective (none issued yet)")
        diagnosis.update({"rank": culprits[0], "step": (record.get("watchdog") or {}).get("step"),
                          "operation": operation, "frame": _frame_label(frame), "frame_detail": frame})
        if record.get("exception"):
            diagnosis["exception"] = record["exception"].strip().splitlines()[-1]
    else:
        diagnosis.update({"rank": culprits[0] if culprits else None, "step": None, "operation": "unknown",
                          "frame": "unknown", "frame_detail": None})
    # the collective the victims waited in: what the culprit never reached
    victims = sorted(set(records) - set(culprits))
    for rank in victims:
        in_flight = _waiting_in(records[rank])
        if in_flight:
            diagnosis["peers_waited_in"] = f"rank {rank}: {in_flight}"
            break
    return diagnosis


FAULTHANDLER_FRAME = re.compile(r'^\s+File "(?P<file>.+)", line (?P<line>\d+) in (?P<function>\S+)')


def fatal_record(path: Path, rank: int) -> dict[str, Any]:
    """A crashed rank's record from faulthandler's dump: the crashing thread's frames, innermost last."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    frames = []
    for line in lines[start + 1:] if start is not None else []:
        match = FAULTHANDLER_FRAME.match(line)
        if not match:
            break
        frames.append({"file": match["file"], "line": int(match["line"]), "function": match["function"]})
    error = next((line for line in lines if line.startswith("Fatal Python error")), "fatal error")
    return {"rank": rank, "reason": "fatal error", "exception": error, "watchdog": None,
            "exception_frames": list(reversed(frames)), "stacks": {"main": list(reversed(frames))},
            "collectives": None}


def what_hung_line(diagnosis: dict[str, Any], reason: str) -> str:
    if diagnosis.get("rank") is None:
        return f"What hung ({reason}): no single rank: {diagnosis['why']}"
    step = f"step {diagnosis['step']}" if diagnosis.get("step") is not None else "an unknown step"
    line = (f"What hung ({reason}): rank {diagnosis['rank']} at {step}, "
            f"{diagnosis['operation']}, frame {diagnosis['frame']}")
    if diagnosis.get("exception"):
        line += f": {diagnosis['exception']}"
    return line


def nvml_snapshot() -> dict[str, Any]:
    from gonogo.cluster.gpu_health import probe_gpus

    try:
        report = probe_gpus()
    except Exception as error:  # a snapshot that fails must not hide the rest of the bundle
        return {"available": False, "reason": f"unknown: NVML probe failed: {error}"}
    if not report.get("available"):
        report["reason"] = f"unknown: {report.get('reason')}"
    return report


XID = re.compile(r"NVRM: Xid", re.IGNORECASE)


def kernel_xid_lines(limit: int = 50) -> dict[str, Any]:
    """The kernel log's NVIDIA Xid lines (driver-reported GPU faults), or why they cannot be read."""
    attempts = []
    for argv in (["dmesg", "--ctime"], ["journalctl", "-k", "--no-pager", "-n", "5000"]):
        if shutil.which(argv[0]) is None:
            attempts.append(f"{argv[0]} not installed")
            continue
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            attempts.append(f"{argv[0]}: {error}")
            continue
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            attempts.append(f"{argv[0]}: {message}")
            continue
        lines = [line for line in done.stdout.splitlines() if XID.search(line)]
        return {"readable": True, "source": argv[0], "xid_lines": lines[-limit:]}
    return {"readable": False, "reason": "unknown: kernel log not readable (" + "; ".join(attempts) + ")"}


def bundles(run_dir: Path, stage: Optional[str] = None) -> list[dict[str, Any]]:
    """The completed incidents of a run (of one stage), oldest attempt first: triage.json plus its folder."""
    root = Path(run_dir) / TRIAGE_DIR
    found = []
    for folder in sorted(root.glob(f"{stage or '*'}-attempt-*")) if root.is_dir() else []:
        bundle = _read_json(folder / "triage.json")
        if bundle:
            found.append({**bundle, "folder": str(folder)})
    return found


def finish(run_dir: Path, stage: str, stage_dir: Path) -> list[Path]:
    """Complete every incident folder of ``stage`` that has records and no report yet; their reports."""
    root = Path(run_dir) / TRIAGE_DIR
    # a rank that crashed in native code left only faulthandler's dump: that attempt is an incident too
    for path in sorted((Path(stage_dir) / "heartbeats").glob("rank-*.attempt-*.fatal.txt")):
        match = re.match(r"rank-(\d+)\.attempt-(\d+)\.fatal\.txt", path.name)
        if not match or not path.stat().st_size:
            continue
        folder = incident_dir(run_dir, stage, int(match.group(2)))
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / REQUEST_NAME).exists() and not (folder / REPORT_NAME).exists():
            first = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[:1]
            (folder / REQUEST_NAME).write_text(json.dumps({"rank": int(match.group(1)), "reason": "fatal error",
                                                           "detail": first[0] if first else "fatal error",
                                                           "time": path.stat().st_mtime}), encoding="utf-8")
    reports = []
    for folder in sorted(root.glob(f"{stage}-attempt-*")) if root.is_dir() else []:
        if (folder / REPORT_NAME).is_file() or not folder.is_dir():
            continue
        reports.append(_finish_incident(folder, Path(stage_dir)))
    if reports:
        _write_index(root)
    return reports


def _finish_incident(folder: Path, stage_dir: Path) -> Path:
    records = {}
    for path in sorted(folder.glob("rank-*.json")):
        record = _read_json(path)
        if "rank" in record:
            records[int(record["rank"])] = record
    request = _read_json(folder / REQUEST_NAME)
    reason = request.get("reason", "unknown")
    # fatal-error dumps, NCCL logs and flight-recorder dumps written by this attempt's ranks
    copied = []
    attempt = folder.name.rsplit("-", 1)[-1]
    for path in sorted((stage_dir / "heartbeats").glob(f"rank-*.attempt-{attempt}.fatal.txt")):
        if path.stat().st_size:
            shutil.copy2(path, folder / path.name)
            copied.append(path.name)
            rank = int(path.name[5:10])
            if rank not in records:  # the crashed rank: its record is the dump
                records[rank] = fatal_record(path, rank)
    world_size = max([record.get("world_size") or 0 for record in records.values()] + [len(records)]
                     + [rank + 1 for rank in records])
    diagnosis = diagnose(records, world_size)
    nccl = stage_dir / "nccl"
    nccl_files = []
    if nccl.is_dir():
        (folder / "nccl").mkdir(exist_ok=True)
        for path in sorted(nccl.iterdir()):
            if path.is_file():
                shutil.copy2(path, folder / "nccl" / path.name)
                nccl_files.append(path.name)
    nvml = nvml_snapshot()
    xid = kernel_xid_lines()
    bundle = {"what_hung": what_hung_line(diagnosis, reason), "reason": reason, "detail": request.get("detail"),
              "requested_by": request.get("rank"), "diagnosis": diagnosis,
              "heartbeats": {rank: record.get("watchdog") for rank, record in sorted(records.items())},
              "fatal_dumps": copied, "nccl_files": nccl_files or None,
              "nccl_note": None if nccl_files else "no NCCL logs: this attempt used no NCCL (gloo) or wrote none",
              "nvml": nvml, "kernel": xid}
    from gonogo.rundir import write_json_atomic

    write_json_atomic(folder / "triage.json", bundle)
    report = folder / REPORT_NAME
    report.write_text(_report_text(folder, bundle, records), encoding="utf-8")
    log.warning("%s (triage bundle: %s)", bundle["what_hung"], folder)
    return report


def _report_text(folder: Path, bundle: dict[str, Any], records: dict[int, dict[str, Any]]) -> str:
    diagnosis = bundle["diagnosis"]
    lines = [f"# {bundle['what_hung']}", "",
             f"- why this rank: {diagnosis['why']}",
             f"- detected by rank {bundle['requested_by']}: {bundle['reason']} ({bundle['detail']})"]
    if diagnosis.get("peers_waited_in"):
        lines.append(f"- its peers waited in: {diagnosis['peers_waited_in']}")
    lines += ["", "| rank | step | collectives issued | in collective | innermost frame (main thread) | record |",
              "|---|---|---|---|---|---|"]
    for rank in sorted(set(records) | set(diagnosis["missing_ranks"])):
        record = records.get(rank)
        if record is None:
            lines.append(f"| {rank} | unknown | unknown | unknown | unknown | none (no answer) |")
            continue
        collectives = record.get("collectives") or {}
        in_flight = _waiting_in(record)
        frame = _innermost((record.get("stacks") or {}).get("main") or [])
        lines.append(f"| {rank} | {(record.get('watchdog') or {}).get('step')} | {collectives.get('count')} | "
                     f"{in_flight or '-'} | "
                     f"`{_frame_label(frame)}` | rank-{rank:05d}.json, rank-{rank:05d}.stack.txt |")
    lines += ["", "## Last heartbeats (the last step each rank finished, when the incident was recorded)", ""]
    for rank, record in sorted(records.items()):
        beat = record.get("watchdog") or {}
        when = beat.get("last_progress_time")
        stamp = time.strftime("%H:%M:%S", time.gmtime(when)) + " UTC" if when else "unknown"
        lines.append(f"- rank {rank}: step {beat.get('step')} at {stamp}, {beat.get('seconds_without_progress')} s "
                     f"before its record ({record.get('reason')})")
    if not records:
        lines.append("- no rank wrote a record")
    nvml, kernel = bundle["nvml"], bundle["kernel"]
    lines += ["", "## Devices and logs", "",
              f"- NVML: {'%d GPU(s), driver %s' % (nvml.get('gpu_count', 0), nvml.get('driver_version')) if nvml.get('available') else nvml.get('reason')}",
              f"- kernel Xid lines: {len(kernel['xid_lines']) if kernel.get('readable') else kernel.get('reason')}",
              f"- NCCL logs / flight recorder: {', '.join(bundle['nccl_files']) if bundle['nccl_files'] else bundle['nccl_note']}",
              f"- fatal-error dumps (faulthandler): {', '.join(bundle['fatal_dumps']) or 'none'}",
              "", f"Every rank's full stack (all threads): `rank-N.stack.txt`; the raw records: `rank-N.json`, "
              f"`triage.json` (folder {folder.name})."]
    return "\n".join(lines) + "\n"


def _write_index(root: Path) -> None:
    lines = ["# Triage bundles (newest first)", ""]
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True):
        bundle = _read_json(folder / "triage.json")
        if bundle:
            lines.append(f"- `{folder.name}/`: {bundle.get('what_hung')}")
    (root / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
