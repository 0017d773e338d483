"""The training loop's metrics part: log windows, events.jsonl lines, TensorBoard, the MLPerf log.

``Telemetry`` is what the loop calls: it adds up each log window (loss, step time, MoE routing),
makes the ranks agree on it every ``log_every`` steps, runs the validation the loop hands it every
``val_every`` steps, writes the lines and the MLPerf log (gonogo.train.mlperf), and gives the
stage metrics at the end. Below it, the pieces it uses:

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
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from gonogo.events import write_event

if TYPE_CHECKING:
    from gonogo.parallel import World
    from gonogo.train.job import Job

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
        write_event(self.events_path, self.stage, rank=self.rank, step=step, **metrics)
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
    # pci_bus_id / pci_device_id exist at runtime (torch's C++ properties) but not in its stubs
    bus_id = (f"{getattr(properties, 'pci_domain_id', 0):08X}:"
              f"{properties.pci_bus_id:02X}:"  # type: ignore[attr-defined]
              f"{properties.pci_device_id:02X}.0")  # type: ignore[attr-defined]
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


# -- the part the loop calls ------------------------------------------------------------------------

class Window:
    """What happened since the last log step, on this rank."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: Any = 0.0
        self.micro_batches = 0
        self.seconds = 0.0
        self.steps = 0
        self.expert_counts: Optional[list[Any]] = None

    def add_counts(self, counts: list[Any]) -> None:
        if not counts:
            return
        if self.expert_counts is None:
            self.expert_counts = [c.detach().clone().long() for c in counts]
        else:
            for total, layer in zip(self.expert_counts, counts):
                total += layer


class Telemetry:
    """Windows, writers and the MLPerf log of one training attempt (see the module doc).

    Set-up is a collective (every rank's process id, for the CPU utilisation), and so are
    ``log`` and ``close``: every rank calls them at the same steps.
    """

    HISTORY = ("utilization_pct", "tokens_per_second", "mfu")

    def __init__(self, job: Job, world: World, accumulation: int, start_step: int):
        from gonogo.model.flops import flops_per_token
        from gonogo.train.peak import measured_peak

        self.job, self.world, self.settings = job, world, job.config.train
        self.accumulation = accumulation
        self.writer = MetricsWriter(job.run_dir / "events.jsonl", job.stage, world.rank,
                                    job.tensorboard_dir if world.rank == 0 else None)
        pids = node_pids(world)
        self.flops = flops_per_token(job.config.model, self.settings.seq_len)
        self.peak: Optional[dict[str, Any]] = None
        self.utilization: Any = None
        self.mlperf: Any = None
        if world.rank == 0:
            self.peak = measured_peak(world.device.type, self.settings.precision)
            self.utilization = make_utilization(world.device.type, world.local_rank, pids)
            if start_step == 0 and not self.settings.init_from:  # mlperf.log times pretraining only
                self.mlperf = open_mlperf(job, world)
        self.history: dict[str, list[float]] = {key: [] for key in self.HISTORY}
        self.last_loss: Optional[float] = None
        self.last_val: Optional[float] = None
        self.fractions: list[list[float]] = []
        self.window = Window()
        self.peak_memory: Optional[int] = None

    def start(self) -> None:
        """The first step is next: the MLPerf run starts, the first utilisation window too."""
        if self.mlperf:
            self.mlperf.run_start()
            self.mlperf.block_start(samples_count=0)
        if self.utilization is not None:
            self.utilization.sample()

    def add_micro_batch(self, loss: Any, expert_counts: Optional[list[Any]]) -> None:
        self.window.loss_sum += loss.detach()  # a tensor: no device sync per micro-batch
        self.window.micro_batches += 1
        if expert_counts is not None:
            self.window.add_counts(expert_counts)

    def step_done(self, seconds: float) -> None:
        self.window.seconds += seconds
        self.window.steps += 1

    def is_log_step(self, step: int) -> bool:
        return step % self.settings.log_every == 0 or self._is_validation_step(step)

    def _is_validation_step(self, step: int) -> bool:
        return step == self.settings.steps or bool(self.settings.val_every and step % self.settings.val_every == 0)

    def log(self, step: int, *, lr: float, grad_norm: float, validate: Callable[[], float]) -> None:
        """The ranks agree on the window; at a validation step ``validate()`` runs (every rank)."""
        settings = self.settings
        record = self._agree_on_window()
        record.update(lr=lr, grad_norm=grad_norm)
        self.last_loss = record["loss"]
        if "expert_fractions" in record:
            self.fractions = record["expert_fractions"]
        if self._is_validation_step(step):
            samples = step * settings.global_batch_size
            if self.mlperf:
                self.mlperf.block_stop(samples_count=samples)
            eval_started_ms = int(time.time() * 1000)
            self.last_val = validate()
            record["val_loss"] = self.last_val
            if self.mlperf:
                reached = self.mlperf.eval(samples, self.last_val, eval_started_ms)
                if not reached and step < settings.steps:
                    self.mlperf.block_start(samples_count=samples)
        if self.world.rank != 0:
            self.writer.write(step, step_time_s_rank=record["step_time_s_rank"],
                              tokens_per_second_rank=record["tokens_per_second_rank"])
        else:
            for key in self.history:
                if record.get(key) is not None:
                    self.history[key].append(record[key])
            self.writer.write(step, **record)
            print_progress(step=step, steps=settings.steps, loss=record["loss"], val_loss=record.get("val_loss"),
                           tokens_per_second=record["tokens_per_second"])
        self.window.reset()

    def checkpoint_blocked(self, step: int, seconds: float) -> None:
        if self.world.rank == 0:
            self.writer.write(step, checkpoint_blocked_s=seconds)

    def close(self) -> None:
        """The peak memory over the ranks (a collective), then the writers and the MLPerf log."""
        import torch
        import torch.distributed as dist

        device_type = self.world.device.type
        peak_memory = torch.tensor([peak_memory_bytes(device_type)], device=self.world.device)
        dist.all_reduce(peak_memory, op=dist.ReduceOp.MAX)
        self.peak_memory = int(peak_memory.item())
        self.writer.write(self.settings.steps, peak_memory_bytes_rank=peak_memory_bytes(device_type))
        self.writer.close()
        if self.mlperf:
            self.mlperf.stop("aborted", self.settings.steps * self.settings.global_batch_size)  # no-op on success
            self.mlperf.close()

    def summary(self) -> dict[str, Any]:
        """The stage metrics this part measured (rank 0, after ``close``)."""
        from gonogo.model.flops import parameter_counts

        settings, world = self.settings, self.world
        steady = self.history["tokens_per_second"][1:] or self.history["tokens_per_second"]
        steady_mfu = self.history["mfu"][1:] or self.history["mfu"]
        steady_util = self.history["utilization_pct"][1:] or self.history["utilization_pct"]
        time_to_target = self.mlperf.time_to_target_s if self.mlperf else None
        counts = parameter_counts(self.job.config.model)
        result: dict[str, Any] = {
            "final_loss": self.last_loss,
            "val_loss": self.last_val,
            "tokens_per_second": statistics.median(steady) if steady else None,
            "tokens_per_second_per_rank": statistics.median(steady) / world.world_size if steady else None,
            "mfu": statistics.median(steady_mfu) if steady_mfu else None,
            "peak_memory_bytes": self.peak_memory,
            "utilization_pct": statistics.median(steady_util) if steady_util else None,
            "time_to_target_s": time_to_target,
            # unknown without a target, or in a resumed attempt (mlperf.log times pretraining from step 0)
            "reached_target": ((time_to_target is not None) if self.mlperf and settings.target_val_loss is not None
                               else None),
            "target_val_loss": settings.target_val_loss,
            "steps": settings.steps,
            "world_size": world.world_size,
            "device": world.device.type,
            "precision": settings.precision,
            "parallel": settings.parallel,
            "compiled": settings.compile,
            "expert_parallel": settings.expert_parallel,
            "flops_per_token": self.flops,
            "peak_flops": self.peak["flops"] if self.peak else None,
            "peak_source": self.peak["source"] if self.peak else None,
            "parameters": counts["total"],
            "active_parameters": counts["active"],
        }
        if self.job.config.model.moe is not None:
            result["moe_load_imbalance"] = load_imbalance(self.fractions)
            result["expert_fractions"] = self.fractions
        return result

    def _agree_on_window(self) -> dict[str, Any]:
        """Agree over the ranks on the window's loss and timing; the metrics of one log line."""
        import torch
        import torch.distributed as dist

        window, world, settings = self.window, self.world, self.settings
        sums = torch.tensor([float(window.loss_sum) / max(1, window.micro_batches)], dtype=torch.float64,
                            device=world.device)
        dist.all_reduce(sums)
        slowest = torch.tensor([window.seconds], dtype=torch.float64, device=world.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        step_time = window.seconds / max(1, window.steps)
        tokens_rank = settings.micro_batch_size * self.accumulation * settings.seq_len / step_time
        # the global rate is set by the slowest rank: every step waits for it
        tokens_per_step = settings.global_batch_size * settings.seq_len
        tokens_global = tokens_per_step * window.steps / float(slowest.item())
        record: dict[str, Any] = {"loss": float(sums.item()) / world.world_size,
                                  "tokens_per_second": tokens_global,
                                  "step_time_s": float(slowest.item()) / max(1, window.steps)}
        if window.expert_counts is not None:
            counts = [c.to(world.device) for c in window.expert_counts]
            for layer in counts:
                dist.all_reduce(layer)
            fractions = expert_fractions(counts)
            record["expert_fractions"] = fractions
            record["moe_load_imbalance"] = load_imbalance(fractions)
        # every rank's own line: its step time and tokens/s (stragglers show here)
        record["step_time_s_rank"] = step_time
        record["tokens_per_second_rank"] = tokens_rank
        if world.rank != 0:
            return record
        if self.peak:
            devices = world.world_size if world.device.type == "cuda" else world.nodes
            record["mfu"] = tokens_global * self.flops / (self.peak["flops"] * devices)
        if self.utilization is not None:
            record["utilization_pct"] = self.utilization.sample()
        record["peak_memory_bytes"] = peak_memory_bytes(world.device.type)
        return record


def node_pids(world: World) -> list[int]:
    """Process ids of every rank on this rank's machine (for the CPU utilisation); a collective."""
    import socket

    import torch.distributed as dist

    entries: list[Any] = [None] * world.world_size
    dist.all_gather_object(entries, (socket.gethostname(), os.getpid()))
    host = socket.gethostname()
    return [pid for name, pid in entries if name == host]


def open_mlperf(job: Job, world: World):
    from gonogo.train.config import gradient_accumulation
    from gonogo.train.mlperf import MlperfLog
    from gonogo.train.peak import device_name

    settings = job.config.train
    eval_samples = settings.val_batches * settings.micro_batch_size * world.world_size
    return MlperfLog(job.run_dir / "mlperf.log", platform=f"{world.world_size}x {device_name(world.device.type)}",
                     config_filename=job.config_filename, precision=settings.precision,
                     expert_parallelism=settings.expert_parallel, micro_batch_size=settings.micro_batch_size,
                     global_batch_size=settings.global_batch_size, seq_len=settings.seq_len,
                     train_samples=settings.steps * settings.global_batch_size, eval_samples=eval_samples,
                     target=settings.target_val_loss,
                     params={"opt_base_learning_rate": settings.lr, "opt_learning_rate_warmup_steps": settings.warmup_steps,
                             "gradient_accumulation_steps": gradient_accumulation(settings, world.world_size)})
