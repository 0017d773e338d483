"""``gonogo doctor`` and the ``doctor`` stage: what this machine is, and whether it is healthy.

The inventory (CPU, memory, CUDA devices, driver/CUDA/NCCL/torch/Python versions, host, OS)
answers "what did we actually run on?"; the health checks (NVML: ECC, throttling, NVLink;
a storage probe of the checkpoint directory) answer "should we run on it?". A machine without a
GPU is a valid answer ("no GPU"), not an error. ``gonogo doctor`` runs this stage through the plan
runner with the gate ``healthy == true`` (exit 1 when a check fails or cannot be made), so that
scripts and schedulers can use it before a job; its tables or ``--json`` document go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, model_validator

from gonogo.cluster import gpu_health, topology
from gonogo.cluster.storage import probe_storage
from gonogo.errors import UserError
from gonogo.rundir import write_json_atomic
from gonogo.stages.base import Metrics, ReportItem, StageCommand, StageContext, StageKind, StageSettings

log = logging.getLogger(__name__)

SCHEMA = "gonogo.doctor/1"
GB = 1_000_000_000
DEFAULT_CLI_STORAGE_PATH = Path("runs")

METRIC_NAMES = frozenset({
    "healthy", "gpu_count", "cpu_count", "memory_GB", "storage_write_GBps", "storage_read_GBps",
    "disk_free_GB", "ecc_errors", "gpu_max_temperature_C", "gpu_throttled", "nvlink_links_down",
    # topology (gonogo.cluster.topology)
    "sockets", "numa_nodes", "nvlink_pairs", "gpus_on_local_nic", "gpus_without_local_nic",
})
# with nnodes > 1 (gonogo.cluster.nodes): the cluster's verdict, the same on every node
NODE_METRIC_NAMES = frozenset({"nodes_expected", "nodes_answered", "nodes_healthy", "nodes_all_answered",
                               "nodes_all_healthy", "versions_identical"})


# -- inventory ----------------------------------------------------------------------------------

def _read_text(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def host_info() -> dict[str, Any]:
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME")
    except (OSError, AttributeError):  # not Linux, or no os-release file
        os_name = None
    return {
        "hostname": socket.gethostname(),
        "os": os_name or f"{platform.system()} {platform.release()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def cpu_info() -> dict[str, Any]:
    model = None
    physical = set()
    cpuinfo = _read_text("/proc/cpuinfo")
    if cpuinfo:
        socket_id = core_id = None
        for line in cpuinfo.splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and model is None:
                model = value
            elif key == "physical id":
                socket_id = value
            elif key == "core id":
                core_id = value
            elif not key:  # a blank line ends one logical CPU's block
                if core_id is not None:
                    physical.add((socket_id, core_id))
                socket_id = core_id = None
        if core_id is not None:
            physical.add((socket_id, core_id))
    logical = os.cpu_count()
    # what this process may actually use (a container or taskset can give it fewer)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return {
        "model": model or platform.processor() or platform.machine(),
        "logical_cores": logical,
        "physical_cores": len(physical) or None,
        "usable_cores": usable,
    }


def memory_info() -> dict[str, Any]:
    total = available = None
    meminfo = _read_text("/proc/meminfo")
    if meminfo:
        fields = {}
        for line in meminfo.splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024  # reported in kiB
        total, available = fields.get("MemTotal"), fields.get("MemAvailable")
    if total is None and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = None
    return {
        "total_GB": round(total / GB, 2) if total else None,
        "available_GB": round(available / GB, 2) if available else None,
    }


def torch_info() -> dict[str, Any]:
    """torch's own view: its version, the CUDA it was built with, the devices it can use."""
    import torch

    info: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "hip_build": getattr(torch.version, "hip", None),
        "cuda_available": False,
        "devices": [],
        "nccl_version": None,
        "cudnn_version": None,
    }
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
    except RuntimeError as error:  # a broken driver install raises here rather than answering False
        info["cuda_error"] = str(error)
    if not info["cuda_available"]:
        return info
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        info["devices"].append({
            "index": index,
            "name": properties.name,
            "memory_GB": round(properties.total_memory / GB, 2),
            "compute_capability": f"{properties.major}.{properties.minor}",
        })
    try:
        version = torch.cuda.nccl.version()
        info["nccl_version"] = ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)
    except (RuntimeError, AttributeError) as error:
        info["nccl_version"] = f"unavailable ({error})"
    info["cudnn_version"] = torch.backends.cudnn.version()
    return info


def inventory(nvml: Any = None) -> dict[str, Any]:
    """Everything about the machine except the storage probe (that one writes to disk)."""
    torch_view = torch_info()
    nvml_view = gpu_health.probe_gpus(nvml)
    # usable GPUs: NVML's count, else torch's; unknown (None) when neither answers on a machine
    # whose PCI bus lists NVIDIA GPUs (a broken driver), or when the PCI bus cannot be read
    if nvml_view["available"]:
        gpu_count: Optional[int] = nvml_view["gpu_count"]
    elif torch_view["devices"] or nvml_view.get("pci_nvidia_gpus") == 0:
        gpu_count = len(torch_view["devices"])
    else:
        gpu_count = None
    warnings = []
    if nvml_view["available"] and nvml_view["gpu_count"] and not torch_view["cuda_available"]:
        warnings.append(f"NVML sees {nvml_view['gpu_count']} GPU(s) but torch cannot use CUDA "
                        f"(torch {torch_view['version']} is a CPU-only build, or CUDA_VISIBLE_DEVICES hides them)")
    if gpu_count is None:
        accelerator = f"unknown: {nvml_view['reason']} (PCI lists {nvml_view.get('pci_nvidia_gpus', '?')} NVIDIA GPU(s))"
    elif gpu_count == 0:
        accelerator = "no GPU: CPU only (torch.distributed will use gloo)"
    else:
        accelerator = f"{gpu_count} GPU(s)"
    return {
        "schema": SCHEMA,
        "host": host_info(),
        "cpu": cpu_info(),
        "memory": memory_info(),
        "accelerator": accelerator,
        "gpu_count": gpu_count,
        "torch": torch_view,
        "nvml": nvml_view,
        "engines": engines_view(),
        "topology": topology.topology(nvml),
        "warnings": warnings,
    }


def engines_view() -> list[dict[str, Any]]:
    """Which serving engines can start here (vLLM: its venv is installed and checked)."""
    from gonogo.infer.engines.install import engines_report

    return engines_report()


def diagnose(storage_path: Path, size_MB: int, nvml: Any = None) -> dict[str, Any]:
    """The whole doctor document: inventory, storage probe, health verdict and the metrics."""
    storage = probe_storage(storage_path, size_MB)  # first: a bad path is a user error, found fast
    document = inventory(nvml)
    document["storage"] = storage
    problems = gpu_health.health_problems(document["nvml"])
    unknowns = gpu_health.health_unknowns(document["nvml"])
    if not document["nvml"]["available"] and document["torch"]["devices"]:
        unknowns.append(f"GPU health unknown: {document['nvml']['reason']}, while torch sees "
                        f"{len(document['torch']['devices'])} GPU(s)")
    if not document["storage"]["read_back_ok"]:
        problems.append(f"storage: the bytes read back from {document['storage']['path']} differ from those written")
    document["problems"] = problems
    document["unknowns"] = unknowns
    # healthy: every check was made and passed; False when one failed; None (unknown) when none
    # failed but some could not be made: a check that could not be read never passes
    document["healthy"] = False if problems else (None if unknowns else True)
    document["metrics"] = metrics_of(document)
    return document


def metrics_of(document: dict[str, Any]) -> Metrics:
    storage = document["storage"]
    metrics = {
        "healthy": document["healthy"],
        "gpu_count": document["gpu_count"],
        "cpu_count": document["cpu"]["usable_cores"],
        "memory_GB": document["memory"]["total_GB"],
        "storage_write_GBps": storage["write_GBps"],
        "storage_read_GBps": storage["read_GBps"],
        "disk_free_GB": storage["disk_free_GB"],
        **gpu_health.summary_metrics(document["nvml"]),
    }
    unknown = dict(metrics.pop("unknown", {}))
    placed = dict(document["topology"]["metrics"])
    unknown.update(placed.pop("unknown", {}))
    metrics.update(placed)
    if document["healthy"] is None:
        unknown["healthy"] = "; ".join(document["unknowns"])
    if document["gpu_count"] is None:
        unknown["gpu_count"] = document["accelerator"]
    if metrics["memory_GB"] is None:
        unknown["memory_GB"] = "total memory not readable (/proc/meminfo, sysconf)"
    for name in ("storage_write_GBps", "storage_read_GBps", "disk_free_GB"):
        if metrics[name] is None and name not in unknown:
            unknown[name] = f"the storage probe of {storage.get('path')} did not measure it"
    assert set(metrics) == METRIC_NAMES, sorted(set(metrics) ^ METRIC_NAMES)
    if unknown:
        metrics["unknown"] = unknown
    return metrics


# -- presentation (shared by the CLI and the report) ----------------------------------------------

def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def inventory_rows(document: dict[str, Any]) -> list[dict[str, str]]:
    host, cpu, memory, torch_view, nvml_view = (
        document["host"], document["cpu"], document["memory"], document["torch"], document["nvml"])
    rows = [
        ("host", host["hostname"]),
        ("OS", f"{host['os']} ({host['kernel']}, {host['machine']})"),
        ("CPU", f"{cpu['model']}: {_shown(cpu['logical_cores'])} logical, "
                f"{_shown(cpu['physical_cores'])} physical, {_shown(cpu['usable_cores'])} usable cores"),
        ("memory", f"{_shown(memory['total_GB'])} GB total, {_shown(memory['available_GB'])} GB available"),
        ("accelerator", document["accelerator"]),
        ("Python", host["python"]),
        ("torch", f"{torch_view['version']} (CUDA build {_shown(torch_view['cuda_build'])}, "
                  f"CUDA available: {torch_view['cuda_available']})"),
        ("NCCL", _shown(torch_view["nccl_version"])),
        ("cuDNN", _shown(torch_view["cudnn_version"])),
    ]
    if nvml_view["available"]:
        rows += [("driver", _shown(nvml_view["driver_version"])),
                 ("CUDA (driver)", _shown(nvml_view["cuda_driver_version"]))]
    else:
        rows.append(("NVML", nvml_view["reason"]))
    for device in torch_view["devices"]:
        rows.append((f"cuda:{device['index']}", f"{device['name']}, {device['memory_GB']} GB, "
                                               f"compute capability {device['compute_capability']}"))
    for engine in document.get("engines", []):
        if engine["ready"]:
            detail = f"ready ({engine['package']} {engine['version']})" if engine.get("package") else "ready"
        elif engine["ready"] is None:
            detail = f"unknown: {engine['reason']}"
        else:
            detail = f"not ready: {engine['reason']} (`gonogo engine install {engine['engine']}`)"
        rows.append((f"engine {engine['engine']}", detail))
    storage = document.get("storage")
    if storage:
        cache = "" if storage["page_cache_dropped"] else f" ({storage.get('read_note', 'page cache not dropped')})"
        rows += [
            ("storage", storage["path"]),
            ("storage write", f"{storage['write_GBps']} GB/s ({storage['size_MB']} MB, fsync)"),
            ("storage read", f"{storage['read_GBps']} GB/s{cache}"),
            ("disk free", f"{storage['disk_free_GB']} of {storage['disk_total_GB']} GB"),
        ]
    return [{"item": item, "value": value} for item, value in rows]


def gpu_rows(document: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for device in document["nvml"].get("gpus", []):
        if "error" in device:
            rows.append({"GPU": str(device["index"]), "name": device["error"]})
            continue
        ecc = device["ecc"]
        throttle_reasons = device["throttle"]["reasons"]
        links = device["nvlink"]
        if isinstance(links, list):
            up = sum(1 for link in links if link["state"] == "up")
            nvlink = f"{up}/{len(links)} up"
        else:
            nvlink = links
        rows.append({
            "GPU": str(device["index"]),
            "name": _shown(device["name"]),
            "memory GB": _shown(device["memory_GB"]),
            "temperature C": _shown(device["temperature_C"]),
            "power W": f"{_shown(device['power_W'])} / {_shown(device['power_limit_W'])}",
            "ECC uncorrected (volatile/aggregate)":
                f"{_shown(ecc['volatile']['uncorrected'])} / {_shown(ecc['aggregate']['uncorrected'])}",
            "ECC corrected (volatile/aggregate)":
                f"{_shown(ecc['volatile']['corrected'])} / {_shown(ecc['aggregate']['corrected'])}",
            "throttle": (", ".join(throttle_reasons) or "none") if isinstance(throttle_reasons, list)
                        else throttle_reasons,
            "NVLink": nvlink,
            "healthy": "no" if gpu_health.device_problems(device) else (
                "unknown" if set(gpu_health.device_unknowns(device)) - {"nvlink"} else "yes"),
        })
    return rows


# -- the stage ------------------------------------------------------------------------------------

class DoctorSettings(StageSettings):
    storage_path: Optional[str] = Field(
        None, description="directory to probe; default: the run directory's checkpoints/ folder")
    storage_size_MB: int = Field(256, ge=1, description="bytes written and read back, in MB (1e6 bytes)")
    # many nodes: the same plan runs on every node; they meet at rdzv_endpoint (gonogo.cluster.nodes)
    nnodes: int = Field(1, ge=1, description="nodes whose inventories to gather into one table")
    rdzv_endpoint: Optional[str] = Field(None, description="HOST:PORT where the nodes meet; node rank 0 hosts it")
    node_rank: Optional[int] = Field(None, ge=0, description="this node's rank; default: the order of joining")
    join_timeout_s: float = Field(120.0, gt=0, description="seconds to wait for every node to answer")

    @model_validator(mode="after")
    def _many_nodes(self) -> "DoctorSettings":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes = {self.nnodes} needs rdzv_endpoint = \"HOST:PORT\" (where the nodes meet)")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r}: expected HOST:PORT, e.g. \"node0:29400\"")
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes ({self.nnodes})")
        return self


def run(ctx: StageContext, settings: DoctorSettings) -> Metrics:
    path = Path(settings.storage_path) if settings.storage_path else ctx.run_dir.checkpoints_dir
    ctx.progress(f"inventory, GPU health and a {settings.storage_size_MB} MB storage probe of {path}")
    document = diagnose(path, settings.storage_size_MB)
    write_json_atomic(ctx.stage_dir / "doctor.json", document)
    for problem in document["problems"]:
        log.warning("doctor: %s", problem)
    for unknown in document["unknowns"]:
        log.warning("doctor: %s", unknown)
    metrics = dict(document["metrics"])
    if settings.nnodes > 1:
        metrics = _gather_nodes(ctx, settings, document, metrics)
    ctx.event(rank=0, step=0, **{k: v for k, v in metrics.items() if k != "unknown"})
    return metrics


def _gather_nodes(ctx: StageContext, settings: DoctorSettings, document: dict[str, Any], metrics: Metrics) -> Metrics:
    from gonogo.cluster import nodes
    from gonogo.errors import StageFailed

    ctx.progress(f"waiting for {settings.nnodes} nodes at {settings.rdzv_endpoint} "
                 f"(at most {settings.join_timeout_s:g} s)")
    assert settings.rdzv_endpoint  # the settings refuse nnodes > 1 without one
    view = nodes.gather(document, nnodes=settings.nnodes, endpoint=settings.rdzv_endpoint,
                        node_rank=settings.node_rank, join_timeout_s=settings.join_timeout_s,
                        run_id=f"doctor-stage-{ctx.name}")
    write_json_atomic(ctx.stage_dir / "cluster.json", view)
    for problem in view["problems"]:
        log.warning("doctor: %s", problem)
    if not view["metrics"]["nodes_all_answered"]:
        # a node that never joined: no table of N nodes to gate on; the one line says who is missing
        raise StageFailed(f"{ctx.name}: {view['problems'][0]}")
    ranks = [node["node_rank"] for node in view["nodes"]]
    if len(set(ranks)) < len(ranks):
        # two nodes gave one rank: N answered but a rank is missing, which no metric shows
        raise StageFailed(f"{ctx.name}: " + next(p for p in view["problems"] if "answered twice" in p))
    cluster = dict(view["metrics"])
    unknown = {**metrics.pop("unknown", {}), **cluster.pop("unknown", {})}
    metrics.update(cluster)
    if unknown:
        metrics["unknown"] = unknown
    return metrics


def report(stage_dir: Path, metrics: Metrics) -> Optional[list[ReportItem]]:
    path = stage_dir / "doctor.json"
    if not path.is_file():
        return None
    document = json.loads(path.read_text(encoding="utf-8"))
    items = [ReportItem(title="Machine inventory and storage", table=inventory_rows(document))]
    rows = gpu_rows(document)
    if rows:
        items.append(ReportItem(title="GPU health (NVML)", table=rows))
    else:
        items.append(ReportItem(title="GPU health (NVML)", text=document["nvml"]["reason"] or "no GPU"))
    if document.get("topology"):
        rows = topology.matrix_rows(document["topology"])
        items.append(ReportItem(title="Topology: GPU links (nvidia-smi topo -m legend) and NUMA affinity",
                                table=rows) if rows else
                     ReportItem(title="Topology: GPU links (nvidia-smi topo -m legend) and NUMA affinity",
                                text=document["topology"]["gpu"].get("reason") or "no GPU"))
        items.append(ReportItem(title="Topology: sockets, NUMA nodes, caches, NICs",
                                table=topology.cpu_rows(document["topology"])))
        try:
            items.append(ReportItem(title="Topology picture", png=topology.picture(document["topology"])))
        except ImportError as error:  # matplotlib is a dependency; a broken install loses only the picture
            log.warning("topology picture not drawn: %s", error)
    cluster = stage_dir / "cluster.json"
    if cluster.is_file():
        from gonogo.cluster import nodes

        view = json.loads(cluster.read_text(encoding="utf-8"))
        items.insert(0, ReportItem(title=f"Nodes: {view['metrics']['nodes_answered']} of "
                                         f"{view['metrics']['nodes_expected']} answered",
                                   table=nodes.node_rows(view)))
        items.insert(1, ReportItem(title="Nodes verdict", text="; ".join(view["problems"]) or (
            "every node answered, all healthy, identical driver / CUDA / NCCL / torch versions" if view["go"]
            else "health unknown on some node (not counted as passed)")))
    unknowns = document.get("unknowns", [])
    verdict = "; ".join(document["problems"] + [f"unknown: {u}" for u in unknowns]) or "all health checks passed"
    notes = " ".join(document["warnings"])
    items.append(ReportItem(title="Health verdict", text=f"{verdict}. {notes}".strip()))
    return items


# -- the command: the stage through the plan runner (gonogo.stage_cli) ------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the whole document as JSON (stable keys) on stdout instead of tables")
    parser.add_argument("--path", type=Path, default=DEFAULT_CLI_STORAGE_PATH,
                        help="directory whose storage speed to probe, e.g. the checkpoint folder (default: ./runs)")
    parser.add_argument("--size-MB", dest="size_MB", type=int, default=256,
                        help="MB (1e6 bytes) to write and read back in the storage probe (default: 256)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: a new folder under runs/); the document is in "
                             "stages/doctor/doctor.json")
    group = parser.add_argument_group("many nodes (run the same command on every node)")
    group.add_argument("--nnodes", type=int, default=1, help="nodes whose inventories to gather into one table")
    group.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="where the nodes meet: the first node to bind it hosts the table (with --nnodes > 1)")
    group.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: the order of joining)")
    group.add_argument("--join-timeout", type=float, default=120.0,
                       help="seconds to wait for every node to answer (default: 120)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.nnodes > 1:
        from gonogo.cluster import nodes

        if not args.rdzv_endpoint:
            raise UserError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (where the nodes meet)")
        nodes.parse_endpoint(args.rdzv_endpoint)  # a typo is found before the storage probe runs
    return {"storage_path": str(args.path), "storage_size_MB": args.size_MB, "nnodes": args.nnodes,
            "rdzv_endpoint": args.rdzv_endpoint, "node_rank": args.node_rank, "join_timeout_s": args.join_timeout}


def _check(args: argparse.Namespace, settings: DoctorSettings) -> None:
    from gonogo.files import check_output_dir

    check_output_dir(args.path, "--path")  # the probe creates it; a path that cannot be is one line now
    if settings.nnodes > 1 and args.out is None:
        # the nodes of one job start together in one shared folder: each gets its own run directory
        from gonogo.rundir import utc_stamp

        node = f"node{settings.node_rank}" if settings.node_rank is not None else f"{socket.gethostname()}-{os.getpid()}"
        args.out = Path("runs") / f"doctor-{utc_stamp()}-{node}"


def default_gates(settings: DoctorSettings) -> list[str]:
    """What the command's exit code says: this machine healthy (unknown is not), or with many nodes
    the cluster's GO: every node answered, all healthy, identical versions."""
    if settings.nnodes > 1:
        return ["nodes_all_answered == true", "nodes_all_healthy == true", "versions_identical == true"]
    return ["healthy == true"]


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    """The tables, or ``--json`` the document, on stdout from what the stage wrote; with many nodes
    the node table, also when the stage failed because a node never joined (its partial view)."""
    path = stage_dir / "doctor.json"
    if not path.is_file():
        return
    document = json.loads(path.read_text(encoding="utf-8"))
    cluster = stage_dir / "cluster.json"
    view = json.loads(cluster.read_text(encoding="utf-8")) if cluster.is_file() else None
    if args.json:
        json.dump(document if view is None else {"node": document, "cluster": view}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif view is not None:
        _print_nodes(view)
    else:
        _print_tables(document)


def _print_nodes(view: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from gonogo.cluster import nodes

    console = Console()
    rows = nodes.node_rows(view)
    table = Table(title=f"gonogo doctor: {view['metrics']['nodes_answered']} of {view['metrics']['nodes_expected']} nodes")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    for problem in view["problems"]:
        console.print(f"NO-GO: {problem}", markup=False)
    if view["go"]:
        console.print("GO: every node answered, all healthy, identical driver / CUDA / NCCL / torch versions")
    elif not view["problems"]:
        console.print("NO-GO: health unknown on some node (not counted as passed)")


def _print_tables(document: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="gonogo doctor", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    for row in inventory_rows(document):
        table.add_row(row["item"], row["value"])
    console.print(table)
    rows = gpu_rows(document)
    if rows:
        health = Table(title="GPU health (NVML)")
        for column in rows[0]:
            health.add_column(column)
        for row in rows:
            health.add_row(*(row.get(column, "") for column in rows[0]))
        console.print(health)
    for title, rows in (("topology: GPU links", topology.matrix_rows(document["topology"])),
                        ("topology: CPU, NUMA, caches, NICs", topology.cpu_rows(document["topology"]))):
        if rows:
            view = Table(title=title)
            for column in rows[0]:
                view.add_column(column)
            for row in rows:
                view.add_row(*(row.get(column, "") for column in rows[0]))
            console.print(view)
    for warning in document["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    for problem in document["problems"]:
        console.print(f"[red]unhealthy:[/red] {problem}")
    for unknown in document["unknowns"]:
        console.print(f"[yellow]unknown:[/yellow] {unknown}")
    if document["healthy"] is True:
        console.print("[green]healthy[/green]: every check passed")
    elif document["healthy"] is None:
        console.print("[yellow]health unknown[/yellow]: checks above could not be made (not counted as passed)")


STAGE = StageKind(
    name="doctor",
    description="inventory (CPU, memory, GPUs, versions), GPU health via NVML, storage write/read speed",
    settings=DoctorSettings,
    metrics=lambda settings: set(METRIC_NAMES) | (set(NODE_METRIC_NAMES) if settings.nnodes > 1 else set()),
    run=run,
    report=report,
    default_gates=default_gates,
    command=StageCommand(add_arguments=add_arguments, settings=_settings, check=_check, summary=_summary),
)
