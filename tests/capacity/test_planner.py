"""The planner's memory, FLOP and time formulas against hand-computed cases."""

from __future__ import annotations

import pytest

from gonogo.capacity.hardware import get_gpu
from gonogo.capacity.planner import (
    CapacitySettings, collective_seconds, estimate, layer_activation_bytes, link_for, load_model,
    resolve_layout, stage_layers)
from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig
from gonogo.model.flops import flops_per_token

LLAMA_8B = 8_030_261_248
GB = 1e9


def run(**overrides):
    settings = dict(model="llama3-8b", gpu="h100", gpus=8)
    settings.update(overrides)
    return estimate(CapacitySettings(**settings))


def test_adam_state_bytes_under_full_sharding():
    # FSDP over 8 ranks: fp32 master weights, fp32 gradients and AdamW m, v, each / 8
    result = run(sharding="fsdp")
    assert result["memory_GB"]["parameters"] == pytest.approx(4 * LLAMA_8B / 8 / GB)
    assert result["memory_GB"]["gradients"] == pytest.approx(4 * LLAMA_8B / 8 / GB)
    assert result["memory_GB"]["optimizer_states"] == pytest.approx(8 * LLAMA_8B / 8 / GB)


def test_zero1_and_ddp_state_bytes():
    zero1 = run(sharding="zero1")["memory_GB"]
    assert zero1["parameters"] == pytest.approx(2 * LLAMA_8B / GB)            # bf16 working weights
    assert zero1["gradients"] == pytest.approx(4 * LLAMA_8B / GB)             # fp32 gradient buffer
    assert zero1["optimizer_states"] == pytest.approx(12 * LLAMA_8B / 8 / GB)  # master + m + v, sharded
    ddp = run(sharding="none")["memory_GB"]
    assert ddp["parameters"] + ddp["gradients"] + ddp["optimizer_states"] == pytest.approx(18 * LLAMA_8B / GB)


def test_tensor_and_pipeline_split_the_parameters():
    model = load_model("llama3-8b")
    result = run(gpus=16, tp=2, pp=2, sharding="none")
    # stage 0: 16 blocks (attention and MLP split over tp, norms replicated) + the embedding / tp
    attention = 2 * 4096 * 4096 + 2 * 4096 * 1024
    mlp = 3 * 4096 * 14336
    stage0 = 16 * ((attention + mlp) / 2 + 2 * 4096) + model.vocab_size * 4096 / 2
    # the first stage holds two micro-batches' activations under 1F1B, the last one: it is the worst
    assert result["memory_worst_stage"] == 0
    assert result["memory_GB"]["parameters"] == pytest.approx(2 * stage0 / GB)


def test_stage_layers_are_balanced():
    assert [len(r) for r in stage_layers(126, 16)] == [8] * 14 + [7] * 2
    assert sum(len(r) for r in stage_layers(61, 16)) == 61


def test_activation_formula_by_hand():
    config = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160)
    s, b, h, a, kv_dim, f = 32, 2, 64, 4, 2 * 16, 160
    tokens = s * b
    with_scores = layer_activation_bytes(config, 0, tokens, s, tp=1, keep_scores=True)
    expected = tokens * (6 * h + 4 * kv_dim) + 2 * a * s * s * b + 4 * tokens * h + tokens * (2 * h + 8 * f)
    assert with_scores == expected
    without = layer_activation_bytes(config, 0, tokens, s, tp=2, keep_scores=False)
    assert without == (expected - 2 * a * s * s * b) / 2


def test_activation_checkpointing_modes_order_memory_and_compute():
    none, selective, full = (run(activation_checkpointing=mode, seq=4096) for mode in ("none", "selective", "full"))
    assert none["memory_GB"]["activations"] > selective["memory_GB"]["activations"] > full["memory_GB"]["activations"]
    # full recomputation stores each block's input only: 32 blocks x 2*s*b*h bytes + one block rebuilt
    model = load_model("llama3-8b")
    working = layer_activation_bytes(model, 0, 4096, 4096, tp=1, keep_scores=False)
    assert full["memory_GB"]["activations"] == pytest.approx((32 * 2 * 4096 * 4096 + working) / GB)
    assert none["step_time_s"]["compute"] < selective["step_time_s"]["compute"] < full["step_time_s"]["compute"]


def test_compute_term_is_flops_over_peak_times_mfu():
    result = run(activation_checkpointing="none", mfu=0.5, global_batch=16, seq=8192)
    tokens = 16 * 8192
    expected = tokens * flops_per_token(load_model("llama3-8b"), 8192) / (8 * 989.4e12 * 0.5)
    assert result["step_time_s"]["compute"] == pytest.approx(expected)
    assert result["tokens_per_step"] == tokens


def test_alpha_beta_collectives():
    link = link_for(get_gpu("h100"), 8)
    assert link.name == "nvlink" and link.bandwidth == pytest.approx(450e9 * 0.8)
    size = 1e9
    assert collective_seconds("all_reduce", size, 8, link) == pytest.approx(
        14 * link.latency + 2 * 7 / 8 * size / link.bandwidth)
    assert collective_seconds("all_gather", size, 8, link) == pytest.approx(7 * link.latency + 7 / 8 * size / link.bandwidth)
    assert collective_seconds("all_reduce", size, 1, link) == 0.0
    assert link_for(get_gpu("h100"), 16).name == "network"
    assert link_for(get_gpu("gb200"), 72).name == "nvlink"


def test_pipeline_bubble_follows_the_schedule():
    result = run(model="llama3-70b", gpus=64, tp=8, pp=4, global_batch=64, overlap="none", virtual_stages=2)
    m = result["layout"]["micro_batches"]
    assert m == 64 // 2
    steps = result["step_time_s"]
    assert steps["pipeline_bubble"] == pytest.approx(3 / (2 * m) * (steps["compute"] + steps["tensor_parallel"]))
    assert steps["total"] == pytest.approx(sum(v for k, v in steps.items() if k != "total"))


def test_outputs_follow_from_the_step_time():
    result = run(tokens=1e12, price_per_gpu_hour=3.0)
    tokens_per_second = result["tokens_per_step"] / result["step_time_s"]["total"]
    assert result["tokens_per_second"] == pytest.approx(tokens_per_second)
    assert result["time_to_train_days"] == pytest.approx(1e12 / tokens_per_second / 86400)
    assert result["gpu_hours"] == pytest.approx(8 * 1e12 / tokens_per_second / 3600)
    assert result["cost_usd"] == pytest.approx(3.0 * result["gpu_hours"])
    assert 0 < result["mfu"] <= result["assumed_mfu"]


def test_frontier_config_fits_and_eight_gpus_do_not():
    frontier = run(model="llama3-405b", gpus=16384, tp=8, pp=16, global_batch=2048,
                   sharding="zero1", activation_checkpointing="full")
    assert frontier["fits"] and frontier["links"]["tensor_parallel"] == "nvlink"
    assert frontier["links"]["data_parallel"] == "network"
    small = run(model="llama3-405b", gpus=8, sharding="none")
    assert not small["fits"]
    assert small["memory_GB"]["total"] > 18 * 405e9 / GB  # 18 bytes per parameter, unsharded
    assert run()["fits"]  # Llama 3 8B with FSDP on one H100 node


def test_moe_expert_parallel_terms():
    result = run(model="deepseek-v3", gpu="h800", gpus=2048, pp=16, ep=64, sharding="zero1",
                 precision="fp8", global_batch=15360, seq=4096, activation_checkpointing="full")
    assert result["step_time_s"]["expert_parallel"] > 0
    assert result["memory_GB"]["moe_dispatch"] > 0
    assert result["links"]["expert_parallel"] == "network"  # 64 GPUs span 8 nodes of 8
    assert result["parameters"]["active"] < result["parameters"]["total"] / 10


@pytest.mark.parametrize("overrides, message", [
    (dict(tp=3, gpus=24), "does not divide the model's n_heads"),
    (dict(gpus=12, tp=8), "does not divide --gpus 12"),
    (dict(gpus=16, tp=8, dp=4), "must be equal"),
    (dict(gpu="a100"), "unknown GPU kind 'a100'"),
    (dict(precision="nvfp4"), "has no nvfp4"),
    (dict(ep=2), "needs an MoE model"),
    (dict(model="deepseek-v3", gpus=8, ep=3), "does not divide n_experts"),
    (dict(pp=64, gpus=64), "exceeds the model's n_layers"),
    (dict(global_batch=12), "not a multiple of dp*micro_batch"),
    (dict(model="no-such-model"), "unknown preset"),
])
def test_impossible_inputs_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError) as error:
        run(**overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_layout_defaults():
    model = load_model("llama3-405b")
    layout = resolve_layout(CapacitySettings(model="llama3-405b", gpu="h100", gpus=1024, tp=8, pp=8), model)
    assert layout.dp == 16 and layout.seq == 8192 and layout.micro_batches == 32


def test_fsdp_traffic_by_hand_crosses_nodes():
    # 16 GPUs = two HGX nodes: the FSDP group leaves NVLink; per micro-batch two bf16 all-gathers
    # of the whole model and one fp32 reduce-scatter of its gradients, ring cost (n-1)/n * S / B
    result = run(gpus=16, global_batch=32, overlap="none", activation_checkpointing="none")
    assert result["links"]["data_parallel"] == "network"
    bandwidth, latency = 50e9 * 0.8, 5e-6
    m = result["layout"]["micro_batches"]
    assert m == 2
    expected = m * (2 * (15 * latency + 15 / 16 * 2 * LLAMA_8B / bandwidth)
                    + (15 * latency + 15 / 16 * 4 * LLAMA_8B / bandwidth))
    assert result["communication_s"]["data_parallel"] == pytest.approx(expected)
    # with nothing overlapped the step is the plain sum of its parts
    steps = result["step_time_s"]
    assert steps["total"] == pytest.approx(steps["compute"] + sum(result["communication_s"].values()))


def test_overlap_modes():
    settings = dict(model="llama3-70b", gpus=256, tp=8, pp=4, global_batch=256)
    hidden = run(**settings, overlap="all")
    raw = sum(hidden["communication_s"].values())
    steps = hidden["step_time_s"]
    assert steps["total"] == pytest.approx(max(steps["compute"] + steps["pipeline_bubble"], raw))
    default = run(**settings, overlap="dp")
    nothing = run(**settings, overlap="none")
    assert hidden["step_time_s"]["total"] <= default["step_time_s"]["total"] <= nothing["step_time_s"]["total"]
    assert default["step_time_s"]["tensor_parallel"] == default["communication_s"]["tensor_parallel"]
    assert default["step_time_s"]["data_parallel"] < default["communication_s"]["data_parallel"]


def test_activations_are_reported_with_and_without_checkpointing():
    result = run(activation_checkpointing="full")
    by_mode = result["activations_by_checkpointing_GB"]
    assert by_mode["full"] == pytest.approx(result["memory_GB"]["activations"])
    assert by_mode["none"] == pytest.approx(run(activation_checkpointing="none")["memory_GB"]["activations"])
    assert by_mode["none"] > by_mode["selective"] > by_mode["full"]
