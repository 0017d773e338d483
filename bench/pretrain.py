"""Pretraining speed: gonogo's trainer side by side with a plain nanoGPT-style loop, and its modes.

    python bench/pretrain.py            # writes bench/results/pretrain.md (15-20 minutes on 2 quiet cores)
    python bench/pretrain.py --quick    # the targets' runs only, fewer steps, one round (a few minutes)

Model for the ratios (``SHAPE``): 4 layers, d=256 (8 heads, SwiGLU 1024), seq 256, global batch 8,
on the built-in synthetic corpus. Measured in one run, one after the other on the same machine:

1. reference: a plain single-process fp32 loop written the way karpathy/nanoGPT's train.py runs on
   a CPU (no autocast: its ``ctx`` is a nullcontext on CPU; ``torch.optim.AdamW`` with decay on
   the matrices only, betas (0.9, 0.95), ``fused`` only on CUDA so the default foreach kernel here;
   the learning rate set by hand every iteration; clip at 1.0; ``zero_grad(set_to_none=True)``;
   the next batch fetched right after the forward; no process group; ``--compile=False`` as in
   nanoGPT's CPU recipe), over the same decoder, so both sides do the same FLOPs per token;
2. ``gonogo train`` on 1 and on 2 processes, fp32 and bf16 (FSDP2, the default wrapper), eager (the
   presets' default) and with ``train.compile=true`` (torch.compile of every block; its first step
   compiles, the median of the steady windows leaves that out);
3. d=512 (small-dense) in bf16, eager and compiled, for MFU against the measured bf16 GEMM peak;
   the full run adds DDP, no wrapper and a mixture-of-experts shape.

Throughput is the median of the trainer's steady log windows (the first is dropped), best of
the quiet rounds among ``--rounds`` interleaved rounds; MFU uses FLOPs per token =
6·N_active + 12·L·H·d_head·T (gonogo.model.flops) against the measured GEMM peak of the run's
precision (gonogo.train.peak: best of ``a @ b`` and ``F.linear`` on one core, times the cores).
Targets (issue 21): gonogo on 1 process (its fastest setting here) >= 2x the reference's fp32
tokens/s; 2 processes within 15% of 1 process (same setting); bf16 MFU >= 25% at d=256 and >= 40%
at d=512. Every run is watched (bench/quiet.py): a target is called met or NOT met only from rounds measured while the
machine was quiet, otherwise the file says "noisy: no verdict". The CPU's AMX/AVX-512/AVX2 flags
are recorded. On a CPU without AMX or AVX-512 bf16 (gonogo.train.config.native_bf16), bf16 GEMMs
run a fallback about 50x slower than fp32 (a bf16 step of this shape takes minutes): the bf16 runs
and the bf16 peak probe are left out there (``--with-bf16`` runs them anyway) and the bf16 targets
say why they have no verdict. The file also states the fp32 ceiling of the 2x target: at 100% of
the measured fp32 peak, fp32 can be at most 1 / (the reference's MFU) times the reference.
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
from gonogo.train.config import load_train_config, native_bf16  # noqa: E402

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
    """Tokens/s of the nanoGPT-style fp32 single-process loop over the same model shape and data."""
    with LoadWatch() as watch:
        rate, losses = _reference_rate(steps, warmup)
    print(f"reference: {rate:.0f} tokens/s; {watch.describe()}", flush=True)
    return {"tokens_per_second": rate, "watch": watch, "losses": losses}


def _reference_rate(steps: int, warmup: int) -> tuple[float, list[float]]:
    import math

    import torch
    import torch.nn.functional as F

    from gonogo.data.loader import PackedLoader
    from gonogo.model.decoder import Decoder

    config, _ = load_train_config("tiny-dense", SHAPE)
    train = config.train
    torch.manual_seed(1337)
    model = Decoder(config.model)
    # nanoGPT's configure_optimizers: decay every >= 2-D parameter, not the others; fused only on CUDA
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.lr, betas=(train.beta1, train.beta2))

    def get_lr(it: int) -> float:  # nanoGPT's get_lr: linear warmup, then cosine to min_lr
        if it < train.warmup_steps:
            return train.lr * (it + 1) / (train.warmup_steps + 1)
        ratio = min(1.0, (it - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
        return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (train.lr - train.min_lr)

    batches = iter(PackedLoader(config.data.open_source("train"), train.seq_len, train.global_batch_size))
    X, Y = next(batches)
    timings, losses = [], []
    for it in range(steps + warmup):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        logits = model(X)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=-100)
        X, Y = next(batches)  # nanoGPT fetches the next batch while the forward is in flight on a GPU
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # nanoGPT's loss.item() at every log_interval=1 on CPU
        if it >= warmup:
            timings.append(time.perf_counter() - started)
    return train.global_batch_size * train.seq_len / statistics.median(timings), losses


BF16 = "train.precision=bf16"  # explicit: the presets' auto is fp32 on a CPU without bf16 instructions
COMPILED = "train.compile=true"  # torch.compile of every transformer block (off in the presets)
FULL_RUNS = [
    ("1 proc, fp32, FSDP2", "tiny-dense", 1, SHAPE + ["train.micro_batch_size=8", "train.precision=fp32"]),
    ("1 proc, bf16, FSDP2", "tiny-dense", 1, SHAPE + ["train.micro_batch_size=8", BF16]),
    ("2 procs, fp32, FSDP2", "tiny-dense", 2, SHAPE + ["train.micro_batch_size=4", "train.precision=fp32"]),
    ("2 procs, bf16, FSDP2", "tiny-dense", 2, SHAPE + ["train.micro_batch_size=4", BF16]),
    ("small-dense d=512, 1 proc, bf16", "small-dense", 1, ["train.checkpoint=false", "train.val_every=0", BF16]),
    ("1 proc, fp32, FSDP2, compiled", "tiny-dense", 1,
     SHAPE + ["train.micro_batch_size=8", "train.precision=fp32", COMPILED]),
    ("1 proc, bf16, FSDP2, compiled", "tiny-dense", 1, SHAPE + ["train.micro_batch_size=8", BF16, COMPILED]),
    ("2 procs, bf16, FSDP2, compiled", "tiny-dense", 2, SHAPE + ["train.micro_batch_size=4", BF16, COMPILED]),
    ("small-dense d=512, 1 proc, bf16, compiled", "small-dense", 1,
     ["train.checkpoint=false", "train.val_every=0", BF16, COMPILED]),
    ("small-dense d=512, 2 procs, bf16", "small-dense", 2, ["train.checkpoint=false", "train.val_every=0",
                                                             "train.micro_batch_size=8", BF16]),
    ("1 proc, fp32, no wrapper", "tiny-dense", 1, SHAPE + ["train.micro_batch_size=8", "train.parallel=none",
                                                           "train.precision=fp32"]),
    ("1 proc, bf16, no wrapper", "tiny-dense", 1, SHAPE + ["train.micro_batch_size=8", "train.parallel=none", BF16]),
    ("2 procs, bf16, DDP", "tiny-dense", 2, SHAPE + ["train.micro_batch_size=4", "train.parallel=ddp", BF16]),
    # the presets' FSDP2 is one unit for these small models; per-block units are the GPU default
    ("2 procs, bf16, FSDP2 per block", "tiny-dense", 2,
     SHAPE + ["train.micro_batch_size=4", "train.fsdp_unit=block", BF16]),
    ("2 procs, bf16, MoE 8x top-2, EP=2", "tiny-moe", 2,
     SHAPE + ["train.micro_batch_size=4", "model.moe.expert_ffn_dim=512", "train.expert_parallel=2", BF16]),
]
QUICK = 9  # --quick: the first nine runs (every target's), d=512 at global batch 8


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (small-dense: half)")
    parser.add_argument("--rounds", type=int, default=2, help="every run is repeated; the best round counts")
    parser.add_argument("--quick", action="store_true",
                        help="the targets' runs only (1 and 2 procs fp32/bf16, d=512 on 1 proc), 6 steps, 1 round")
    parser.add_argument("--with-bf16", action="store_true",
                        help="run the bf16 rows even on a CPU without native bf16 (each step takes minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pretrain.md")
    args = parser.parse_args()
    runs = FULL_RUNS
    if args.quick:
        args.steps, args.rounds = 6, 1
        runs = [(name, preset, nproc, overrides + (["train.global_batch_size=8"] if preset == "small-dense" else []))
                for name, preset, nproc, overrides in FULL_RUNS[:QUICK]]
    with_bf16 = args.with_bf16 or native_bf16()
    if not with_bf16:
        runs = [run for run in runs if not _is_bf16(run)]
        print("no native bf16 on this CPU: the bf16 runs are left out (--with-bf16 runs them)", flush=True)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="gonogo-bench-pretrain-"))
    # a private peak cache, measured once here, so every run's MFU uses the same fresh peak
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")
    # and a private inductor cache: every compiled run compiles cold (its first window, left out of
    # the rate), and no entry left half-written by an interrupted earlier compile is loaded (seen
    # here: "main.so: file too short" after a killed run)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
    from gonogo.train.peak import measured_peak

    peaks = {precision: measured_peak("cpu", precision)["flops"]
             for precision in (("bf16", "fp32") if with_bf16 else ("fp32",))}
    steps = args.steps
    # rounds interleave the runs, so a burst of other work on the machine hits one round of one
    # run, not every round of it; the best round of each run counts
    references: list[dict] = []
    every: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        references.append(reference_loop(steps))
        for name, preset, nproc, overrides in runs:
            run_steps = max(4, steps // 2) if preset == "small-dense" else steps
            directory = f"{round_index}-" + name.replace(" ", "_").replace(",", "").replace("=", "")
            every.setdefault(name, []).append(run_gonogo(directory, preset, nproc, overrides, work, run_steps))
    load_after = os.getloadavg()
    rows = [(name, _best(every[name])) for name, *_ in runs]
    spread = dict(every)
    spread["reference"] = references
    command = "python bench/pretrain.py" + (" --quick" if args.quick else "")
    text = render(_best(references), rows, peaks, load_before, load_after, steps, args.rounds, spread, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


def _is_bf16(run: tuple) -> bool:
    return BF16 in run[3]


def _best(rounds: list[dict]) -> dict:
    """The fastest quiet round; the fastest of all when none was quiet (its verdict is then noisy)."""
    quiet = [r for r in rounds if r["watch"].quiet is True]
    return max(quiet or rounds, key=lambda r: r["tokens_per_second"])


def render(reference: dict, rows, peaks: dict[str, float], load_before, load_after, steps: int, rounds: int,
           spread: dict[str, list[dict]], command: str) -> str:
    from gonogo.train.peak import cpu_flags

    results = dict(rows)
    flags = ", ".join(cpu_flags()) or "unknown"
    native_bf16 = any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))
    lines = [
        "# Pretraining speed",
        "",
        f"Machine: {machine()}; CPU flags: {flags} ({'native bf16 GEMMs' if native_bf16 else 'no AMX or AVX-512 bf16: bf16 GEMMs run a fallback'}). "
        f"Load average (1/5/15 min) before: {load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f}, "
        f"after: {load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f}. Command: `{command}` ({steps} steps "
        f"per run, small-dense {max(4, steps // 2)}; best quiet round of {rounds} interleaved round(s)).",
        "",
        RULE + " The best round counts among the quiet ones; a row without a quiet round shows its "
        "fastest round, marked busy.",
        "",
        "Model for the ratios: 4 layers, d=256, 8 heads, SwiGLU 1024, seq 256, global batch 8 "
        "sequences; synthetic corpus. Tokens/s = median of the trainer's steady log windows. "
        f"Measured GEMM peak (best of `a @ b` and `F.linear`, one core times the cores): {_peaks(peaks)}. "
        "MFU is against the peak of the run's precision.",
        "",
        "| run | tokens/s (best) | every round (load before, others' CPU share) | vs reference | MFU | utilisation % | machine |",
        "|---|---|---|---|---|---|---|",
        f"| reference: nanoGPT-style fp32 loop, 1 process | {reference['tokens_per_second']:,.0f} | "
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

    comparisons = [("bf16 / fp32 (1 process, FSDP2)", "1 proc, bf16, FSDP2", "1 proc, fp32, FSDP2"),
                   ("bf16 / fp32 (2 processes, FSDP2)", "2 procs, bf16, FSDP2", "2 procs, fp32, FSDP2"),
                   ("2 processes / 1 process (fp32, FSDP2)", "2 procs, fp32, FSDP2", "1 proc, fp32, FSDP2"),
                   ("2 processes / 1 process (bf16, FSDP2)", "2 procs, bf16, FSDP2", "1 proc, bf16, FSDP2"),
                   ("compiled / eager (1 process, bf16, FSDP2)", "1 proc, bf16, FSDP2, compiled",
                    "1 proc, bf16, FSDP2"),
                   ("compiled / eager (2 processes, bf16, FSDP2)", "2 procs, bf16, FSDP2, compiled",
                    "2 procs, bf16, FSDP2"),
                   ("compiled / eager (1 process, fp32, FSDP2)", "1 proc, fp32, FSDP2, compiled",
                    "1 proc, fp32, FSDP2"),
                   ("2 processes / 1 process (bf16, FSDP2, compiled)", "2 procs, bf16, FSDP2, compiled",
                    "1 proc, bf16, FSDP2, compiled"),
                   ("FSDP2 / no wrapper (1 process, fp32)", "1 proc, fp32, FSDP2", "1 proc, fp32, no wrapper"),
                   ("FSDP2 / DDP (2 processes, bf16)", "2 procs, bf16, FSDP2", "2 procs, bf16, DDP"),
                   ("FSDP2 one unit / per block (2 processes, bf16)", "2 procs, bf16, FSDP2",
                    "2 procs, bf16, FSDP2 per block"),
                   ("MoE / dense (2 processes, tokens/s)", "2 procs, bf16, MoE 8x top-2, EP=2", "2 procs, bf16, FSDP2")]
    lines += ["", "| comparison | ratio of tokens/s |", "|---|---|"]
    lines += [f"| {label} | {ratio(a, b)} |" for label, a, b in comparisons if a in results and b in results]

    # 1 process: the fastest of gonogo's settings on this machine (precision, compiled or not) is
    # the one its user runs
    one_name = max((name for name in results if name.startswith("1 proc, ") and ", FSDP2" in name),
                   key=lambda n: results[n]["tokens_per_second"])
    one = results[one_name]["tokens_per_second"] / reference["tokens_per_second"]
    one_verdict = verdict(one >= 2, results[one_name]["watch"], reference["watch"])
    scaling = []
    for setting in ("fp32, FSDP2", "bf16, FSDP2", "bf16, FSDP2, compiled"):
        if f"2 procs, {setting}" not in results or f"1 proc, {setting}" not in results:
            continue
        a, b = results[f"2 procs, {setting}"], results[f"1 proc, {setting}"]
        times = a["tokens_per_second"] / b["tokens_per_second"]
        scaling.append(f"{setting} {verdict(times >= 0.85, a['watch'], b['watch'])} ({times:.2f}x)")
    lines += ["", "Targets:", "",
              f"- gonogo on 1 process >= 2x the reference's fp32 tokens/s: {one_verdict} ({one:.2f}x, {one_name}, "
              f"the fastest setting here)",
              f"- 2 processes within 15% of 1 process (>= 0.85x): {'; '.join(scaling)}"]
    if "bf16" not in peaks:
        why = ("no verdict on this CPU: no AMX or AVX-512 bf16, so bf16 GEMMs run a fallback about 50x slower "
               "than fp32 and the bf16 runs were left out (`--with-bf16` runs them)")
        lines += [f"- bf16 MFU >= 25% at d=256: {why}", f"- bf16 MFU >= 40% at d=512: {why}"]
    else:
        small = max((results[name] for name in results if name.startswith("small-dense")), key=lambda r: r["mfu"])
        tiny = max((results[name] for name in results
                    if name.startswith(("1 proc, bf16", "2 procs, bf16")) and "MoE" not in name), key=lambda r: r["mfu"])
        lines += [
            f"- bf16 MFU >= 25% at d=256: {verdict(tiny['mfu'] >= 0.25, tiny['watch'])} ({100 * tiny['mfu']:.1f}%)",
            f"- bf16 MFU >= 40% at d=512: {verdict(small['mfu'] >= 0.40, small['watch'])} ({100 * small['mfu']:.1f}%)"]
    lines += ["", _fp32_ceiling(reference, results["1 proc, fp32, FSDP2"]), ""]
    return "\n".join(lines)


def _peaks(peaks: dict[str, float]) -> str:
    if "bf16" not in peaks:
        return f"fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s (bf16 not probed: no native bf16 here)"
    return (f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s "
            f"(bf16 / fp32 = {peaks['bf16'] / peaks['fp32']:.2f}x)")


def _fp32_ceiling(reference: dict, fp32: dict) -> str:
    """How far fp32 alone could go: the reference does the same FLOPs per token as gonogo, so at
    100% of the measured fp32 peak gonogo is at most 1 / (the reference's MFU) times it."""
    reference_mfu = fp32["mfu"] * reference["tokens_per_second"] / fp32["tokens_per_second"]
    return (f"The fp32 ceiling of the 2x target: the reference runs at {100 * reference_mfu:.0f}% of the measured "
            f"fp32 peak (gonogo's fp32 run at {100 * fp32['mfu']:.0f}%), so fp32 alone can be at most "
            f"{1 / reference_mfu:.2f}x the reference here, even at 100% of the peak; more needs fewer FLOPs "
            "or a faster precision (bf16 where the CPU or GPU runs it natively).")


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
