"""Pretraining speed: gonogo's trainer side by side with a plain PyTorch loop, and its modes.

    python bench/pretrain.py            # writes bench/results/pretrain.md (10-15 minutes on 2 cores)

Model for the ratios: 4 layers, d=256 (8 heads, SwiGLU 1024), seq 256, global batch 8, on the
built-in synthetic corpus. Measured in one run, one after the other on the same machine:

1. reference: a plain single-process fp32 loop the way a user writes it (the same decoder,
   ``torch.optim.AdamW`` defaults, no autocast, no process group), timed after warm-up;
2. ``gonogo train`` on 1 and on 2 processes (bf16, FSDP2), fp32 vs bf16, FSDP2 vs DDP, and a
   mixture-of-experts shape (8 experts top-2, expert_parallel=2) vs dense;
3. small-dense (d=512) for MFU against the measured bf16 GEMM peak of this machine.

Throughput is the median of the trainer's steady log windows (the first is dropped), best of
the quiet rounds among ``--rounds`` interleaved rounds; MFU uses FLOPs per token =
6·N_active + 12·L·H·d_head·T (gonogo.model.flops). Targets: ours >= 2x the reference on 1 and
on 2 processes; small-dense >= 25% MFU. Every run is watched (bench/quiet.py): a target is
called met or NOT met only from rounds measured while the machine was quiet, otherwise the
file says "noisy: no verdict".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quiet import RULE, LoadWatch, machine, verdict  # noqa: E402
from gonogo.train.config import load_train_config  # noqa: E402

SHAPE = ["model.d_model=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_dim=1024",
         "train.seq_len=256", "train.global_batch_size=8", "train.checkpoint=false", "train.val_every=0",
         "train.val_batches=1", "train.warmup_steps=2"]


def run_gonogo(name: str, preset: str, nproc: int, overrides: list[str], out_root: Path, steps: int) -> dict:
    out = out_root / name
    command = [sys.executable, "-m", "gonogo", "train", preset, "--nproc", str(nproc), "--out", str(out),
               *overrides, f"train.steps={steps}", f"train.log_every={max(1, steps // 6)}", "train.warmup_steps=2"]
    started = time.monotonic()
    with LoadWatch() as watch:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed:\n{completed.stderr[-2000:]}")
    result = json.loads((out / "stages" / "train" / "result.json").read_text())
    result["wall_seconds"] = time.monotonic() - started
    result["watch"] = watch
    print(f"{name}: {result['tokens_per_second']:.0f} tokens/s, mfu {result['mfu']:.3f}; {watch.describe()}",
          flush=True)
    return result


def reference_loop(steps: int, warmup: int = 2) -> dict:
    """Tokens/s of a plain fp32 single-process loop over the same model shape and data."""
    with LoadWatch() as watch:
        rate = _reference_rate(steps, warmup)
    print(f"reference: {rate:.0f} tokens/s; {watch.describe()}", flush=True)
    return {"tokens_per_second": rate, "watch": watch}


def _reference_rate(steps: int, warmup: int) -> float:
    import torch
    import torch.nn.functional as F

    from gonogo.data.loader import PackedLoader
    from gonogo.data.sources import make_source
    from gonogo.model.decoder import Decoder

    config, _ = load_train_config("tiny-dense", SHAPE)
    torch.manual_seed(0)
    model = Decoder(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loader = PackedLoader(make_source("synthetic"), config.train.seq_len, config.train.global_batch_size)
    timings = []
    for step, (inputs, targets) in zip(range(steps + warmup), loader):
        started = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            timings.append(time.perf_counter() - started)
    tokens = config.train.global_batch_size * config.train.seq_len
    return tokens / statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (small-dense: half)")
    parser.add_argument("--rounds", type=int, default=2, help="every run is repeated; the best round counts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pretrain.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="gonogo-bench-pretrain-"))
    # a private peak cache, measured once here, so every run's MFU uses the same fresh peak
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")
    from gonogo.train.peak import measured_peak

    for precision in ("bf16", "fp32"):
        measured_peak("cpu", precision)
    steps = args.steps
    one = ["train.micro_batch_size=8"]
    two = ["train.micro_batch_size=4"]
    runs = [
        ("1 proc, bf16, FSDP2", "tiny-dense", 1, SHAPE + one),
        ("1 proc, bf16, no wrapper", "tiny-dense", 1, SHAPE + one + ["train.parallel=none"]),
        ("1 proc, fp32, no wrapper", "tiny-dense", 1, SHAPE + one + ["train.parallel=none", "train.precision=fp32"]),
        ("2 procs, bf16, FSDP2", "tiny-dense", 2, SHAPE + two),
        ("2 procs, fp32, FSDP2", "tiny-dense", 2, SHAPE + two + ["train.precision=fp32"]),
        ("2 procs, bf16, DDP", "tiny-dense", 2, SHAPE + two + ["train.parallel=ddp"]),
        ("2 procs, bf16, MoE 8x top-2, EP=2", "tiny-moe", 2,
         SHAPE + two + ["model.moe.expert_ffn_dim=512", "train.expert_parallel=2"]),
        ("small-dense d=512, 1 proc, bf16", "small-dense", 1, ["train.checkpoint=false", "train.val_every=0"]),
        ("small-dense d=512, 2 procs, bf16", "small-dense", 2, ["train.checkpoint=false", "train.val_every=0",
                                                                 "train.micro_batch_size=8"]),
    ]
    # rounds interleave the runs, so a burst of other work on the machine hits one round of one
    # run, not every round of it; the best round of each run counts
    references: list[dict] = []
    every: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        references.append(reference_loop(steps))
        for name, preset, nproc, overrides in runs:
            run_steps = max(6, steps // 2) if preset == "small-dense" else steps
            directory = f"{round_index}-" + name.replace(" ", "_").replace(",", "").replace("=", "")
            every.setdefault(name, []).append(run_gonogo(directory, preset, nproc, overrides, work, run_steps))
    load_after = os.getloadavg()
    rows = [(name, _best(every[name])) for name, *_ in runs]
    results = dict(rows)
    spread = {name: every[name] for name in every}
    spread["reference"] = references
    text = render(_best(references), rows, results, load_before, load_after, steps, args.rounds, spread)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


def _best(rounds: list[dict]) -> dict:
    """The fastest quiet round; the fastest of all when none was quiet (its verdict is then noisy)."""
    quiet = [r for r in rounds if r["watch"].quiet is True]
    return max(quiet or rounds, key=lambda r: r["tokens_per_second"])


def render(reference: dict, rows, results, load_before, load_after, steps: int, rounds: int,
           spread: dict[str, list[dict]]) -> str:
    first = next(iter(results.values()))
    lines = [
        "# Pretraining speed",
        "",
        f"Machine: {machine()}. Load average (1 min) before / after the whole benchmark: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f}. Command: `python bench/pretrain.py` ({steps} steps "
        f"per run, small-dense {max(6, steps // 2)}; best quiet round of {rounds} interleaved rounds).",
        "",
        RULE + " The best round counts among the quiet ones; a row without a quiet round shows its "
        "fastest round, marked busy.",
        "",
        "Model for the ratios: 4 layers, d=256, 8 heads, SwiGLU 1024, seq 256, global batch 8 "
        "sequences; synthetic corpus. Tokens/s = median of the trainer's steady log windows. "
        f"MFU against the measured GEMM peak of the run's precision: bf16 {first['peak_flops'] / 1e9:.0f} GFLOP/s, "
        f"fp32 {results['2 procs, fp32, FSDP2']['peak_flops'] / 1e9:.0f} GFLOP/s (best 0.1 s window of "
        f"1024² and 2048² matmuls on every core).",
        "",
        "| run | tokens/s (best) | every round (load before, others' CPU share) | vs reference | MFU | utilisation % | machine |",
        "|---|---|---|---|---|---|---|",
        f"| reference: plain fp32 loop, 1 process | {reference['tokens_per_second']:,.0f} | "
        f"{_rounds(spread['reference'])} | 1.00x | | | {_state(reference)} |",
    ]
    for name, result in rows:
        utilization = result.get("utilization_pct")
        lines.append(f"| {name} | {result['tokens_per_second']:,.0f} | {_rounds(spread[name])} | "
                     f"{result['tokens_per_second'] / reference['tokens_per_second']:.2f}x | "
                     f"{100 * result['mfu']:.1f}% | {'' if utilization is None else f'{utilization:.0f}'} | "
                     f"{_state(result)} |")

    def ratio(a: str, b: str) -> str:
        text = f"{results[a]['tokens_per_second'] / results[b]['tokens_per_second']:.2f}x"
        return text if results[a]["watch"].quiet and results[b]["watch"].quiet else f"{text} (busy)"

    def versus_reference(name: str) -> tuple[float, str]:
        times = results[name]["tokens_per_second"] / reference["tokens_per_second"]
        return times, verdict(times >= 2, results[name]["watch"], reference["watch"])

    one, one_verdict = versus_reference("1 proc, bf16, FSDP2")
    two, two_verdict = versus_reference("2 procs, bf16, FSDP2")
    small = [results[f"small-dense d=512, {procs}, bf16"] for procs in ("1 proc", "2 procs")]
    best_small = max(small, key=lambda r: r["mfu"])

    lines += [
        "",
        "| comparison | ratio of tokens/s |",
        "|---|---|",
        f"| bf16 / fp32 (1 process, no wrapper) | {ratio('1 proc, bf16, no wrapper', '1 proc, fp32, no wrapper')} |",
        f"| bf16 / fp32 (2 processes, FSDP2) | {ratio('2 procs, bf16, FSDP2', '2 procs, fp32, FSDP2')} |",
        f"| 2 processes / 1 process (bf16, FSDP2) | {ratio('2 procs, bf16, FSDP2', '1 proc, bf16, FSDP2')} |",
        f"| FSDP2 / DDP (2 processes, bf16) | {ratio('2 procs, bf16, FSDP2', '2 procs, bf16, DDP')} |",
        f"| MoE / dense (2 processes, tokens/s) | {ratio('2 procs, bf16, MoE 8x top-2, EP=2', '2 procs, bf16, FSDP2')} |",
        "",
        f"Targets: ours >= 2x the reference on 1 process: {one_verdict} ({one:.2f}x); on 2 processes: "
        f"{two_verdict} ({two:.2f}x); small-dense >= 25% MFU: "
        f"{verdict(best_small['mfu'] >= 0.25, best_small['watch'])} ({100 * best_small['mfu']:.1f}%).",
        "",
    ]
    return "\n".join(lines)


def _rounds(rounds: list[dict]) -> str:
    parts = []
    for r in rounds:
        watch = r["watch"]
        share = "?" if watch.other_share is None else f"{watch.other_share:.0%}"
        parts.append(f"{r['tokens_per_second']:,.0f} ({watch.load_before[0]:.1f}, {share})")
    return " / ".join(parts)


def _state(result: dict) -> str:
    return {True: "quiet", False: "busy", None: "unknown"}[result["watch"].quiet]


if __name__ == "__main__":
    raise SystemExit(main())
