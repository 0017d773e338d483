"""`gonogo quantize` and the `quantize` stage on a real (tiny, random) checkpoint."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch

from gonogo.checkpoints import resolve
from gonogo.checkpoints.quantized import load_quantized
from gonogo.infer.device import load_for_inference
from tests.conftest import run_gonogo
from tests.infer.conftest import tiny_model, write_checkpoint


def test_quantize_command_writes_a_loadable_checkpoint_and_real_byte_counts(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step-00000010", tiny_model())
    run = tmp_path / "q"
    result = run_gonogo("quantize", "--checkpoint", checkpoint, "--format", "nvfp4", "--out", run,
                        "--eval-problems", "4", "--val-batches", "1", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "nvfp4" in result.stdout and "compression" in result.stdout
    assert "GO" in result.stderr  # the runner's verdict (no default gates: done and measured is GO)
    # --out is the run directory of a one-stage plan; the checkpoint is the stage's model
    plan = tomllib.loads((run / "plan.toml").read_text())
    assert plan["stage"][0]["kind"] == "quantize" and plan["stage"][0]["format"] == "nvfp4"
    assert plan["stage"][0]["checkpoint"] == str(checkpoint) and plan["stage"][0]["gates"] == []
    assert json.loads((run / "state.json").read_text())["stages"]["quantize"]["status"] == "passed"
    assert json.loads((run / "summary.json").read_text())["verdict"] == "GO"
    assert "nvfp4 against bf16" in (run / "report.html").read_text()
    stage_dir = run / "stages" / "quantize"
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    out = stage_dir / "quantized"
    assert f"quantized checkpoint: {out}" in " ".join(result.stdout.split())
    assert json.loads((stage_dir / "outputs.json").read_text())["checkpoint"] == str(out.resolve())

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
    # no NVFP4 GEMM on a CPU: the report says the format was emulated and claims no speed
    assert metrics["fp8_gemm"] is False and "emulated" in metrics["gemm"] and "Blackwell" in metrics["gemm"]
    assert "speedup" not in metrics and "emulated" in result.stdout

    model, _, meta = load_quantized(out)
    assert meta["step"] == 10 and meta["quantization"]["format"] == "nvfp4"
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, config.vocab_size)

    # the run directory stands for its quantized checkpoint wherever a command takes --checkpoint
    ref = resolve(run)
    assert ref.path == out.resolve() and ref.format == "quantized" and ref.verified
    served, _, served_meta = load_for_inference(ref)
    assert served_meta["quantization"]["format"] == "nvfp4"
    assert served(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, config.vocab_size)


def test_quantize_refuses_bad_input_in_one_line_before_the_run_directory(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step-00000010", tiny_model())
    result = run_gonogo("quantize", "--checkpoint", tmp_path / "nowhere", "--format", "fp8", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "no such directory" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before the run directory
    bad_flag = run_gonogo("quantize", "--checkpoint", checkpoint, "--format", "fp8", "--eval-problems", "0",
                          "--out", tmp_path / "bad", cwd=tmp_path, timeout=120)
    assert bad_flag.returncode == 2 and "eval_problems" in bad_flag.stderr and not (tmp_path / "bad").exists()
    run = tmp_path / "q"
    first = run_gonogo("quantize", "--checkpoint", checkpoint, "--format", "fp8", "--out", run,
                       "--eval-problems", "1", "--val-batches", "1", cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    for quantized in (run, run / "stages" / "quantize" / "quantized"):  # the run directory, or the checkpoint
        again = run_gonogo("quantize", "--checkpoint", quantized, "--format", "nvfp4", "--out", tmp_path / "q2",
                           cwd=tmp_path, timeout=120)
        assert again.returncode == 2 and "already quantized" in again.stderr
        assert not (tmp_path / "q2").exists()
    taken = run_gonogo("quantize", "--checkpoint", checkpoint, "--format", "fp8", "--out", run, cwd=tmp_path,
                       timeout=120)
    assert taken.returncode == 2 and "already exists and is not empty" in taken.stderr


def test_a_run_directory_names_its_training_checkpoint_before_a_recorded_quantized_one(tmp_path):
    """A plan that trains and then quantizes still stands for its trained model (as before the
    quantized checkpoints counted); a run that only quantized stands for the quantized one."""
    from gonogo.checkpoints.quantized import QuantizedModel
    from gonogo.rundir import RunDir
    from gonogo.stages.base import StageContext

    def quantize_into(run_dir: RunDir) -> Path:
        context = StageContext(name="q", kind="quantize", run_dir=run_dir, stage_dir=run_dir.stage_dir("q"))
        out = QuantizedModel.from_model(tiny_model(), "fp8", meta={"step": 10}).save(context.stage_dir / "quantized")
        context.record_output(out)
        return out

    trained = RunDir.create(tmp_path / "trained", "p")
    checkpoint = write_checkpoint(trained.checkpoints_dir / "pretrain" / "step-00000010", tiny_model())
    quantize_into(trained)
    assert resolve(trained.root).path == checkpoint
    only_quantized = RunDir.create(tmp_path / "quantized", "p")
    out = quantize_into(only_quantized)
    assert resolve(only_quantized.root).path == out.resolve() and resolve(only_quantized.root).format == "quantized"


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


def test_fp8_on_a_gpu_with_fp8_gemms_measures_the_scaled_mm_path_and_its_speed_up(tmp_path, monkeypatch):
    """The Hopper path, run on this CPU (whose torch also has ``_scaled_mm``): the decision is faked,
    the FP8 GEMMs, the accuracy and the timing are real."""
    import gonogo.stages.quantize.stage as quantize_stage
    from gonogo.infer import fp8_gemm

    calls = []
    real_scaled_mm = torch._scaled_mm

    def counting_scaled_mm(*args, **kwargs):
        calls.append(args[0].dtype)
        return real_scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting_scaled_mm)
    monkeypatch.setattr(fp8_gemm, "gemm_path", lambda format, device: (True, "FP8 GEMMs (faked sm_90)"))
    checkpoint = write_checkpoint(tmp_path / "step-00000010", tiny_model())
    settings = quantize_stage.QuantizeSettings(format="fp8", eval_problems=2, val_batches=1, val_batch_size=2,
                                               val_seq_len=32, max_new_tokens=8, speed_repeats=1)
    metrics = quantize_stage.quantize_and_evaluate(checkpoint, tmp_path / "q", settings)
    assert metrics["fp8_gemm"] is True and calls and set(calls) == {torch.float8_e4m3fn}
    assert metrics["speedup"] == metrics["forward_tokens_per_s"] / metrics["forward_tokens_per_s_bf16"] > 0
    assert abs(metrics["val_loss_delta"]) < 0.5 and metrics["val_loss_delta"] != 0.0


def test_gemm_path_names_the_hardware_each_format_needs(monkeypatch):
    from gonogo.infer.fp8_gemm import gemm_path

    assert gemm_path("fp8", torch.device("cpu")) == (
        False, "emulated (dequantized weights): FP8 GEMMs need sm_89 or newer (Ada/Hopper); this is the CPU")
    for capability, fp8_real in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        real, line = gemm_path("fp8", torch.device("cuda", 0))
        assert real is fp8_real and f"sm_{capability[0]}{capability[1]}" in line
        real, line = gemm_path("nvfp4", torch.device("cuda", 0))
        assert real is False and "Blackwell" in line


def test_fp8_linear_pads_odd_shapes_and_survives_a_cast_of_the_model():
    from gonogo.infer.fp8_gemm import Fp8Linear

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 70, generator=generator) * 0.05   # neither dimension a multiple of 16
    layer = Fp8Linear(weight).to(dtype=torch.bfloat16)          # must not cast the E4M3 bytes or the scale
    x = torch.randn(3, 5, 70, generator=generator).to(torch.bfloat16)
    out = layer(x)
    reference = torch.nn.functional.linear(x.float(), weight)
    assert out.shape == (3, 5, 50) and out.dtype == torch.bfloat16
    assert ((out.float() - reference).norm() / reference.norm()) < 0.08  # E4M3: ~3 % per operand


def test_a_quantization_that_fails_half_way_is_no_go_exit_1(tmp_path, monkeypatch, capsys):
    from gonogo.checkpoints.quantized import QuantizedModel
    from gonogo.cli import main

    def full_disk(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(QuantizedModel, "save", full_disk)
    checkpoint = write_checkpoint(tmp_path / "step-00000010", tiny_model())
    run = tmp_path / "run"
    assert main(["quantize", "--checkpoint", str(checkpoint), "--format", "fp8", "--out", str(run)]) == 1
    assert "NO-GO" in capsys.readouterr().err
    record = json.loads((run / "state.json").read_text())["stages"]["quantize"]
    assert record["status"] == "error" and "No space left on device" in record["reason"]
    assert json.loads((run / "summary.json").read_text())["verdict"] == "NO-GO"
