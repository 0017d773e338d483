"""The machine's topology: CPU sockets, NUMA nodes and caches (from /sys), GPU<->GPU links (NVLink
or the PCIe path from NVML, as ``nvidia-smi topo -m`` shows them), and each GPU's and NIC's NUMA node.

Link names follow ``nvidia-smi topo -m``: ``NV<n>`` (n NVLinks between the pair), ``PIX`` (one
PCIe switch), ``PXB`` (several switches), ``PHB`` (through the CPU's host bridge), ``NODE``
(across host bridges inside one NUMA node), ``SYS`` (across the inter-socket link). A GPU "has a
local NIC" when a network device sits on its NUMA node: traffic between them does not cross the
socket link (what GPUDirect RDMA needs). Everything that cannot be read says "unknown" and why.
The sysfs root and the NVML module are parameters, so tests drive the same code with fakes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

SYS = Path("/sys")
# nvmlGpuTopologyLevel_t, from nvml.h (part of NVML's ABI)
NVML_LEVELS = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
VIRTUAL_NETS = ("lo",)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def parse_cpulist(text: Optional[str]) -> list[int]:
    cpus: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def _cpulist_text(cpus: list[int]) -> str:
    ranges, start = [], None
    for index, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if index + 1 == len(cpus) or cpus[index + 1] != cpu + 1:
            ranges.append(f"{start}" if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(ranges)


def cpu_topology(sys_root: Path = SYS) -> dict[str, Any]:
    """Sockets, cores, NUMA nodes (CPUs, memory) and the caches of CPU 0."""
    cpu_dir = sys_root / "devices" / "system" / "cpu"
    cpus = sorted(int(path.name[3:]) for path in cpu_dir.glob("cpu[0-9]*")) if cpu_dir.is_dir() else []
    if not cpus:
        return {"available": False, "reason": f"unknown: {cpu_dir} lists no CPUs"}
    sockets: dict[str, list[int]] = {}
    cores = set()
    for cpu in cpus:
        package = _read(cpu_dir / f"cpu{cpu}" / "topology" / "physical_package_id")
        core = _read(cpu_dir / f"cpu{cpu}" / "topology" / "core_id")
        sockets.setdefault(package if package is not None else "unknown", []).append(cpu)
        cores.add((package, core))
    nodes = []
    node_dir = sys_root / "devices" / "system" / "node"
    for path in sorted(node_dir.glob("node[0-9]*"), key=lambda p: int(p.name[4:])) if node_dir.is_dir() else []:
        meminfo = _read(path / "meminfo") or ""
        total = next((line.split()[-2] for line in meminfo.splitlines() if "MemTotal" in line), None)
        nodes.append({"node": int(path.name[4:]), "cpus": _read(path / "cpulist"),
                      "memory_GB": round(int(total) * 1024 / 1e9, 2) if total else None})
    caches = []
    cache_dir = cpu_dir / "cpu0" / "cache"
    for path in sorted(cache_dir.glob("index[0-9]*")) if cache_dir.is_dir() else []:
        caches.append({"level": _read(path / "level"), "type": _read(path / "type"), "size": _read(path / "size"),
                       "shared_by_cpus": _read(path / "shared_cpu_list")})
    return {"available": True, "cpus": len(cpus), "cores": len(cores),
            "sockets": [{"socket": key, "cpus": _cpulist_text(value)} for key, value in sorted(sockets.items())],
            "numa_nodes": nodes or None, "numa_reason": None if nodes else f"unknown: {node_dir} not readable",
            "caches": caches or None}


def _pci_numa(sys_root: Path, bus_id: str) -> Optional[int]:
    # NVML spells the domain with 8 hex digits, sysfs with 4
    domain, _, rest = bus_id.lower().partition(":")
    address = f"{domain[-4:]}:{rest}"
    value = _read(sys_root / "bus" / "pci" / "devices" / address / "numa_node")
    return int(value) if value not in (None, "") and int(value) >= 0 else None


def nics(sys_root: Path = SYS) -> list[dict[str, Any]]:
    """Network devices with a PCI device behind them (virtual ones have none), with their NUMA node."""
    found = []
    for kind, folder in (("net", sys_root / "class" / "net"), ("infiniband", sys_root / "class" / "infiniband")):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name in VIRTUAL_NETS or not (path / "device").exists():
                continue
            numa = _read(path / "device" / "numa_node")
            device = os.path.realpath(path / "device")
            found.append({"name": path.name, "kind": kind, "device": device,
                          "numa_node": int(numa) if numa not in (None, "") and int(numa) >= 0 else None})
    return found


def gpu_topology(nvml: Any = None, sys_root: Path = SYS) -> dict[str, Any]:
    """GPU<->GPU link matrix, NVLink pairs, each GPU's NUMA node and CPU list, and its local NICs."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError as error:
            return {"available": False, "reason": f"unknown: pynvml is not installed ({error})"}
    try:
        nvml.nvmlInit()
    except Exception as error:  # NVMLError, or a broken binding raising anything else
        return {"available": False, "reason": f"unknown: NVML not available: {error}"}
    try:
        return _gpu_topology(nvml, sys_root)
    except Exception as error:  # a binding without a topology call must not hide the rest of doctor
        return {"available": False, "reason": f"unknown: NVML topology query failed: {error!r}"}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as error:
            log.debug("nvmlShutdown failed: %s", error)


def _gpu_topology(nvml: Any, sys_root: Path) -> dict[str, Any]:
    count = int(nvml.nvmlDeviceGetCount())
    handles = [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
    bus_ids = []
    for handle in handles:
        bus = nvml.nvmlDeviceGetPciInfo(handle).busId
        bus_ids.append(bus.decode() if isinstance(bus, bytes) else str(bus))
    gpus: list[dict[str, Any]] = []
    for index, handle in enumerate(handles):
        numa = _pci_numa(sys_root, bus_ids[index])
        gpus.append({"index": index, "bus_id": bus_ids[index], "numa_node": numa,
                     "nvlinks": _nvlinks(nvml, handle, bus_ids)})
    matrix: list[list[str]] = []
    for i, handle in enumerate(handles):
        row = []
        for j, other in enumerate(handles):
            if i == j:
                row.append("X")
                continue
            links = gpus[i]["nvlinks"].get(bus_ids[j].lower(), 0)
            if links:
                row.append(f"NV{links}")
                continue
            try:
                level = nvml.nvmlDeviceGetTopologyCommonAncestor(handle, other)
                row.append(NVML_LEVELS.get(int(level), f"level {level}"))
            except Exception as error:  # an NVML error for this pair only
                row.append(f"unknown: {error}")
        matrix.append(row)
    return {"available": True, "gpu_count": count, "gpus": gpus, "matrix": matrix}


def _nvlinks(nvml: Any, handle: Any, bus_ids: list[str]) -> dict[str, int]:
    """Active NVLinks of one GPU by the PCI bus id of the GPU at their other end."""
    links: dict[str, int] = {}
    known = {bus.lower() for bus in bus_ids}
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if not nvml.nvmlDeviceGetNvLinkState(handle, link):
                continue
            remote = nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId
        except Exception:  # no such link, or NVLink unsupported: no NVLink on this index
            continue
        remote = (remote.decode() if isinstance(remote, bytes) else str(remote)).lower()
        if remote in known:  # NVSwitch ports answer with the switch's id, counted apart below
            links[remote] = links.get(remote, 0) + 1
        else:
            links["nvswitch"] = links.get("nvswitch", 0) + 1
    return links


def topology(nvml: Any = None, sys_root: Path = SYS) -> dict[str, Any]:
    cpu = cpu_topology(sys_root)
    gpu = gpu_topology(nvml, sys_root)
    network = nics(sys_root)
    if gpu.get("available"):
        for device in gpu["gpus"]:
            device["local_nics"] = ([nic["name"] for nic in network if nic["numa_node"] == device["numa_node"]]
                                    if device["numa_node"] is not None else None)
    return {"cpu": cpu, "gpu": gpu, "nics": network, "metrics": topology_metrics(gpu, cpu)}


def topology_metrics(gpu: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    """Gate-able figures; absent (None, with the reason under ``unknown``) when there is nothing to count."""
    unknown: dict[str, Optional[str]] = {}
    metrics: dict[str, Any] = {"sockets": len(cpu["sockets"]) if cpu.get("available") else None,
                               "numa_nodes": len(cpu["numa_nodes"]) if cpu.get("numa_nodes") else None}
    if metrics["sockets"] is None:
        unknown["sockets"] = cpu.get("reason", "unknown")
    if metrics["numa_nodes"] is None:
        unknown["numa_nodes"] = cpu.get("numa_reason") or cpu.get("reason", "unknown")
    count = gpu.get("gpu_count") if gpu.get("available") else None
    if count is not None and count >= 2:
        matrix = gpu["matrix"]
        metrics["nvlink_pairs"] = sum(1 for i in range(count) for j in range(i + 1, count)
                                      if matrix[i][j].startswith("NV"))
        # through NVSwitch, every GPU with an active link reaches every other one
        switched = [device for device in gpu["gpus"] if device["nvlinks"].get("nvswitch")]
        if len(switched) == count and not metrics["nvlink_pairs"]:
            metrics["nvlink_pairs"] = count * (count - 1) // 2
    else:
        metrics["nvlink_pairs"] = None
        unknown["nvlink_pairs"] = (gpu.get("reason") if not gpu.get("available")
                                   else f"{count} GPU(s): no GPU pair to link")
    if count:
        placed = [device for device in gpu["gpus"] if device.get("local_nics") is not None]
        metrics["gpus_on_local_nic"] = sum(1 for device in placed if device["local_nics"])
        metrics["gpus_without_local_nic"] = len(placed) - metrics["gpus_on_local_nic"]
        if len(placed) < count:
            unknown["gpus_on_local_nic"] = f"{count - len(placed)} GPU(s) have no readable NUMA node"
    else:
        metrics["gpus_on_local_nic"] = metrics["gpus_without_local_nic"] = None
        unknown["gpus_on_local_nic"] = gpu.get("reason") or "no GPU"
        unknown["gpus_without_local_nic"] = unknown["gpus_on_local_nic"]
    if unknown:
        metrics["unknown"] = unknown
    return metrics


# -- presentation -----------------------------------------------------------------------------------

def matrix_rows(document: dict[str, Any]) -> list[dict[str, str]]:
    gpu = document["gpu"]
    if not gpu.get("available"):
        return []
    rows = []
    for index, row in enumerate(gpu["matrix"]):
        device = gpu["gpus"][index]
        entry = {"": f"GPU{index}"}
        entry.update({f"GPU{j}": value for j, value in enumerate(row)})
        entry["NUMA"] = "unknown" if device["numa_node"] is None else str(device["numa_node"])
        nics_here = device.get("local_nics")
        entry["local NICs"] = "unknown" if nics_here is None else (", ".join(nics_here) or "none")
        rows.append(entry)
    return rows


def cpu_rows(document: dict[str, Any]) -> list[dict[str, str]]:
    cpu = document["cpu"]
    if not cpu.get("available"):
        return [{"item": "CPU topology", "value": cpu["reason"]}]
    rows = [("sockets", "; ".join(f"socket {s['socket']}: CPUs {s['cpus']}" for s in cpu["sockets"])),
            ("cores / CPUs", f"{cpu['cores']} / {cpu['cpus']}")]
    for node in cpu["numa_nodes"] or []:
        rows.append((f"NUMA node {node['node']}", f"CPUs {node['cpus']}, {node['memory_GB']} GB"))
    if not cpu["numa_nodes"]:
        rows.append(("NUMA", cpu["numa_reason"]))
    for cache in cpu["caches"] or []:
        rows.append((f"L{cache['level']} {cache['type']}", f"{cache['size']}, shared by CPUs {cache['shared_by_cpus']}"))
    for nic in document["nics"]:
        rows.append((f"NIC {nic['name']}", f"NUMA node {'unknown' if nic['numa_node'] is None else nic['numa_node']}"
                                          f" ({nic['device']})"))
    return [{"item": item, "value": value} for item, value in rows]


def picture(document: dict[str, Any]) -> Optional[bytes]:
    """A PNG: one box per NUMA node holding its CPUs, GPUs and NICs; NVLink pairs as lines."""
    from matplotlib.patches import FancyBboxPatch

    from gonogo.plots import new_figure, to_png

    cpu, gpu = document["cpu"], document["gpu"]
    nodes = [node["node"] for node in cpu.get("numa_nodes") or []] or [None]
    figure, axes = new_figure(7.0, 1.8 + 1.2 * len(nodes))
    axes.set_axis_off()
    positions: dict[int, tuple[float, float]] = {}
    for row, node in enumerate(nodes):
        y = len(nodes) - 1 - row
        axes.add_patch(FancyBboxPatch((0.02, y + 0.08), 0.96, 0.84, boxstyle="round,pad=0.01", fill=False))
        info = next((n for n in cpu.get("numa_nodes") or [] if n["node"] == node), None)
        label = (f"NUMA {node}: CPUs {info['cpus']}, {info['memory_GB']} GB" if info
                 else "NUMA: unknown")
        axes.text(0.04, y + 0.8, label, fontsize=8, va="top")
        items = [(f"GPU{d['index']}", "tab:green", d["index"]) for d in gpu.get("gpus", []) if d["numa_node"] == node]
        items += [(nic["name"], "tab:blue", None) for nic in document["nics"] if nic["numa_node"] == node]
        for column, (name, color, index) in enumerate(items):
            x = 0.08 + column * (0.88 / max(1, len(items)))
            axes.text(x, y + 0.35, name, fontsize=8, color="white", va="center",
                      bbox={"boxstyle": "round", "facecolor": color})
            if index is not None:
                positions[index] = (x + 0.03, y + 0.35)
    for i, row in enumerate(gpu.get("matrix", [])):
        for j, value in enumerate(row):
            if j > i and value.startswith("NV") and i in positions and j in positions:
                (x1, y1), (x2, y2) = positions[i], positions[j]
                axes.plot([x1, x2], [y1, y2], color="tab:green", linewidth=1, alpha=0.6)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, len(nodes))
    axes.set_title("topology: NUMA nodes, GPUs (green, NVLink lines), NICs (blue)", fontsize=9)
    return to_png(figure)
