"""Inventory of many nodes: ``gonogo doctor --nnodes N --rdzv-endpoint HOST:PORT`` on every node.

Every node runs its own doctor (inventory, GPU health, storage probe) and posts a summary to a
TCP key-value store (``torch.distributed.TCPStore``) at the endpoint: the first node to bind the
port hosts it (as torchrun's c10d rendezvous does), the others connect. Each node's entry carries
its heartbeat (the time it answered); node ranks come from ``--node-rank`` or, without it, the
order of joining. The host waits (bounded by ``--join-timeout``) for all N, then posts the one
table every node prints, and the verdict: all N answered, all healthy, and all identical in
driver, CUDA (driver and torch build), NCCL and torch versions. A node that never joins makes
the verdict NO-GO with one line naming who answered and who did not.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any, Optional

from gonogo.errors import UserError

log = logging.getLogger(__name__)

VERSION_FIELDS = ("driver", "cuda_driver", "cuda_build", "nccl", "torch")
POLL_S = 0.2


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = (text or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint {text!r}: expected HOST:PORT, e.g. node0:29400")
    return host, int(port)


def node_summary(document: dict[str, Any], node_rank: Optional[int]) -> dict[str, Any]:
    """What one node posts: identity, health, versions, heartbeat."""
    nvml, torch_view = document["nvml"], document["torch"]
    return {"node_rank": node_rank, "hostname": document["host"]["hostname"], "time": time.time(),
            "healthy": document["healthy"], "problems": document["problems"], "unknowns": document["unknowns"],
            "gpu_count": document["gpu_count"], "cpu_count": document["cpu"]["usable_cores"],
            "memory_GB": document["memory"]["total_GB"],
            "versions": {"driver": nvml.get("driver_version") if nvml.get("available") else None,
                         "cuda_driver": nvml.get("cuda_driver_version") if nvml.get("available") else None,
                         "cuda_build": torch_view.get("cuda_build"), "nccl": torch_view.get("nccl_version"),
                         "torch": torch_view.get("version")}}


def _store(host: str, port: int, timeout_s: float, hosts: Optional[bool] = None):
    """Host the store (``hosts``: node rank 0; None: when this node can bind the port), else
    connect to the node that does. A listening store binds every address of its machine, so on
    many machines only a known node may host: any other could bind its own port and wait alone."""
    from torch.distributed import TCPStore

    timeout = timedelta(seconds=timeout_s)
    if hosts is not False:
        try:
            return TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout), True
        except (RuntimeError, OSError) as error:
            if hosts:
                raise UserError(f"doctor: node rank 0 hosts the table but cannot listen on port {port} ({error}); "
                                f"free the port or choose another --rdzv-endpoint") from None
            # bound by another node of this machine: join it
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=min(5.0, timeout_s))), False
        except (RuntimeError, OSError) as error:
            last = error
            time.sleep(POLL_S * 5)
    raise UserError(f"doctor: could not reach the rendezvous store at {host}:{port} within {timeout_s:.0f} s "
                    f"({last}); start the node that owns that address, or check --rdzv-endpoint")


def gather(document: dict[str, Any], *, nnodes: int, endpoint: str, node_rank: Optional[int] = None,
           join_timeout_s: float = 120.0, run_id: str = "doctor") -> dict[str, Any]:
    """Post this node's summary, wait for all ``nnodes``; the cluster view (the same on every node)."""
    if nnodes < 1:
        raise UserError(f"--nnodes {nnodes}: must be at least 1")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank {node_rank}: must be between 0 and {nnodes - 1}")
    host, port = parse_endpoint(endpoint)
    store, hosting = _store(host, port, join_timeout_s, None if node_rank is None else node_rank == 0)
    prefix = f"gonogo/{run_id}/"
    joined = int(store.add(prefix + "joined", 1))
    rank = node_rank if node_rank is not None else joined - 1
    summary = node_summary(document, rank)
    summary["hosted_store"] = hosting
    store.set(prefix + f"node/{joined}", json.dumps(summary))
    deadline = time.monotonic() + join_timeout_s
    if hosting:
        while time.monotonic() < deadline and int(store.add(prefix + "joined", 0)) < nnodes:
            time.sleep(POLL_S)
        count = int(store.add(prefix + "joined", 0))
        nodes = [json.loads(store.get(prefix + f"node/{index}")) for index in range(1, count + 1)]
        view = cluster_view(nodes, nnodes, endpoint, join_timeout_s)
        store.set(prefix + "view", json.dumps(view))
        # stay up (bounded) until every node that joined has read the view
        while time.monotonic() < deadline + 10 and int(store.add(prefix + "read", 0)) < count - 1:
            time.sleep(POLL_S)
        return view
    while time.monotonic() < deadline + 5:
        if store.check([prefix + "view"]):
            view = json.loads(store.get(prefix + "view"))
            store.add(prefix + "read", 1)
            return view
        time.sleep(POLL_S)
    raise UserError(f"doctor: the node hosting {endpoint} posted no cluster view within {join_timeout_s:.0f} s")


def cluster_view(nodes: list[dict[str, Any]], nnodes: int, endpoint: str, timeout_s: float) -> dict[str, Any]:
    nodes = sorted(nodes, key=lambda node: (node["node_rank"] is None, node["node_rank"]))
    answered = len(nodes)
    ranks = [node["node_rank"] for node in nodes]
    missing = [rank for rank in range(nnodes) if rank not in ranks]
    duplicates = sorted({rank for rank in ranks if ranks.count(rank) > 1})
    mismatched: dict[str, dict[str, Any]] = {}
    for field in VERSION_FIELDS:
        spellings = {json.dumps(node["versions"].get(field)) for node in nodes}
        if len(spellings) > 1:
            mismatched[field] = {f"{node['hostname']} (node {node['node_rank']})": node["versions"].get(field)
                                 for node in nodes}
    healthy = [node["healthy"] for node in nodes]
    problems = []
    if answered < nnodes:
        problems.append(f"{answered} of {nnodes} nodes answered at {endpoint} within {timeout_s:.0f} s (missing node "
                        f"rank(s) {', '.join(map(str, missing)) or '?'}; answered: "
                        f"{', '.join(node['hostname'] + ' (node ' + str(node['node_rank']) + ')' for node in nodes)}); "
                        f"start `gonogo doctor --nnodes {nnodes} --rdzv-endpoint {endpoint}` on every node")
    if duplicates:
        problems.append(f"node rank(s) {duplicates} answered twice: give each node its own --node-rank")
    for field, values in mismatched.items():
        problems.append(f"{field} versions differ: " + ", ".join(f"{name}: {value}" for name, value in values.items()))
    for node in nodes:
        if node["healthy"] is False:
            problems.append(f"{node['hostname']} (node {node['node_rank']}) unhealthy: {'; '.join(node['problems'])}")
    metrics: dict[str, Any] = {"nodes_expected": nnodes, "nodes_answered": answered,
               "nodes_healthy": sum(1 for value in healthy if value is True),
               "nodes_all_answered": answered == nnodes,
               "nodes_all_healthy": (False if any(v is False for v in healthy) else
                                     None if any(v is None for v in healthy) or answered < nnodes else True),
               "versions_identical": not mismatched if answered else None}
    unknown: dict[str, str] = {}
    if metrics["nodes_all_healthy"] is None:
        unknown["nodes_all_healthy"] = ("; ".join(f"{n['hostname']}: {'; '.join(n['unknowns'])}" for n in nodes
                                                  if n["healthy"] is None) or "not every node answered")
        metrics["unknown"] = unknown
    return {"nodes": nodes, "problems": problems, "metrics": metrics,
            "go": bool(metrics["nodes_all_answered"] and metrics["nodes_all_healthy"] is True
                       and metrics["versions_identical"] and not duplicates)}


def node_rows(view: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for node in view["nodes"]:
        versions = node["versions"]
        rows.append({"node": str(node["node_rank"]), "host": node["hostname"],
                     "healthy": {True: "yes", False: "no", None: "unknown"}[node["healthy"]],
                     "GPUs": "unknown" if node["gpu_count"] is None else str(node["gpu_count"]),
                     "CPUs": str(node["cpu_count"]), "memory GB": str(node["memory_GB"]),
                     "driver": str(versions["driver"] or "-"), "CUDA (driver/build)":
                         f"{versions['cuda_driver'] or '-'} / {versions['cuda_build'] or '-'}",
                     "NCCL": str(versions["nccl"] or "-"), "torch": str(versions["torch"]),
                     "heartbeat": time.strftime("%H:%M:%S", time.gmtime(node["time"])) + " UTC"})
    return rows

