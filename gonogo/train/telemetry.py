"""Training metrics: events.jsonl lines, TensorBoard scalars, utilisation and memory.

Every rank appends its own lines to ``<run>/events.jsonl`` (step time and tokens/s per rank);
rank 0 adds the global line (loss, val loss, lr, grad norm, global tokens/s, MFU, utilisation,
expert fractions) and mirrors it to TensorBoard under ``stages/<name>/tb/``. Rank 0 also prints
one ``PROGRESS_PREFIX`` line per log step for the parent's progress bar.

Utilisation in steady state:
- GPU: NVML's "GPU busy" percentage, sampled at each log step.
- CPU: the training processes' share of the cores this node may use, from the user+system
  CPU time in ``/proc/<pid>/stat`` of every worker on the node, between two log steps:
  ``100 * sum(cpu seconds) / (wall seconds * cores)``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from gonogo.rundir import append_jsonl

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "gonogo-progress "


class MetricsWriter:
    def __init__(self, events_path: Path, stage: str, rank: int, tb_dir: Optional[Path] = None):
        self.events_path = events_path
        self.stage = stage
        self.rank = rank
        self.tb = None
        if tb_dir is not None and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra; events.jsonl has everything
                log.warning("tensorboard is not installed; no TensorBoard files are written")
            else:
                self.tb = SummaryWriter(log_dir=str(tb_dir))

    def write(self, step: int, **metrics: Any) -> None:
        record = {"time": time.time(), "stage": self.stage, "rank": self.rank, "step": step, **metrics}
        append_jsonl(self.events_path, record)
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
                elif key == "expert_fractions":
                    # per MoE layer: the busiest expert's share and the spread of all of them
                    for layer, fractions in enumerate(value):
                        self.tb.add_scalar(f"expert_fraction_max/layer{layer}", max(fractions), step)
                        self.tb.add_histogram(f"expert_fractions/layer{layer}", _tensor(fractions), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _tensor(values: list[float]):
    import torch

    return torch.tensor(values)


def print_progress(**fields: Any) -> None:
    """One machine-readable line for the parent's progress bar (rank 0 only)."""
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(fields) + "\n")
    sys.stdout.flush()


def parse_progress(line: str) -> Optional[dict[str, Any]]:
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return json.loads(line[len(PROGRESS_PREFIX):])
    except ValueError:
        return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # the command name (field 2) may contain spaces; the fields after it are fixed
    fields = text[text.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuUtilization:
    """Share of this node's cores used by the given processes between two ``sample()`` calls."""

    def __init__(self, pids: Sequence[int]):
        self.pids = list(pids)
        self.cores = len(os.sched_getaffinity(0))
        self._last = self._read()

    def _read(self) -> tuple[float, Optional[float]]:
        total, read = 0.0, 0
        for pid in self.pids:
            try:
                total += _cpu_seconds(pid)
                read += 1
            except (OSError, ValueError, IndexError):
                pass  # a worker that already exited adds nothing
        # no process readable (no /proc): utilisation unknown, not 0 %
        return time.monotonic(), (total if read else None)

    def sample(self) -> Optional[float]:
        now, cpu = self._read()
        wall = now - self._last[0]
        previous = self._last[1]
        self._last = (now, cpu)
        if wall <= 0 or cpu is None or previous is None:
            return None
        used = cpu - previous
        return 100.0 * used / (wall * self.cores)


def nvml_handle(nvml: Any, device_index: int) -> Any:
    """NVML's handle of the CUDA device ``device_index`` as this process numbers it.

    NVML numbers every GPU of the machine and ignores CUDA_VISIBLE_DEVICES, so its index i is
    not CUDA's device i; the device's UUID (then its PCI bus id) names the same GPU for both.
    """
    import torch

    properties = torch.cuda.get_device_properties(device_index)
    uuid = getattr(properties, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return nvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}")
    bus_id = (f"{getattr(properties, 'pci_domain_id', 0):08X}:{properties.pci_bus_id:02X}:"
              f"{properties.pci_device_id:02X}.0")
    return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)


class GpuUtilization:
    """NVML's GPU-busy percentage of every GPU this node's ranks use, summarised over them."""

    def __init__(self, device_indices: Sequence[int]):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [nvml_handle(pynvml, index) for index in device_indices]
        self.per_gpu: list[float] = []   # of the last sample, in device order

    def sample(self) -> Optional[float]:
        """The mean over the node's GPUs (``per_gpu`` keeps each one)."""
        self.per_gpu = [float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu) for handle in self._handles]
        return sum(self.per_gpu) / len(self.per_gpu) if self.per_gpu else None


def make_utilization(device_type: str, local_rank: int, node_pids: Sequence[int],
                     local_world_size: Optional[int] = None):
    """Utilisation of this node: its GPUs (one per local rank) or its cores."""
    if device_type == "cuda":
        if local_world_size is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        try:
            return GpuUtilization(range(local_world_size))
        except Exception as error:  # NVML missing or unsupported: utilisation is then unknown
            log.warning("NVML unavailable, no GPU utilisation: %s", error)
            return None
    return CpuUtilization(node_pids)


def peak_memory_bytes(device_type: str) -> int:
    """Peak memory of this rank: CUDA allocator high-water mark, or the process's max RSS on CPU."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def expert_fractions(counts: Sequence[Any]) -> list[list[float]]:
    """Per MoE layer, each expert's share of the routed tokens (counts: LongTensor per layer)."""
    fractions = []
    for layer_counts in counts:
        values = [float(v) for v in layer_counts.tolist()]
        total = sum(values)
        fractions.append([v / total if total else 0.0 for v in values])
    return fractions


def load_imbalance(fractions: Sequence[Sequence[float]]) -> Optional[float]:
    """max/mean expert fraction, averaged over MoE layers (1.0 = perfectly balanced)."""
    ratios = []
    for layer in fractions:
        if layer and sum(layer) > 0:
            mean = sum(layer) / len(layer)
            ratios.append(max(layer) / mean)
    return sum(ratios) / len(ratios) if ratios else None
