"""Topology map: GPU links from (fake) NVML, NUMA placement from a fake /sys, the real /sys here,
and gates on NVLink pairs and GPUs without a NIC on their NUMA node."""

from __future__ import annotations

import os
import types
from pathlib import Path

import gonogo.stages.doctor.stage as doctor
from gonogo.cluster import topology
from gonogo.gates import parse_gate

BUS = ["00000000:18:00.0", "00000000:2A:00.0", "00000000:9A:00.0", "00000000:AB:00.0"]


class FakeTopologyNVML:
    """4 GPUs: 0-1 and 2-3 joined by 2 NVLinks each; 0,1 on NUMA 0, 2,3 on NUMA 1."""

    NVML_NVLINK_MAX_LINKS = 4

    def __init__(self, links=None):
        self.links = links if links is not None else {0: [1, 1], 1: [0, 0], 2: [3, 3], 3: [2, 2]}

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetPciInfo(self, handle):
        return types.SimpleNamespace(busId=BUS[handle].encode())

    def nvmlDeviceGetNvLinkState(self, handle, link):
        if link >= len(self.links.get(handle, [])):
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle, link):
        return types.SimpleNamespace(busId=BUS[self.links[handle][link]])

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return 40 if (a < 2) == (b < 2) else 50  # NODE inside a socket, SYS across


def fake_sys(root: Path, nic_node: int = 1) -> Path:
    for cpu in range(4):
        folder = root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(str(cpu // 2))
        (folder / "core_id").write_text(str(cpu % 2))
    cache = root / "devices" / "system" / "cpu" / "cpu0" / "cache" / "index0"
    cache.mkdir(parents=True)
    for name, value in (("level", "3"), ("type", "Unified"), ("size", "32768K"), ("shared_cpu_list", "0-1")):
        (cache / name).write_text(value)
    for node in (0, 1):
        folder = root / "devices" / "system" / "node" / f"node{node}"
        folder.mkdir(parents=True)
        (folder / "cpulist").write_text(f"{2 * node}-{2 * node + 1}")
        (folder / "meminfo").write_text(f"Node {node} MemTotal:       16000000 kB\n")
    for index, bus in enumerate(BUS):
        folder = root / "bus" / "pci" / "devices" / ("0000:" + bus.split(":", 1)[1].lower())
        folder.mkdir(parents=True)
        (folder / "numa_node").write_text(str(index // 2))
    nic_device = root / "devices" / "pci0000:80" / "0000:80:01.0"
    nic_device.mkdir(parents=True)
    (nic_device / "numa_node").write_text(str(nic_node))
    (root / "class" / "infiniband" / "mlx5_0").mkdir(parents=True)
    os.symlink(nic_device, root / "class" / "infiniband" / "mlx5_0" / "device")
    return root


def test_matrix_nvlink_pairs_and_local_nics_from_fake_nvml_and_sys(tmp_path):
    document = topology.topology(FakeTopologyNVML(), fake_sys(tmp_path))
    matrix = document["gpu"]["matrix"]
    assert matrix[0] == ["X", "NV2", "SYS", "SYS"] and matrix[2][3] == "NV2" and matrix[3] == ["SYS", "SYS", "NV2", "X"]
    metrics = document["metrics"]
    assert metrics["nvlink_pairs"] == 2 and metrics["sockets"] == 2 and metrics["numa_nodes"] == 2
    # the only NIC is on NUMA 1: GPUs 2 and 3 have it locally, 0 and 1 cross the socket link
    assert metrics["gpus_on_local_nic"] == 2 and metrics["gpus_without_local_nic"] == 2
    rows = topology.matrix_rows(document)
    assert rows[0]["GPU1"] == "NV2" and rows[0]["local NICs"] == "none" and rows[3]["local NICs"] == "mlx5_0"
    assert parse_gate("nvlink_pairs >= 2").evaluate(metrics).passed
    assert not parse_gate("gpus_without_local_nic == 0").evaluate(metrics).passed   # degraded: NO-GO
    assert not parse_gate("nvlink_pairs >= 6").evaluate(metrics).passed             # a missing link: NO-GO
    png = topology.picture(document)
    assert png.startswith(b"\x89PNG")


def test_a_link_down_lowers_the_pairs(tmp_path):
    nvml = FakeTopologyNVML(links={0: [1, 1], 1: [0, 0], 2: [], 3: []})
    document = topology.topology(nvml, fake_sys(tmp_path))
    assert document["metrics"]["nvlink_pairs"] == 1
    assert document["gpu"]["matrix"][2][3] == "NODE"  # same socket, PCIe through the host bridges


def test_real_sys_here_and_no_gpu_is_unknown_not_zero():
    document = topology.topology(types.SimpleNamespace(nvmlInit=_no_driver), Path("/sys"))
    cpu = document["cpu"]
    assert cpu["available"] and cpu["cpus"] >= 1 and cpu["sockets"]
    assert cpu["caches"] and any(cache["level"] for cache in cpu["caches"])
    metrics = document["metrics"]
    assert metrics["nvlink_pairs"] is None and metrics["gpus_on_local_nic"] is None
    assert metrics["unknown"]["nvlink_pairs"].startswith("unknown: NVML not available")
    assert topology.cpu_rows(document)[0]["item"] == "sockets"


def _no_driver():
    raise RuntimeError("NVML Shared Library Not Found")


def test_doctor_declares_and_reports_the_topology(tmp_path):
    assert {"nvlink_pairs", "gpus_on_local_nic", "gpus_without_local_nic", "numa_nodes", "sockets"} <= \
        doctor.METRIC_NAMES
    assert topology.parse_cpulist("0-2,5") == [0, 1, 2, 5]
