"""bench/pretrain.py's report: targets judged from what ran, bf16 left out where it is not native."""

from __future__ import annotations

import pytest

from .bench_support import load_bench, quiet_watch


@pytest.fixture(scope="module")
def pretrain_bench():
    return load_bench("pretrain")


def _run(tokens_per_second: float, mfu: float) -> dict:
    return {"tokens_per_second": tokens_per_second, "mfu": mfu, "utilization_pct": 99.0, "watch": quiet_watch()}


def _report(pretrain_bench, rows: dict, peaks: dict) -> str:
    reference = _run(3000.0, 0.0)
    spread = {name: [result] for name, result in rows.items()}
    spread["reference"] = [reference]
    return pretrain_bench.render(reference, list(rows.items()), peaks, (0.1,) * 3, (0.2,) * 3, 12, 1, spread,
                                 "python bench/pretrain.py")


def test_without_native_bf16_the_bf16_runs_are_left_out_and_their_targets_say_why(pretrain_bench):
    runs = pretrain_bench.FULL_RUNS
    fp32_only = [run for run in runs if not pretrain_bench._is_bf16(run)]
    assert [name for name, *_ in fp32_only] == ["1 proc, fp32, FSDP2", "2 procs, fp32, FSDP2",
                                                "1 proc, fp32, FSDP2, compiled", "1 proc, fp32, no wrapper"]
    # every compiled row asks for it: the presets train eager
    assert all(("compiled" in name) == (pretrain_bench.COMPILED in overrides) for name, _, _, overrides in runs)
    # every bf16 row asks for bf16: the presets' "auto" would train it in fp32 on such a CPU
    assert all("bf16" not in name or pretrain_bench.BF16 in overrides for name, _, _, overrides in runs)

    rows = {"1 proc, fp32, FSDP2": _run(3030.0, 0.50), "2 procs, fp32, FSDP2": _run(2900.0, 0.48),
            "1 proc, fp32, no wrapper": _run(3050.0, 0.50)}
    text = _report(pretrain_bench, rows, {"fp32": 168e9})
    assert "- gonogo on 1 process >= 2x the reference's fp32 tokens/s: NOT met (1.01x, 1 proc, fp32, FSDP2" in text
    assert "- 2 processes within 15% of 1 process (>= 0.85x): fp32, FSDP2 met (0.96x)" in text
    assert "- bf16 MFU >= 25% at d=256: no verdict on this CPU" in text
    # the reference does the same FLOPs: at 50% MFU for 3030 tokens/s, it runs at 49.5%: at most 2.02x
    assert "the reference runs at 50% of the measured fp32 peak" in text and "at most 2.02x" in text


def test_with_bf16_the_mfu_targets_are_judged(pretrain_bench):
    rows = {"1 proc, fp32, FSDP2": _run(7700.0, 0.53), "1 proc, bf16, FSDP2": _run(12300.0, 0.11),
            "2 procs, fp32, FSDP2": _run(6300.0, 0.44), "2 procs, bf16, FSDP2": _run(10800.0, 0.30),
            "small-dense d=512, 1 proc, bf16": _run(5400.0, 0.21)}
    text = _report(pretrain_bench, rows, {"bf16": 2755e9, "fp32": 411e9})
    assert "- bf16 MFU >= 25% at d=256: met (30.0%)" in text
    assert "- bf16 MFU >= 40% at d=512: NOT met (21.0%)" in text
    assert ("2 processes within 15% of 1 process (>= 0.85x): fp32, FSDP2 NOT met (0.82x); "
            "bf16, FSDP2 met (0.88x)") in text
    assert "fp32 tokens/s: met (4.10x, 1 proc, bf16, FSDP2" in text  # the faster precision counts


def test_the_fastest_setting_counts_and_compiled_runs_have_their_own_scaling(pretrain_bench):
    rows = {"1 proc, fp32, FSDP2": _run(3000.0, 0.53), "1 proc, bf16, FSDP2": _run(5100.0, 0.11),
            "2 procs, fp32, FSDP2": _run(2700.0, 0.44), "2 procs, bf16, FSDP2": _run(4500.0, 0.10),
            "small-dense d=512, 1 proc, bf16": _run(2000.0, 0.21),
            "1 proc, bf16, FSDP2, compiled": _run(6300.0, 0.14), "2 procs, bf16, FSDP2, compiled": _run(5000.0, 0.12),
            "small-dense d=512, 1 proc, bf16, compiled": _run(2600.0, 0.27)}
    text = _report(pretrain_bench, rows, {"bf16": 2755e9, "fp32": 411e9})
    # 6300 / 3000: the compiled bf16 run is this machine's fastest gonogo setting
    assert "fp32 tokens/s: met (2.10x, 1 proc, bf16, FSDP2, compiled, the fastest setting here)" in text
    assert "bf16, FSDP2, compiled NOT met (0.79x)" in text
    assert "| compiled / eager (1 process, bf16, FSDP2) | 1.24x |" in text
    assert "- bf16 MFU >= 25% at d=256: NOT met (14.0%)" in text
    assert "- bf16 MFU >= 40% at d=512: NOT met (27.0%)" in text
