"""The Mixture-of-Experts layer: routing, combine weights, shared expert, balancing, capacity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gonogo.model.shape import ModelConfig, MoEConfig
from gonogo.model.decoder import Decoder
from gonogo.model.moe import MoE

D = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and OpenMP barriers stall when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_moe(seed: int = 0, **changes) -> MoE:
    torch.manual_seed(seed)
    config = MoEConfig(**{"n_experts": 4, "top_k": 2, "expert_ffn_dim": 24, **changes})
    moe = MoE(D, config)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.5)  # spread scores so routing is not a coin toss
    return moe


def inputs(N: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, N, D, generator=torch.Generator().manual_seed(seed))


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, straight from the definition (dropless)."""
    config, experts = moe.config, moe.experts
    out = []
    for token in x.reshape(-1, D):
        logits = moe.router.weight @ token
        scores = logits.softmax(-1) if config.score_func == "softmax" else logits.sigmoid()
        chosen = sorted(range(config.n_experts), key=lambda e: -(scores[e] + moe.expert_bias[e]).item())[: config.top_k]
        weights = scores[chosen]
        if config.route_norm:
            weights = weights / weights.sum()
        total = torch.zeros(D)
        for weight, e in zip(weights, chosen):
            hidden = F.silu(experts.w1[e] @ token) * (experts.w3[e] @ token)
            total = total + weight * (experts.w2[e] @ hidden)
        if moe.shared_expert is not None:
            total = total + moe.shared_expert(token)
        out.append(total)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("score_func,route_norm,shared", [("softmax", False, 0), ("sigmoid", True, 0), ("softmax", True, 1)])
def test_layer_equals_the_token_by_token_definition(score_func, route_norm, shared):
    moe = make_moe(score_func=score_func, route_norm=route_norm, n_shared_experts=shared)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = inputs()
    torch.testing.assert_close(moe(x), reference_moe(moe, x), atol=1e-6, rtol=1e-5)


def test_top_k_follows_bias_but_weights_use_unbiased_scores():
    moe = make_moe(top_k=2)
    tokens = inputs(12).view(-1, D)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 always selected
    chosen, weights, scores = moe.route(tokens)
    assert (chosen == 3).any(dim=-1).all()
    biased = scores + moe.expert_bias
    assert torch.equal(chosen.sort(-1).values, biased.topk(2, dim=-1).indices.sort(-1).values)
    torch.testing.assert_close(weights, scores.gather(-1, chosen))
    assert (weights < 1).all()  # the +10 never leaks into the combine weights


def test_shared_expert_is_added_to_every_token():
    moe = make_moe(n_shared_experts=1)
    x = inputs()
    with_shared = moe(x)
    shared_part = moe.shared_expert(x)
    with torch.no_grad():
        moe.shared_expert.w2.weight.zero_()
    torch.testing.assert_close(with_shared, moe(x) + shared_part)
    assert moe.shared_expert.w1.weight.shape == (24, D)


def test_aux_loss_equals_its_formula_on_a_hand_case():
    moe = make_moe(n_experts=2, top_k=1, aux_loss_coef=0.1)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2, D))
    skewed = torch.zeros(1, 2, D)
    skewed[0, :, 0] = math.log(3)  # both tokens: scores (3/4, 1/4) → both pick expert 0
    moe(skewed)
    # E · Σ f·P = 2 · (1 · 3/4 + 0 · 1/4) = 1.5
    torch.testing.assert_close(moe.last_aux_loss, torch.tensor(0.1 * 1.5))
    balanced = skewed.clone()
    balanced[0, 1, 0], balanced[0, 1, 1] = 0.0, math.log(3)  # second token picks expert 1
    moe(balanced)
    torch.testing.assert_close(moe.last_aux_loss, torch.tensor(0.1 * 1.0))  # uniform = coef


def test_aux_loss_is_positive_differentiable_and_summed_over_layers():
    config = ModelConfig(d_model=32, n_layers=3, n_heads=2, n_kv_heads=2, ffn_dim=64,
                         moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32, first_dense_layers=1))
    model = Decoder(config)
    model(torch.randint(0, 384, (2, 8)))
    per_layer = [moe.last_aux_loss for moe in model.moe_layers()]
    assert len(per_layer) == 2 and all(loss > 0 for loss in per_layer)
    total = model.aux_loss()
    torch.testing.assert_close(total, per_layer[0] + per_layer[1])
    total.backward()
    assert model.layers[1].moe.router.weight.grad.abs().sum() > 0


def test_dense_model_reports_no_moe_state():
    model = Decoder(ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64))
    model(torch.randint(0, 384, (1, 4)))
    assert model.aux_loss().item() == 0.0 and model.aux_loss().dim() == 0
    assert model.moe_token_counts() == []
    model.update_router_biases()  # a no-op, not an error


def test_moe_token_counts_sum_to_tokens_times_top_k():
    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64,
                         moe=MoEConfig(n_experts=8, top_k=3, expert_ffn_dim=32))
    model = Decoder(config)
    model(torch.randint(0, 384, (3, 7)))
    counts = model.moe_token_counts()
    assert len(counts) == 2
    for layer_counts in counts:
        assert layer_counts.dtype == torch.long and layer_counts.shape == (8,)
        assert layer_counts.sum().item() == 3 * 7 * 3


def test_capacity_drops_the_latest_tokens_and_dropless_keeps_all():
    dropless = make_moe(top_k=1)
    with torch.no_grad():
        dropless.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))  # all 8 tokens → expert 0
    capped = make_moe(top_k=1, capacity_factor=1.0)  # capacity = ceil(1 · 8 · 1 / 4) = 2
    capped.load_state_dict(dropless.state_dict())
    x = inputs(8)
    full, limited = dropless(x), capped(x)
    assert capped.capacity(8) == 2
    assert dropless.last_dropped.item() == 0 and capped.last_dropped.item() == 6
    torch.testing.assert_close(limited[0, :2], full[0, :2])  # the first tokens keep their expert
    assert torch.equal(limited[0, 2:], torch.zeros(6, D))  # later ones get 0 from it
    assert (full[0, 2:].abs().sum(-1) > 0).all()
    assert torch.equal(capped(x), limited)  # deterministic
    assert capped.last_token_counts.tolist() == [8, 0, 0, 0]  # counts are routing decisions
    capped.eval()  # inference never drops: a token's output must not depend on its batch-mates
    torch.testing.assert_close(capped(x), full)
    assert capped.last_dropped.item() == 0


def test_generous_capacity_drops_nothing():
    moe = make_moe(capacity_factor=4.0)
    dropless = make_moe()
    x = inputs(16)
    torch.testing.assert_close(moe(x), dropless(x))
    assert moe.last_dropped.item() == 0


def test_bias_update_moves_bias_toward_underloaded_experts():
    moe = make_moe(top_k=1, bias_update_rate=0.05, aux_loss_coef=0.0)
    with torch.no_grad():
        moe.router.weight[0] += 0.1
    x = inputs(64) + 1  # with the shifted router, experts 0 and 1 get most tokens
    moe(x)
    counts = moe.last_token_counts.float()
    before = moe.expert_bias.clone()
    moe.update_bias()
    delta = moe.expert_bias - before
    overloaded, underloaded = counts > counts.mean(), counts < counts.mean()
    assert (delta[overloaded] < 0).all() and (delta[underloaded] > 0).all()
    torch.testing.assert_close(delta.sum(), torch.tensor(0.0), atol=1e-7, rtol=0)

    first_imbalance = counts.max() / counts.mean()
    assert first_imbalance > 1.5
    for _ in range(10):
        moe(x)
        moe.update_bias()
    counts = moe.last_token_counts.float()
    assert counts.max() / counts.mean() < 0.75 * first_imbalance


def test_bias_update_is_a_no_op_when_disabled():
    moe = make_moe(bias_update_rate=0.0)
    moe(inputs())
    moe.update_bias()
    assert torch.equal(moe.expert_bias, torch.zeros(4))


def test_gradients_reach_router_experts_and_inputs():
    moe = make_moe(n_shared_experts=1)
    x = inputs().requires_grad_()
    moe(x).pow(2).sum().backward()
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_moe_layer_placement_and_parameter_names():
    config = ModelConfig(d_model=32, n_layers=5, n_heads=2, n_kv_heads=2, ffn_dim=64,
                         moe=MoEConfig(n_experts=4, top_k=1, expert_ffn_dim=16, n_shared_experts=1,
                                       first_dense_layers=1, every_n_layers=2))
    model = Decoder(config)
    kinds = ["moe" if hasattr(layer, "moe") else "dense" for layer in model.layers]
    assert kinds == ["dense", "moe", "dense", "moe", "dense"]
    names = dict(model.named_parameters())
    assert names["layers.1.moe.experts.w1"].shape == (4, 16, 32)
    assert names["layers.1.moe.experts.w2"].shape == (4, 32, 16)
    assert names["layers.1.moe.experts.w3"].shape == (4, 16, 32)
    assert names["layers.1.moe.router.weight"].shape == (4, 32)
    assert names["layers.1.moe.shared_expert.w2.weight"].shape == (32, 16)
    assert "layers.1.moe.expert_bias" in model.state_dict()
    assert "layers.0.feed_forward.w1.weight" in names


def test_moe_model_init_is_deterministic_and_resets_bias():
    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64,
                         moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16, bias_update_rate=0.1))
    a, b = Decoder(config), Decoder(config)
    x = torch.randint(0, 384, (2, 6))
    b(x)
    b.update_router_biases()
    assert b.layers[0].moe.expert_bias.abs().sum() > 0
    b.init_weights(seed=0)
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), name
    residual_std = a.layers[0].moe.experts.w2.std().item()
    assert 0.02 / 2 * 0.9 < residual_std < 0.02 / 2 * 1.1


def test_a_large_moe_shape_builds_on_meta():
    config = ModelConfig(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=128,
                         ffn_dim=18432, max_seq_len=4096, tie_embeddings=False,
                         moe=MoEConfig(n_experts=256, top_k=8, expert_ffn_dim=2048, n_shared_experts=1,
                                       score_func="sigmoid", route_norm=True, first_dense_layers=3))
    with torch.device("meta"):
        model = Decoder(config)
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total > 600e9  # DeepSeek-V3-like (with Llama attention instead of MLA)
