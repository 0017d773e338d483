"""The `gonogo serve` command: its arguments, and a server started from them.

gonogo's own engine (in a process of its own by default, gonogo/infer/engine_process.py; with
--no-engine-process a thread of this process) behind the HTTP app of gonogo/infer/server.py, or
another engine as a child of this command (gonogo/infer/engines/start.py).
"""

import logging
import time
from typing import Any

from gonogo.infer.server import DRAIN_SECONDS, ServerLimits, create_app

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint dir, run dir (its newest checkpoint) or Hugging Face export dir")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="environment variable holding the API key clients must send as a Bearer token "
                             "(required when --host is not a loopback address)")
    parser.add_argument("--model-name", default="gonogo", help="the model id clients name in requests")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="weights and KV cache precision (default: bfloat16 on a GPU, float32 on the CPU; "
                             "see docs/serving.md for which is faster)")
    parser.add_argument("--device", default="auto",
                        help="auto (the first GPU when there is one, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--max-waiting", type=int, default=64, help="queued requests beyond this get 429")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the engine (default on a CPU: every core but one, "
                             "which is left to HTTP and the clients)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step before serving (dense models; a C++ compiler on the "
                             "CPU; tens of seconds at start): fewer kernels per token, faster decoding (docs/serving.md)")
    parser.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine in a process of its own, sharing no GIL with HTTP (the default: "
                             "faster with many streams on a CPU); --no-engine-process keeps it in the server's "
                             "process (one process, less memory; docs/serving.md)")
    parser.add_argument("--engine", choices=["gonogo", "vllm", "command"], default="gonogo",
                        help="serve with gonogo's engine, vLLM (`gonogo engine install vllm`) or --engine-command")
    parser.add_argument("--engine-command", metavar="TEMPLATE",
                        help="any OpenAI-compatible server's command line with {model} and {port}")
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)   # {"url", "pid"} once listening
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # exit when it is gone


def command(args) -> int:
    import json
    import os
    import socket
    import threading

    import uvicorn

    from gonogo.errors import UserError
    from gonogo.infer.device import engine_threads_on_cpu
    from gonogo.infer.engine import EngineSettings, load_engine
    from gonogo.infer.engines.process import is_loopback
    from gonogo.rundir import write_json_atomic
    from pathlib import Path

    from gonogo.checkpoints.reference import served_model

    served = served_model(Path(args.checkpoint)) if Path(args.checkpoint).is_dir() else None
    if served is not None:  # a run directory: the model its serve stage served
        log.info("%s: serving the model its serve stage served: %s", args.checkpoint, served)
        args.checkpoint = str(served)
    if getattr(args, "engine", "gonogo") != "gonogo":  # another engine, as a child of this command
        from gonogo.infer.engines.start import serve_foreground

        return serve_foreground(args)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env) or None
        if api_key is None:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    if not is_loopback(args.host) and api_key is None:
        raise UserError(f"--host {args.host} exposes the server beyond this machine; give an API key "
                        f"with --api-key-env VAR (or bind 127.0.0.1)")
    for name in ("max_batch", "max_waiting"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        raise UserError(f"cannot bind {args.host}:{args.port}: {error.strerror} (choose another --port)") from None
    sock.listen(128)  # connections made while the model loads wait in the backlog
    port = sock.getsockname()[1]

    import torch

    from gonogo.checkpoints import STATS

    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    settings = EngineSettings(max_batch=args.max_batch, dtype=args.dtype, device=args.device,
                              max_waiting=args.max_waiting, compile=getattr(args, "compile", False))
    engine: Any
    engine_process = getattr(args, "engine_process", True)
    if engine_process:
        from gonogo.infer.engine_process import EngineProcess

        engine = EngineProcess(args.checkpoint, settings, args.threads)
        # the child's hashes of the checkpoint and any this process made: the total stays 1
        verifications, threads = STATS.verifications + engine.checkpoint_verifications, engine.threads
    else:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        engine = load_engine(args.checkpoint, settings)
        if args.threads is None and str(engine.device) == "cpu":
            torch.set_num_threads(engine_threads_on_cpu())
        engine.warm_up()   # --compile: compiled with the threads it will run with, before listening
        verifications, threads = STATS.verifications, torch.get_num_threads()
    engine.start()
    limits = ServerLimits(max_tokens=args.max_tokens_limit)
    app = create_app(engine, model_name=args.model_name, api_key=api_key, limits=limits)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=int(DRAIN_SECONDS) + 5, lifespan="off"))

    uvicorn_exit = server.handle_exit

    def handle_exit(sig, frame) -> None:  # SIGTERM / Ctrl-C: drain the engine, then let uvicorn close
        engine.drain(DRAIN_SECONDS)
        uvicorn_exit(sig, frame)

    # uvicorn has no hook for this: the instance's method is replaced, the old one called at the end
    server.handle_exit = handle_exit  # type: ignore[method-assign]
    if args.parent_pid:
        def watch_parent() -> None:
            while not server.should_exit:
                if os.getppid() != args.parent_pid:
                    log.warning("parent process %d is gone; shutting down", args.parent_pid)
                    engine.drain(DRAIN_SECONDS)
                    server.should_exit = True
                    return
                time.sleep(1.0)

        threading.Thread(target=watch_parent, daemon=True).start()

    shown_host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    url = f"http://{shown_host}:{port}"
    if args.ready_file:
        write_json_atomic(Path(args.ready_file), {"url": url, "pid": os.getpid(), "model": args.model_name})
    # how many times this process hashed a checkpoint in full: once (docs/checkpoint.md)
    print(json.dumps({"serving": url, "model": args.model_name, "auth": api_key is not None,
                      "checkpoint_verifications": verifications, "threads": threads,
                      "engine_process": engine_process, "compiled": settings.compile}),
          flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    return 0
