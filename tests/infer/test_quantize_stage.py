"""`gonogo quantize` and the `quantize` stage on a real (tiny, random) checkpoint."""

from __future__ import annotations

import json

import torch

from gonogo.infer.quantize import load_quantized
from tests.conftest import run_gonogo
from tests.infer.conftest import tiny_model, write_checkpoint


def test_quantize_command_writes_a_loadable_checkpoint_and_real_byte_counts(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step-00000010", tiny_model())
    out = tmp_path / "q"
    result = run_gonogo("quantize", "--checkpoint", checkpoint, "--format", "nvfp4", "--out", out,
                        "--eval-problems", "4", "--val-batches", "1", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "nvfp4" in result.stdout and "compression" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())

    description = json.loads((out / "quantization.json").read_text())
    assert description["format"] == "nvfp4" and description["block_size"] == 16
    # the tiny model: 2 layers × (wq, wk, wv, wo, w1, w2, w3); every input dim is 64 or 128
    config = tiny_model().config
    shapes = [tuple(entry["shape"]) for entry in description["quantized"].values()]
    assert len(shapes) == 2 * 7
    expected = sum(out_dim * in_dim // 2 + out_dim * in_dim // 16 + 4 for out_dim, in_dim in shapes)
    assert metrics["weight_bytes"] == expected
    assert metrics["bf16_weight_bytes"] == sum(2 * o * i for o, i in shapes)
    assert metrics["compression_ratio"] == metrics["bf16_weight_bytes"] / metrics["weight_bytes"]
    kept = config.vocab_size * config.d_model * 2 + (2 * 2 + 1) * config.d_model * 2  # embedding + norms, bf16
    assert metrics["weight_bytes_total"] == expected + kept
    assert (out / "model.quantized.safetensors").stat().st_size > metrics["weight_bytes_total"]

    for name in ("val_loss", "val_loss_bf16", "accuracy", "accuracy_bf16"):
        assert isinstance(metrics[name], float), name
    assert metrics["val_loss_delta"] == metrics["val_loss"] - metrics["val_loss_bf16"]
    assert metrics["val_loss"] != metrics["val_loss_bf16"]  # the format really changed the weights
    assert metrics["eval_problems"] == 4

    model, _, meta = load_quantized(out)
    assert meta["step"] == 10 and meta["quantization"]["format"] == "nvfp4"
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, config.vocab_size)


def test_quantize_refuses_bad_input_in_one_line(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step-00000010", tiny_model())
    result = run_gonogo("quantize", "--checkpoint", tmp_path / "nowhere", "--format", "fp8", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "no such directory" in result.stderr and "Traceback" not in result.stderr
    out = tmp_path / "q"
    first = run_gonogo("quantize", "--checkpoint", checkpoint, "--format", "fp8", "--out", out,
                       "--eval-problems", "1", "--val-batches", "1", cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    again = run_gonogo("quantize", "--checkpoint", out, "--format", "nvfp4", "--out", tmp_path / "q2",
                       cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "already quantized" in again.stderr


def test_quantize_stage_in_a_plan_with_gates(tmp_path, write_plan):
    run_root = tmp_path / "source-run"
    write_checkpoint(run_root / "checkpoints" / "step-00000010", tiny_model(moe=True))
    plan = write_plan(f"""
        [plan]
        name = "q"

        [[stage]]
        name = "fp8"
        kind = "quantize"
        checkpoint = "{run_root}"
        format = "fp8"
        eval_problems = 2
        val_batches = 1
        gates = ["compression_ratio >= 1.8", "val_loss_delta <= 1.0", "accuracy_delta >= -1.0"]
        """)
    result = run_gonogo("run", plan, "--out", tmp_path / "run", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    stage_dir = tmp_path / "run" / "stages" / "fp8"
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["format"] == "fp8" and metrics["compression_ratio"] >= 1.8
    # MoE: the stacked experts are quantized, the router is kept
    description = json.loads((stage_dir / "quantized" / "quantization.json").read_text())
    assert "layers.0.moe.experts.w1" in description["quantized"]
    assert "layers.0.moe.router.weight" in description["kept"]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e.get("stage") == "fp8" and "weight_bytes" in e for e in events)
    assert "fp8 against bf16" in (tmp_path / "run" / "report.html").read_text()
