"""Checkpoint speed: save and load throughput vs the disk's raw fsync'd write, and async blocking.

    python bench/checkpoint.py            # writes bench/results/checkpoint.md

1. Raw: one file of the checkpoint's total size written in 8 MiB chunks, then fsync'd.
2. Sync save: ``Checkpointer.save`` (DCP model + AdamW state, consolidated model.safetensors,
   per-rank files, sha256 manifest, fsyncs, rename) of a ~50 MB model (~200 MB checkpoint).
3. Load: ``Checkpointer.load`` (verifies every sha256, then DCP load into a fresh model).
4. Async: how long ``save`` blocks the loop with async_mode, vs the sync save time; measured in
   one process (thread-based DCP async save) and under torchrun with one rank (the
   process-based async save that training workers use).
Everything is measured side by side in the same run, on the same disk (a temporary directory);
the best of REPEATS is reported. Targets: sync save >= 50% of raw; async blocks <= 25% of sync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quiet import RULE, LoadWatch, machine, verdict  # noqa: E402
from gonogo.cluster.torchrun import free_port, torchrun_env  # noqa: E402
from gonogo.model.config import ModelConfig  # noqa: E402
from gonogo.checkpoints import manifest  # noqa: E402
from gonogo.checkpoints.checkpointer import Checkpointer  # noqa: E402

REPEATS = 3
WIDTH, LAYERS = 2048, 3  # 12.6 M parameters: 50 MB of fp32 weights, ~200 MB of checkpoint
CONFIG = ModelConfig()   # only recorded in meta.json


def make_job():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, WIDTH)).sum().backward()
    optimizer.step()  # creates the AdamW moments, so the checkpoint has its real size
    optimizer.zero_grad()
    return model, optimizer


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def raw_write_seconds(path: Path, size: int, seed: int) -> float:
    # fresh random bytes, made before the clock starts: repeated or zero chunks would let a
    # deduplicating or compressing virtual disk look faster than it is for real weights
    data = memoryview(np.random.default_rng(seed).bytes(size))
    chunk = 8 << 20
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for offset in range(0, size, chunk):
            handle.write(data[offset: offset + chunk])
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def measure(work: Path, repeats: int) -> dict:
    model, optimizer = make_job()
    results = {"raw_s": [], "save_s": [], "load_s": [], "async_blocked_s": [], "async_total_s": [],
               "dcp_only_s": [], "hash_s": []}
    size = 0
    asynchronous = Checkpointer(work / "async", async_mode=True, keep_last=1)
    for attempt in range(repeats):
        root = work / f"sync-{attempt}"
        started = time.perf_counter()
        path = Checkpointer(root).save(1, model, optimizer, None, {"position": 1}, {}, CONFIG)
        results["save_s"].append(time.perf_counter() - started)
        size = directory_bytes(path)
        results["raw_s"].append(raw_write_seconds(work / "raw.bin", size, seed=attempt))

        # the two largest parts of a save, alone: DCP's own write, and hashing every file
        started = time.perf_counter()
        dcp.save(dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))),
                 checkpoint_id=str(work / "dcp-only"), no_dist=True)
        results["dcp_only_s"].append(time.perf_counter() - started)
        dcp_bytes = directory_bytes(work / "dcp-only")
        shutil.rmtree(work / "dcp-only")
        started = time.perf_counter()
        manifest.hash_files(path, [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()])
        results["hash_s"].append(time.perf_counter() - started)

        fresh_model, fresh_optimizer = make_job()
        started = time.perf_counter()
        Checkpointer(root).load(path, fresh_model, fresh_optimizer, model_config=CONFIG)
        results["load_s"].append(time.perf_counter() - started)

        # one async checkpointer for all attempts, as in training: its staging memory is reused
        started = time.perf_counter()
        asynchronous.save(attempt + 1, model, optimizer, None, {"position": 1}, {}, CONFIG)
        results["async_blocked_s"].append(time.perf_counter() - started)
        asynchronous.wait()
        results["async_total_s"].append(time.perf_counter() - started)
        shutil.rmtree(root)
    asynchronous.close()
    best = {key: min(values) for key, values in results.items()}
    best["bytes"] = size
    best["dcp_bytes"] = dcp_bytes
    return best


def distributed_main(out: Path, repeats: int) -> None:
    """Under torchrun: the process-based async save, as the training workers use it."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        with tempfile.TemporaryDirectory(prefix="gonogo-bench-") as work:
            result = measure(Path(work), repeats)
    finally:
        dist.destroy_process_group()
    out.write_text(json.dumps(result))


def run_under_torchrun(repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="gonogo-bench-") as work:
        out = Path(work) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{free_port()}", __file__, "--worker", str(out), "--repeats", str(repeats)]
        subprocess.run(command, env=torchrun_env(), check=True, timeout=900, capture_output=True)
        return json.loads(out.read_text())


def gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def report(single: dict, distributed: dict, single_watch: LoadWatch, distributed_watch: LoadWatch) -> str:
    size = single["bytes"]
    lines = [
        "# Checkpoint speed",
        "",
        f"Machine: {machine()}; a temporary directory on the disk of {tempfile.gettempdir()}. Model: {LAYERS} × "
        f"Linear({WIDTH}, {WIDTH}) with AdamW state; checkpoint {size / 1e6:.0f} MB on disk (DCP model + "
        f"optimizer, model.safetensors, manifest). Best of {REPEATS}. Command: `python bench/checkpoint.py`.",
        "",
        f"One process: {single_watch.describe()}. Torchrun: {distributed_watch.describe()}. {RULE}",
        "",
        "| what | seconds | GB/s | vs raw write |",
        "|---|---|---|---|",
        f"| raw write + fsync of {size / 1e6:.0f} MB | {single['raw_s']:.3f} | {gbps(size, single['raw_s']):.2f} | 100% |",
    ]
    for name, result in (("one process", single), ("torchrun, 1 rank", distributed)):
        lines.append(f"| sync save ({name}) | {result['save_s']:.3f} | {gbps(size, result['save_s']):.2f} | "
                     f"{single['raw_s'] / result['save_s']:.0%} |")
        lines.append(f"| load incl. sha256 verification ({name}) | {result['load_s']:.3f} | "
                     f"{gbps(size, result['load_s']):.2f} | {single['raw_s'] / result['load_s']:.0%} |")
    lines += ["", "Where a sync save's time goes (one process):", "",
              "| part | seconds | GB/s |", "|---|---|---|",
              f"| `dcp.save` alone (model + AdamW, {single['dcp_bytes'] / 1e6:.0f} MB) | {single['dcp_only_s']:.3f} | "
              f"{gbps(single['dcp_bytes'], single['dcp_only_s']):.2f} |",
              f"| sha256 of every file of the checkpoint (from the page cache, 4 threads) | {single['hash_s']:.3f} | "
              f"{gbps(size, single['hash_s']):.2f} |"]
    lines += ["", "| async save | blocks the loop (s) | sync save (s) | blocked / sync | until committed (s) |",
              "|---|---|---|---|---|"]
    for name, result in (("thread (one process)", single), ("process (torchrun, 1 rank)", distributed)):
        lines.append(f"| {name} | {result['async_blocked_s']:.3f} | {result['save_s']:.3f} | "
                     f"{result['async_blocked_s'] / result['save_s']:.0%} | {result['async_total_s']:.3f} |")
    save_ratio = single["raw_s"] / single["save_s"]
    async_ratio = distributed["async_blocked_s"] / distributed["save_s"]
    lines += ["", f"Targets: sync save >= 50% of raw: {verdict(save_ratio >= 0.5, single_watch)} ({save_ratio:.0%}); "
              f"process-based async blocks <= 25% of sync: "
              f"{verdict(async_ratio <= 0.25, single_watch, distributed_watch)} ({async_ratio:.0%}).", "",
              "A sync save is more than `dcp.save`: it also writes the consolidated model.safetensors "
              "(the model's bytes a second time), hashes every byte with sha256 (what makes a torn or "
              "corrupt checkpoint detectable; the DCP shards are hashed while model.safetensors is "
              "written), and fsyncs each file and directory. With `dcp.save` alone and the hashing "
              "each taking about as long as the raw write of the whole checkpoint on this machine, "
              "50% of raw is out of reach while every byte is hashed; the async save takes the "
              "whole of it off the training loop.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    if args.worker:
        distributed_main(args.worker, args.repeats)
        return
    with tempfile.TemporaryDirectory(prefix="gonogo-bench-") as work, LoadWatch() as single_watch:
        single = measure(Path(work), args.repeats)
    with LoadWatch() as distributed_watch:
        distributed = run_under_torchrun(args.repeats)
    text = report(single, distributed, single_watch, distributed_watch)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "checkpoint.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
