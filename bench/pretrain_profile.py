"""Where a training step's time goes: torch.profiler over the trainer's own step, in shares.

    python bench/pretrain_profile.py            # writes bench/results/pretrain-profile.md

The step is the one gonogo.train.loop runs (the model built and wrapped by
``gonogo.train.loop.build_model``, the fused AdamW of ``build_optimizer``, the loss of
``language_model_loss``, ``clip_grad_norm`` over the process group), at bench/pretrain.py's
shape, on 1 process (fp32 and bf16) and on 2 processes (gloo, FSDP2, fp32). Each op's *self*
CPU time goes into one bucket (GEMM, attention, elementwise and norms, loss, optimizer,
collectives, other ops); what the step's wall time has beyond the sum of the ops' self times is
Python and dispatch overhead (the profiler's own cost lands there too). Shares, not absolute
times, are what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quiet import LoadWatch, machine  # noqa: E402

BUCKETS = ("GEMM", "attention", "elementwise and norms", "loss", "optimizer", "collectives", "other ops",
           "Python and dispatch")


def bucket(name: str) -> str:
    """The bucket of one profiler op by its name (self time only, so nesting does not count twice)."""
    lowered = name.lower()
    if any(key in lowered for key in ("gloo", "all_gather", "reduce_scatter", "allreduce", "all_reduce",
                                      "c10d", "broadcast", "record_param_comms", "wait_tensor")):
        return "collectives"
    if "scaled_dot_product" in lowered or "flash_attention" in lowered or "attention" in lowered:
        return "attention"
    if any(key in lowered for key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                                      "mkldnn", "aten::baddbmm", "_mkl_linear")):
        return "GEMM"
    if any(key in lowered for key in ("adam", "optimizer", "_foreach", "lerp", "addcdiv", "addcmul")):
        return "optimizer"
    if any(key in lowered for key in ("cross_entropy", "log_softmax", "nll_loss")):
        return "loss"
    if name.startswith("aten::") or "backward" in lowered:
        return "elementwise and norms"
    return "other ops"


def profile_step(precision: str, steps: int, rank: int = 0, world_size: int = 1, shape: list[str] | None = None):
    """Self-time per bucket (seconds, summed over ``steps``), the steps' wall time, the top ops."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from bench.pretrain import SHAPE
    from gonogo.data.loader import PackedLoader
    from gonogo.train.config import load_train_config
    from gonogo.train.loop import build_model, build_optimizer, language_model_loss
    from gonogo.parallel import World, autocast, build_meshes, clip_grad_norm

    micro = 8 // world_size
    config, _ = load_train_config("tiny-dense", (shape or SHAPE) + [f"train.precision={precision}",
                                                                     f"train.micro_batch_size={micro}"])
    world = World(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    build_meshes(world, 1)
    torch.manual_seed(0)
    model = build_model(config.model, config, world)
    optimizer = build_optimizer(model, config.train, world)
    loader = iter(PackedLoader(config.data.open_source("train"), config.train.seq_len, micro, rank, world_size, 0))

    def step() -> None:
        inputs, targets = next(loader)
        with autocast(config, world):
            logits = model(inputs)
        language_model_loss(logits, targets).backward()
        clip_grad_norm(model, 1.0, world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - started
    totals: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        totals[bucket(event.key)] += seconds
        per_op[event.key] += seconds
    # the profiler sees ops of every thread; on CPU the autograd engine runs on this one
    totals["Python and dispatch"] = max(0.0, wall - sum(totals.values()))
    top = sorted(per_op.items(), key=lambda item: -item[1])[:12]
    return dict(totals), wall, top


def _worker(rank: int, world_size: int, precision: str, steps: int, store_path: str, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        result = profile_step(precision, steps, rank, world_size)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run(precision: str, steps: int, world_size: int):
    import torch.multiprocessing as mp

    store = os.path.join(tempfile.mkdtemp(prefix="gonogo-profile-"), "store")
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, world_size, precision, steps, store, queue))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    result = queue.get(timeout=900)
    for process in processes:
        process.join(timeout=60)
    return result


def render(rows, load_before, load_after, steps: int) -> str:
    lines = [
        "# Where a training step's time goes",
        "",
        f"Machine: {machine()}. Load average (1/5/15 min) before: {load_before[0]:.1f} / {load_before[1]:.1f} / "
        f"{load_before[2]:.1f}, after: {load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f}. "
        f"Command: `python bench/pretrain_profile.py --steps {steps}`.",
        "",
        "The trainer's own step (build_model + FSDP2 or none, fused AdamW, fp32 cross-entropy, global-norm "
        "clip) at bench/pretrain.py's shape (4 layers, d=256, 8 heads, SwiGLU 1024, T=256, global batch 8), "
        f"{steps} profiled steps after 3 warm-up steps. Self CPU time per bucket as a share of the steps' wall "
        "time; 'Python and dispatch' is the wall time no op accounts for. Shares are the thing to read here: "
        "other jobs shared the cores.",
        "",
        "| run | ms/step (wall) | " + " | ".join(BUCKETS) + " |",
        "|---|---|" + "---|" * len(BUCKETS),
    ]
    for name, (totals, wall, _top), watch in rows:
        shares = " | ".join(f"{100 * totals.get(key, 0.0) / wall:.0f}%" for key in BUCKETS)
        lines.append(f"| {name} ({watch.describe()}) | {1000 * wall / steps:.0f} | {shares} |")
    for name, (_totals, wall, top), _watch in rows:
        lines += ["", f"Top ops by self time, {name}:", ""]
        lines += [f"- {op}: {100 * seconds / wall:.1f}%" for op, seconds in top]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3, help="the first N of: 1 proc fp32, 2 procs fp32, 1 proc bf16")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pretrain-profile.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    runs = [("1 process, fp32, FSDP2", "fp32", 1), ("2 processes, fp32, FSDP2", "fp32", 2),
            ("1 process, bf16, FSDP2", "bf16", 1)]
    for name, precision, world_size in runs[:args.runs]:
        with LoadWatch() as watch:
            result = run(precision, args.steps, world_size)
        print(f"{name}: {1000 * result[1] / args.steps:.0f} ms/step; {watch.describe()}", flush=True)
        rows.append((name, result, watch))
        # written after every run: a slow machine still leaves the runs it finished
        text = render(rows, load_before, os.getloadavg(), args.steps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
