"""How gonogo starts multi-process work: the real ``torchrun`` (torch.distributed.run).

The runner never imports torch.distributed itself; it builds a torchrun command line and runs
it as a child process group (see ``gonogo.procs``).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def torchrun_command(
    module: str,
    args: Sequence[str],
    nproc: int,
    *,
    max_restarts: int = 0,
    nnodes: str = "1",
    rdzv_endpoint: Optional[str] = None,
    rdzv_id: Optional[str] = None,
    node_rank: Optional[int] = None,
    monitor_interval: float = 0.5,
    rdzv_conf: Optional[dict[str, object]] = None,
) -> list[str]:
    """``python -m torch.distributed.run ... -m module args`` for one node or many.

    With one node and no endpoint, a c10d rendezvous on a free loopback port is used (what
    ``--standalone`` does, with the port chosen here so it can be reported).
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--nnodes={nnodes}", f"--max-restarts={max_restarts}",
               f"--monitor-interval={monitor_interval}", "--rdzv-backend=c10d"]
    if rdzv_endpoint is None:
        rdzv_endpoint = f"127.0.0.1:{free_port()}"
    command.append(f"--rdzv-endpoint={rdzv_endpoint}")
    if rdzv_id is not None:
        command.append(f"--rdzv-id={rdzv_id}")
    if node_rank is not None:
        command.append(f"--node-rank={node_rank}")
    if rdzv_conf:
        # e.g. join_timeout: how long an agent waits for the other nodes before it gives up
        command.append("--rdzv-conf=" + ",".join(f"{key}={value}" for key, value in rdzv_conf.items()))
    command += ["-m", module, *args]
    return command


def torchrun_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment for torchrun children.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes worker restarts over gloo reliable (measured:
    8 of 8 restarts succeed with it, about half fail without; see DESIGN.md).
    """
    env = dict(os.environ)
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # gonogo's own package must be importable by the workers even when run from a checkout
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [package_root, env.get("PYTHONPATH", "")] if p)
    if extra:
        env.update(extra)
    return env
