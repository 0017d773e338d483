"""Real torchrun runs with 2 gloo processes and tiny shapes: learning, equivalences, outputs."""

from __future__ import annotations

import json

import pytest

from gonogo.stages import get_kind
from tests.train.train_helpers import check_mlperf, losses, rank0_lines, result, train

pytestmark = pytest.mark.timeout(300)


def test_fsdp_bf16_run_learns_and_writes_every_output(tmp_path, alphabet_corpus):
    # bf16 named, not "auto": on a CPU without bf16 instructions (an AVX2-only EPYC) auto trains
    # in fp32 and this test failed there; bf16 is emulated on such a CPU, fine at these shapes
    run = tmp_path / "run"
    code = train(run, "tiny-dense", 2, f"data.source={alphabet_corpus}", "train.steps=30", "train.lr=1e-2",
                 "train.precision=bf16", "train.warmup_steps=5", "train.log_every=5", "train.val_every=5",
                 "train.micro_batch_size=4")
    assert code == 0
    curve = losses(run)
    assert curve[-1] < 0.5 * curve[0]
    metrics = result(run)
    assert metrics["val_loss"] < 1.0 and metrics["reached_target"] and metrics["time_to_target_s"] > 0
    for key in ("final_loss", "tokens_per_second", "mfu", "peak_memory_bytes", "utilization_pct", "steps"):
        assert metrics[key] is not None and metrics[key] > 0, key
    assert metrics["world_size"] == 2 and metrics["precision"] == "bf16" and metrics["parallel"] == "fsdp"
    # both ranks report their own step time and tokens/s
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert {e.get("rank") for e in events if "tokens_per_second_rank" in e} == {0, 1}
    assert all(e["stage"] == "train" for e in events)
    assert list((run / "stages" / "train" / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "stages" / "train" / "metrics.json").read_text())["steps"] == 30
    outcome = check_mlperf(run / "mlperf.log")
    assert "SUCCESS" in outcome.stdout + outcome.stderr, outcome.stdout + outcome.stderr
    # the report has the loss and the throughput plots
    items = get_kind("train").report(run / "stages" / "train", metrics)
    assert [item.title for item in items][:2] == ["Loss and validation loss", "Throughput and MFU"]
    assert items[0].png.startswith(b"\x89PNG")
    # `gonogo report` understands a run made by `gonogo train` (one passed stage: GO)
    from gonogo.cli import main

    assert main(["report", str(run)]) == 0
    assert "Loss and validation loss" in (run / "report.html").read_text()


DETERMINISTIC_20 = ("train.steps=20", "train.log_every=1", "train.val_every=0", "train.warmup_steps=2")


def test_deterministic_fsdp_and_ddp_give_the_same_losses(tmp_path):
    assert train(tmp_path / "fsdp", "tiny-dense", 2, *DETERMINISTIC_20, flags=("--deterministic",)) == 0
    assert train(tmp_path / "ddp", "tiny-dense", 2, *DETERMINISTIC_20, "train.parallel=ddp",
                 flags=("--deterministic",)) == 0
    # FSDP2's units (the preset's one unit, or a unit per block) and keeping a block's gathered
    # weights from the forward to the backward change when weights are gathered, not what is computed
    for name, overrides in (("blocks", ["train.fsdp_unit=block"]),
                            ("kept", ["train.fsdp_unit=block", "train.fsdp_reshard_after_forward=false"])):
        assert train(tmp_path / name, "tiny-dense", 2, *DETERMINISTIC_20, *overrides, flags=("--deterministic",)) == 0
    fsdp, ddp = losses(tmp_path / "fsdp"), losses(tmp_path / "ddp")
    assert len(fsdp) == len(ddp) == 20
    assert result(tmp_path / "fsdp")["precision"] == "fp32"
    assert fsdp == ddp  # bitwise: same sums, and the clip norm is taken in float64
    assert losses(tmp_path / "blocks") == fsdp and losses(tmp_path / "kept") == fsdp
    assert fsdp[-1] < fsdp[0]


MOE = ("train.steps=6", "train.log_every=1", "train.val_every=0", "model.moe.expert_ffn_dim=64")


def test_expert_parallel_2_matches_local_experts(tmp_path):
    assert train(tmp_path / "ep2", "tiny-moe", 2, *MOE, "train.expert_parallel=2", "train.checkpoint=true",
                 flags=("--deterministic",)) == 0
    assert train(tmp_path / "ep1", "tiny-moe", 2, *MOE, "train.expert_parallel=1", flags=("--deterministic",)) == 0
    ep2, ep1 = losses(tmp_path / "ep2"), losses(tmp_path / "ep1")
    assert len(ep2) == len(ep1) == 6
    # the experts' gradients arrive through all_to_all and add up in another order: ~2e-8 measured
    assert ep2 == pytest.approx(ep1, rel=1e-6, abs=0)
    metrics = result(tmp_path / "ep2")
    assert metrics["expert_parallel"] == 2 and metrics["moe_load_imbalance"] >= 1.0
    fractions = rank0_lines(tmp_path / "ep2")[-1]["expert_fractions"]
    assert len(fractions) == 2 and all(sum(layer) == pytest.approx(1.0) for layer in fractions)
    # the checkpoint holds every expert once (each rank saved its own half of the ep-sharded DTensor)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ep2" / "checkpoints" / "train" / "step-00000006" / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("layers.0.moe.experts.w1").shape == (8, 64, 64)


def test_resume_from_a_checkpoint_continues_with_the_same_losses(tmp_path):
    steps = ("train.steps=6", "train.log_every=1", "train.val_every=0", "train.checkpoint=true",
             "train.checkpoint_every=3")
    assert train(tmp_path / "whole", "tiny-dense", 2, *steps, flags=("--deterministic",)) == 0
    checkpoint = tmp_path / "whole" / "checkpoints" / "train" / "step-00000003"
    assert (checkpoint / "COMMITTED").is_file()
    assert train(tmp_path / "resumed", "tiny-dense", 2, *steps,
                 flags=("--deterministic", "--resume", str(checkpoint))) == 0
    assert result(tmp_path / "resumed")["resumed_from_step"] == 3
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")[3:]
    assert not (tmp_path / "resumed" / "mlperf.log").exists()  # time-to-train is for whole runs only


def test_a_compiled_run_computes_what_an_eager_one_does_and_resumes_eager(tmp_path, monkeypatch):
    # its own inductor cache: an entry half-written by an interrupted compile elsewhere on this
    # machine ("main.so: file too short", pytorch/pytorch#180841) cannot fail this test
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    steps = ("train.steps=6", "train.log_every=1", "train.val_every=0", "train.checkpoint=true",
             "train.checkpoint_every=3", "train.precision=fp32", "train.warmup_steps=2")
    assert train(tmp_path / "compiled", "tiny-dense", 2, *steps, "train.compile=true") == 0
    assert train(tmp_path / "eager", "tiny-dense", 2, *steps) == 0
    compiled, eager = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert len(compiled) == len(eager) == 6
    assert result(tmp_path / "compiled")["compiled"] is True and result(tmp_path / "eager")["compiled"] is False
    # inductor fuses the elementwise work and may sum in another order: fp32 rounding apart, no more
    assert compiled == pytest.approx(eager, rel=1e-4, abs=0)
    # its checkpoint has the eager model's names: an eager run resumes from it
    checkpoint = tmp_path / "compiled" / "checkpoints" / "train" / "step-00000003"
    assert train(tmp_path / "resumed", "tiny-dense", 2, *steps, flags=("--resume", str(checkpoint))) == 0
    assert result(tmp_path / "resumed")["resumed_from_step"] == 3
    assert losses(tmp_path / "resumed") == pytest.approx(compiled[3:], rel=1e-4, abs=0)
