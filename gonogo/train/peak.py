"""The peak matmul throughput MFU is measured against.

On a GPU the datasheet's dense peak (a table of known parts) is the usual MFU denominator; a
GPU missing from the table, and every CPU, gets a measured peak instead: a short square GEMM
probe in bf16 and fp32, the best window over a few sizes; on CPU it runs on one core and is
multiplied by the cores the process may use.
Measured peaks are cached in ``~/.cache/gonogo/peak.json`` keyed by the CPU model or GPU name,
the torch version and the thread count. The peak is the best probe so far: each run re-probes
briefly, so a probe taken while other jobs shared the machine is replaced by a better one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from gonogo.rundir import write_json_atomic

log = logging.getLogger(__name__)



def default_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gonogo" / "peak.json"

# Dense (no sparsity) peak FLOP/s from the vendors' datasheets; matched by substring of the
# CUDA device name, longest key first. fp32 is the plain (non-tensor-core) rate.
KNOWN_GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "B200": {"bf16": 2250e12, "fp32": 75e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
    "A10G": {"bf16": 70e12, "fp32": 31.2e12},
}

PROBE_SIZES = (1024, 2048)
PROBE_SECONDS = 1.0   # per size, split into short windows
PROBE_WINDOW = 0.1


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The matrix/vector extensions this CPU reports that decide the bf16 GEMM speed (Linux)."""
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in present]
    except OSError:
        pass
    return []


def known_gpu_peak(name: str, precision: str) -> Optional[float]:
    for key in sorted(KNOWN_GPU_PEAKS, key=len, reverse=True):
        if key in name:
            return KNOWN_GPU_PEAKS[key][precision]
    return None


def probe_gemm(device_type: str, precision: str, sizes=PROBE_SIZES, seconds: float = PROBE_SECONDS,
               window: float = PROBE_WINDOW) -> float:
    """Best measured FLOP/s of a square matmul ``A @ B`` over ``sizes``.

    Each size is timed in short windows and the best window counts: a peak is what the device
    sustains when nothing else runs, and short windows let it show between other jobs' bursts.
    The probe stays near ``seconds``: a kernel whose one product at a size already takes more
    than its share of them is timed by that product alone and not tried at larger sizes (a bf16
    2048² product through an AVX2 CPU's fallback takes ~30 s; rank 0 probing while the other
    ranks wait at a barrier once ran past the 120 s collective timeout).
    """
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device = torch.device(device_type)
    best = 0.0
    # both the plain matmul and the linear layer's kernel: on a CPU without native bf16 (AVX2
    # only) they take different fallbacks, 0.6 vs 3.7 GFLOP/s on one EPYC core, and the model's
    # GEMMs are linear layers; the peak is the faster of the two
    kernels = (lambda a, b: a @ b, F.linear)
    share = seconds / len(kernels)
    too_slow: set[int] = set()  # kernels not worth a larger size
    for n in sorted(sizes):
        for index, kernel in enumerate(kernels):
            if index in too_slow:
                continue
            best = max(best, _probe_one(kernel, n, dtype, device, device_type, share, window, too_slow, index))
    return best


def _probe_one(kernel, n: int, dtype, device, device_type: str, share: float, window: float,
               too_slow: set[int], index: int) -> float:
    """Best FLOP/s of ``kernel`` on n x n operands within about ``share`` seconds."""
    import torch

    best = 0.0
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    started = time.perf_counter()
    kernel(a, b)  # warm up the kernel choice and the caches
    _synchronize(device_type)
    first = time.perf_counter() - started
    if first > share / 2:
        too_slow.add(index)
        return 2.0 * n ** 3 / first
    deadline = time.perf_counter() + share
    while time.perf_counter() < deadline:
        count, start = 0, time.perf_counter()
        while True:
            kernel(a, b)
            count += 1
            _synchronize(device_type)
            elapsed = time.perf_counter() - start
            if elapsed >= window:
                break
        best = max(best, 2.0 * n ** 3 * count / elapsed)
    return best


def _synchronize(device_type: str) -> None:
    if device_type == "cuda":
        import torch

        torch.cuda.synchronize()


def _cache_key(device_type: str, threads: int) -> str:
    import torch

    return f"{device_type}|{device_name(device_type)}|torch {torch.__version__}|cores {threads}|per-core probe, mm+linear"


def measured_peak(device_type: str, precision: str, cache_path: Optional[Path] = None) -> dict[str, Any]:
    """``{"flops": peak FLOP/s of one device, "source": "datasheet"|"measured"|"cached", ...}``.

    On CPU "one device" is the whole machine: one core's probe times the cores this process may
    use (the workers of one node share them), so MFU compares all ranks of a node with it.
    """
    import torch

    assert precision in ("bf16", "fp32")
    cache_path = cache_path or default_cache_path()
    name = device_name(device_type)
    if device_type == "cuda":
        known = known_gpu_peak(name, precision)
        if known is not None:
            return {"flops": known, "source": "datasheet", "device": name, "precision": precision}
    threads = len(os.sched_getaffinity(0)) if device_type == "cpu" else 0
    key = _cache_key(device_type, threads)
    cache = _read_cache(cache_path)
    cached = cache.get(key, {}).get(precision)
    saved_threads = torch.get_num_threads()
    if device_type == "cpu":
        # one core, times the cores: GEMM scales linearly over cores, and a single thread is not
        # stalled by OpenMP barriers when other jobs share the machine (several threads are)
        torch.set_num_threads(1)
    try:
        # with an earlier probe cached, a short one only checks whether the machine got faster
        seconds = PROBE_SECONDS if cached is None else PROBE_SECONDS / 5
        flops = probe_gemm(device_type, precision, seconds=seconds) * (threads if device_type == "cpu" else 1)
    finally:
        torch.set_num_threads(saved_threads)
    log.info("measured %s %s GEMM peak: %.1f GFLOP/s", name, precision, flops / 1e9)
    # a probe taken while other jobs shared the machine reads low: the peak is the best probe so
    # far, so one busy moment can never inflate MFU above what the hardware really does
    source = "measured"
    if cached is not None and cached > flops:
        flops, source = cached, "cached (best earlier probe)"
    cache = _read_cache(cache_path)  # another process may have written meanwhile
    cache.setdefault(key, {})[precision] = max(flops, cache.get(key, {}).get(precision, 0.0))
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_path, cache)
    except OSError as error:  # a read-only home still gets a measured peak, just not cached
        log.warning("could not cache the peak in %s: %s", cache_path, error)
    return {"flops": flops, "source": source, "device": name, "precision": precision}


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
