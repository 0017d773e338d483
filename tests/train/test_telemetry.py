from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

from gonogo.train import peak
from gonogo.train import telemetry as metrics


def test_cpu_utilisation_sees_a_busy_process():
    meter = metrics.CpuUtilization([os.getpid()])
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # spin one core
        pass
    share = meter.sample()
    # one spinning thread of `cores` cores; other test processes may steal some of it
    assert 10.0 <= share <= 100.0 / meter.cores + 5.0


def test_cpu_utilisation_of_processes_it_cannot_read_is_unknown_not_zero():
    meter = metrics.CpuUtilization([2 ** 22 + 17])  # above Linux's pid_max: never a live process
    time.sleep(0.01)
    assert meter.sample() is None


def test_expert_fractions_and_imbalance():
    fractions = metrics.expert_fractions([torch.tensor([10, 10, 10, 10]), torch.tensor([40, 0, 0, 0])])
    assert fractions[0] == [0.25] * 4 and fractions[1] == [1.0, 0.0, 0.0, 0.0]
    assert metrics.load_imbalance(fractions) == pytest.approx((1.0 + 4.0) / 2)
    assert metrics.load_imbalance([]) is None


def test_progress_line_round_trip():
    line = metrics.PROGRESS_PREFIX + json.dumps({"step": 3, "loss": 1.5})
    assert metrics.parse_progress(line) == {"step": 3, "loss": 1.5}
    assert metrics.parse_progress("some other output") is None


def test_events_lines_carry_stage_rank_step(tmp_path):
    writer = metrics.MetricsWriter(tmp_path / "events.jsonl", "pretrain", rank=1)
    writer.write(5, loss=2.0, tokens_per_second=100.0)
    writer.close()
    record = json.loads((tmp_path / "events.jsonl").read_text())
    assert {"time", "stage", "rank", "step", "loss"} <= record.keys()
    assert (record["stage"], record["rank"], record["step"]) == ("pretrain", 1, 5)


def test_peak_is_the_best_probe_so_far(tmp_path, monkeypatch):
    """A probe taken on a busy machine reads low; a later, better probe replaces it, a worse one doesn't."""
    rates = iter([1.0e11, 0.4e11, 3.0e11])
    seconds = []

    def fake_probe(device_type, precision, **options):
        seconds.append(options["seconds"])
        return next(rates)

    monkeypatch.setattr(peak, "probe_gemm", fake_probe)
    cache = tmp_path / "peak.json"
    cores = len(os.sched_getaffinity(0))  # on CPU: one core's probe times the cores this process may use
    first = peak.measured_peak("cpu", "bf16", cache)
    busy = peak.measured_peak("cpu", "bf16", cache)
    faster = peak.measured_peak("cpu", "bf16", cache)
    assert first["flops"] == 1.0e11 * cores and first["source"] == "measured"
    assert busy["flops"] == 1.0e11 * cores and busy["source"].startswith("cached")
    assert faster["flops"] == 3.0e11 * cores and faster["source"] == "measured"
    assert seconds[1] < seconds[0]   # the re-probe is short
    (key,) = json.loads(cache.read_text())
    assert torch.__version__ in key and peak.cpu_model() in key


def test_real_gemm_probe_measures_a_positive_rate():
    assert peak.probe_gemm("cpu", "fp32", sizes=(128,), seconds=0.05, window=0.01) > 1e7  # 10 MFLOP/s: alive even on a loaded machine


def test_known_gpu_peaks_match_the_longest_name():
    assert peak.known_gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak.known_gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak.known_gpu_peak("Some Future GPU", "bf16") is None


def test_gpu_utilisation_reads_the_visible_gpus_by_uuid_over_the_whole_node(monkeypatch):
    from types import SimpleNamespace

    # a 4-GPU machine with CUDA_VISIBLE_DEVICES=3,1: CUDA's device 0 is NVML's GPU 3
    busy = {0: 0.0, 1: 40.0, 2: 0.0, 3: 90.0}
    nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetHandleByUUID=lambda uuid: int(uuid.removeprefix("GPU-uuid-")),
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=busy[handle]))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    visible = [3, 1]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(uuid=f"uuid-{visible[index]}", pci_bus_id=0, pci_device_id=0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")

    utilization = metrics.make_utilization("cuda", 0, [])
    assert utilization.sample() == pytest.approx(65.0)  # rank 0's GPU 90 %, rank 1's 40 %
    assert utilization.per_gpu == [90.0, 40.0]


def test_a_slow_kernel_keeps_the_probe_near_its_time_budget(monkeypatch):
    """A GEMM fallback that takes longer than the probe's share is timed once, not at larger sizes."""
    import time

    import torch

    from gonogo.train import peak

    sizes_seen = []
    real_randn = torch.randn

    def slow_randn(*shape, **kwargs):
        sizes_seen.append(shape[0])
        return real_randn(*shape, **kwargs)

    monkeypatch.setattr(torch, "randn", slow_randn)
    started = time.perf_counter()
    # a budget far below one 512² product: each kernel is timed by its warm-up product alone
    flops = peak.probe_gemm("cpu", "fp32", sizes=(512, 4096), seconds=1e-6, window=1e-6)
    assert flops > 0
    assert 4096 not in sizes_seen  # a 4096² product would have been ~1 s on one core
    assert time.perf_counter() - started < 5
