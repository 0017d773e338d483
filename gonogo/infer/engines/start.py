"""From an engine choice and a model to a started server child (a ``ServerProcess``).

    gonogo    `gonogo serve` on a free loopback port (reads checkpoints, run dirs, HF exports)
    vllm      vLLM's OpenAI server from its own venv (`gonogo engine install vllm`); a gonogo
              checkpoint is exported to Hugging Face format first, an HF directory is served as is
    command   any OpenAI-compatible server from an argv template: {model} (an HF directory, exported
              like vllm's), {port}, {host}, {model_name} are filled in

A plan or command says ``engine = "vllm"`` (a word) or a table with the options below.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from gonogo.errors import UserError
from gonogo.infer.engines.process import ServerProcess, free_port, is_loopback
from gonogo.typed_config import Strict

log = logging.getLogger(__name__)

EngineName = Literal["gonogo", "vllm", "command"]
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PLACEHOLDERS = ("model", "port", "host", "model_name")
# what a cluster runs for each engine (a command engine names its own image)
DEFAULT_IMAGES = {"gonogo": "gonogo:latest", "vllm": "vllm/vllm-openai:latest"}


class EngineSettings(Strict):
    """Which server serves a model, and how it is started."""

    name: EngineName = "gonogo"
    command: Optional[list[str]] = None       # engine "command": the argv template
    health_path: Optional[str] = None         # default: /health (vLLM, gonogo, TGI, SGLang, llama.cpp)
    args: list[str] = Field(default_factory=list)   # extra arguments for the vLLM server
    max_model_len: Optional[int] = Field(None, ge=16)  # vLLM: context length (default: the model's)
    kv_cache_gib: float = Field(1.0, gt=0)    # vLLM on CPU: VLLM_CPU_KVCACHE_SPACE
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # default: the stage's dtype
    image: Optional[str] = None               # container image in generated Kubernetes manifests
    python: Optional[str] = None              # vLLM: a Python that has vLLM (default: `gonogo engine install`'s)

    @model_validator(mode="before")
    @classmethod
    def _from_word(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _command_given(self) -> "EngineSettings":
        if self.name == "command":
            if not self.command:
                raise ValueError('engine "command" needs command = ["server", "--model", "{model}", "--port", '
                                 '"{port}"]')
            if not any("{port}" in part for part in self.command):
                raise ValueError("the engine command must contain {port} (gonogo picks a free loopback port)")
            try:
                [part.format(**{field: "" for field in PLACEHOLDERS}) for part in self.command]
            except (KeyError, IndexError, ValueError) as error:
                known = ", ".join("{" + field + "}" for field in PLACEHOLDERS)
                raise ValueError(f"the engine command has an unknown placeholder {error}; use {known} "
                                 "(and {{ }} for literal braces)") from None
        elif self.command:
            raise ValueError(f'command is only for engine "command", not {self.name!r}')
        if self.python and self.name != "vllm":
            raise ValueError(f'python is only for engine "vllm", not {self.name!r}')
        return self

    @property
    def container_image(self) -> Optional[str]:
        return self.image or DEFAULT_IMAGES.get(self.name)

    @property
    def label(self) -> str:
        return self.name if self.name != "command" or not self.command else f"command ({Path(self.command[0]).name})"


def preflight(engine: EngineSettings) -> None:
    """Before anything runs: the user's one-line error when the engine cannot be started here."""
    if engine.name == "vllm":
        vllm_python(engine)


def vllm_python(engine: EngineSettings) -> Path:
    """The Python that runs vLLM: the configured one, else the venv of `gonogo engine install vllm`."""
    if engine.python:
        python = Path(engine.python).expanduser()
        if not python.is_file():
            raise UserError(f"engine python {engine.python!r}: no such file (give a Python that has vLLM, "
                            f"or leave it out to use `gonogo engine install vllm`)")
        return python
    from gonogo.infer.engines.install import require_ready

    return require_ready("vllm")


def hf_model_dir(model: str, directory: Path) -> Path:
    """An HF directory for ``model``: the model itself when it is one, else an export of it into
    ``directory``/hf-export (reused when it exists and is complete)."""
    from gonogo.checkpoints import manifest, resolve

    path = Path(model)
    if path.is_dir() and manifest.is_hf_export(path):
        return path
    ref = resolve(model)
    resolved = ref.path
    if ref.format == "hf":
        return resolved
    out = directory / "hf-export"
    if not (out / "config.json").is_file():
        from gonogo.export.hf import export_hf

        log.info("exporting %s to %s for the serving engine", resolved, out)
        export_hf(ref, out)
    return out


def default_startup_timeout(engine: EngineSettings) -> float:
    """gonogo's server starts in seconds; vLLM takes about 100 s on 2 busy cores (DESIGN.md)."""
    return 180.0 if engine.name == "gonogo" else 900.0


@dataclass(frozen=True)
class GonogoServeOptions:
    """The flags only gonogo's own server has (``gonogo serve --help``); None leaves its default."""

    device: Optional[str] = None
    threads: Optional[int] = None
    max_batch: Optional[int] = None
    max_waiting: Optional[int] = None
    engine_process: Optional[bool] = None   # False: --no-engine-process, the engine in the server's process
    compile: bool = False                   # --compile: torch.compile the decode step at start


def serve_arguments(model: str, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "gonogo",
                    dtype: Optional[str] = None, api_key_env: Optional[str] = None,
                    ready_file: Optional[Path] = None, parent_pid: Optional[int] = None,
                    options: GonogoServeOptions = GonogoServeOptions()) -> list[str]:
    """The arguments after ``gonogo serve``: the one place its command line is built, for a child
    of this process and for a cluster's container alike."""
    argv = ["--checkpoint", str(model), "--host", host, "--port", str(port), "--model-name", model_name]
    if ready_file is not None:
        argv += ["--ready-file", str(ready_file)]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    for flag, value in (("--device", options.device), ("--threads", options.threads),
                        ("--max-batch", options.max_batch), ("--max-waiting", options.max_waiting),
                        ("--dtype", dtype), ("--api-key-env", api_key_env)):
        if value is not None:
            argv += [flag, str(value)]
    if options.engine_process is not None:
        argv.append("--engine-process" if options.engine_process else "--no-engine-process")
    if options.compile:
        argv.append("--compile")
    return argv


def start_gonogo_server(model: str, directory: Path, *, name: str = "server", model_name: str = "gonogo",
                        dtype: Optional[str] = None, api_key_env: Optional[str] = None, host: str = "127.0.0.1",
                        port: int = 0, options: GonogoServeOptions = GonogoServeOptions(),
                        health_path: str = "/health", env: Optional[dict[str, str]] = None,
                        verbose: bool = False) -> ServerProcess:
    """`gonogo serve` for ``model`` as a started child (not yet waited for): it writes its URL to
    directory/<name>.ready.json once listening (port 0 picks a free one) and exits when this
    process is gone; its log is directory/<name>.log (``verbose``: with gonogo's INFO lines)."""
    directory.mkdir(parents=True, exist_ok=True)
    ready = directory / f"{name}.ready.json"
    argv = [sys.executable, "-m", "gonogo", *(["-v"] if verbose else []), "serve",
            *serve_arguments(model, host=host, port=port, model_name=model_name, dtype=dtype,
                             api_key_env=api_key_env, ready_file=ready, parent_pid=os.getpid(), options=options)]
    return ServerProcess(argv, directory / f"{name}.log", ready_file=ready, health_path=health_path, env=env,
                         name=f"{name} (gonogo)").start()


def start_engine(engine: EngineSettings, model: str, directory: Path, *, name: str = "server",
                 model_name: str = "gonogo", dtype: Optional[str] = None,
                 gonogo_options: GonogoServeOptions = GonogoServeOptions(),
                 api_key_env: Optional[str] = None, host: str = "127.0.0.1", port: int = 0) -> ServerProcess:
    """Start ``model`` on ``engine`` (not yet waited for); its log is directory/<name>.log.

    ``port`` 0 picks a free one. A vLLM or command child gets SIGTERM if gonogo dies without
    stopping it; gonogo's own server watches gonogo's pid itself."""
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{name}.log"
    health_path = engine.health_path or "/health"
    if engine.name == "gonogo":
        # none given: gonogo serve picks (bfloat16 on a GPU, float32 on the CPU)
        return start_gonogo_server(model, directory, name=name, model_name=model_name, dtype=engine.dtype or dtype,
                                   api_key_env=api_key_env, host=host, port=port, options=gonogo_options,
                                   health_path=health_path)
    port = port or free_port(host)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    hf_dir = hf_model_dir(model, directory / name)
    if engine.name == "vllm":
        python = vllm_python(engine)
        argv = [str(python), "-m", VLLM_SERVER_MODULE, "--model", str(hf_dir), "--served-model-name", model_name,
                "--host", host, "--port", str(port), "--dtype", engine.dtype or dtype or "float32",
                "--uvicorn-log-level", "warning"]
        if engine.max_model_len:
            argv += ["--max-model-len", str(engine.max_model_len)]
        argv += engine.args
        env = {**os.environ, **vllm_environment(engine)}
        if api_key_env:  # vLLM reads its key from VLLM_API_KEY
            env["VLLM_API_KEY"] = os.environ.get(api_key_env, "")
        return ServerProcess(argv, log_path, url=url, env=env, health_path=health_path,
                             name=f"{name} (vllm)", die_with_parent=True).start()
    fields = {"model": str(hf_dir), "port": str(port), "host": host, "model_name": model_name}
    argv = [part.format(**fields) for part in engine.command or []]  # placeholders checked by EngineSettings
    return ServerProcess(argv, log_path, url=url, health_path=health_path, name=f"{name} ({engine.label})",
                         die_with_parent=True).start()


def vllm_environment(engine: EngineSettings) -> dict[str, str]:
    """What vLLM needs here: a bounded CPU KV cache, no network at run time, no usage reports."""
    return {"VLLM_CPU_KVCACHE_SPACE": f"{engine.kv_cache_gib:g}", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "INFO")}


def serve_foreground(args) -> int:
    """`gonogo serve --engine vllm|command`: start the engine, say where it serves, stop it on Ctrl-C."""
    import json
    import shlex
    import time

    from gonogo.rundir import utc_stamp

    if not is_loopback(args.host) and not args.api_key_env:
        raise UserError(f"--host {args.host} exposes the server beyond this machine; give an API key "
                        f"with --api-key-env VAR (or bind 127.0.0.1)")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    if args.engine == "command" and not args.engine_command:
        raise UserError('--engine command needs --engine-command "server --model {model} --port {port}"')
    from gonogo.typed_config import validate

    engine = validate(EngineSettings, {"name": args.engine, "command": shlex.split(args.engine_command)
                                       if args.engine == "command" else None}, source="gonogo serve")
    preflight(engine)
    directory = Path("runs") / f"serve-{args.engine}-{utc_stamp()}"
    server = start_engine(engine, args.checkpoint, directory, name="server", model_name=args.model_name,
                          dtype=args.dtype, api_key_env=args.api_key_env, host=args.host, port=args.port)
    try:
        url = server.wait_healthy(default_startup_timeout(engine))
        assert server.process is not None  # started above
        print(json.dumps({"serving": url, "model": args.model_name, "engine": args.engine,
                          "auth": bool(args.api_key_env), "log": str(server.log_path)}), flush=True)
        while server.process.poll() is None:
            time.sleep(1.0)
        print(f"the {args.engine} server exited with code {server.process.returncode}; see {server.log_path}")
        return 1
    finally:
        server.stop()
