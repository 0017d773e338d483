"""Analytic parameter and FLOP counts against hand-computed and published figures."""

from __future__ import annotations

import pytest

from gonogo.model.shape import ModelConfig, MoEConfig
from gonogo.model.flops import flops_per_token, parameter_counts
from gonogo.typed_config import CONFIGS_DIR, load_toml, validate


def preset(name: str) -> ModelConfig:
    return validate(ModelConfig, load_toml(CONFIGS_DIR / f"{name}.toml")["model"], name)


def test_llama3_8b_parameter_count_by_hand():
    config = preset("llama3-8b")
    embedding = 128256 * 4096
    attention = 2 * 4096 * 4096 + 2 * 4096 * (8 * 128)  # wq, wo + wk, wv with 8 kv heads
    mlp = 3 * 4096 * 14336
    block = attention + mlp + 2 * 4096
    expected = embedding + 32 * block + 4096 + 128256 * 4096  # + final norm + untied head
    counts = parameter_counts(config)
    assert counts["total"] == expected == 8_030_261_248
    assert counts["active"] == counts["total"]
    assert counts["embedding"] == embedding
    assert counts["per_layer"] == [block] * 32


@pytest.mark.parametrize("name, published_billions", [
    ("llama3-8b", 8.03), ("llama3-70b", 70.6), ("llama3-405b", 405.9)])
def test_llama3_counts_match_published(name, published_billions):
    assert parameter_counts(preset(name))["total"] / 1e9 == pytest.approx(published_billions, abs=0.06)


def test_approximated_moe_presets_are_close_to_published():
    # the attention approximations are stated in the preset files; the totals stay within 1%
    deepseek = parameter_counts(preset("deepseek-v3"))
    assert deepseek["total"] / 1e9 == pytest.approx(671, rel=0.01)
    assert (deepseek["active"]) / 1e9 == pytest.approx(37, rel=0.05)
    gpt_oss = parameter_counts(preset("gpt-oss-20b"))
    assert gpt_oss["total"] / 1e9 == pytest.approx(20.91, rel=0.01)
    # the model card's 3.61B active excludes the embedding table, includes the unembedding
    assert (gpt_oss["active"] - gpt_oss["embedding"]) / 1e9 == pytest.approx(3.61, rel=0.05)


def test_llama3_8b_flops_per_token_by_hand():
    config = preset("llama3-8b")
    matmul = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096
    attention = 12 * 32 * 32 * 128 * 8192
    assert flops_per_token(config, 8192) == 6 * matmul + attention == 57_912_852_480


def test_tied_head_counts_once_in_parameters_but_still_costs_flops():
    untied = ModelConfig(vocab_size=100, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                         tie_embeddings=False)
    tied = untied.model_copy(update={"tie_embeddings": True})
    assert parameter_counts(untied)["total"] - parameter_counts(tied)["total"] == 100 * 16
    assert parameter_counts(tied)["output"] == 0
    assert flops_per_token(tied, 8) == flops_per_token(untied, 8)


def test_moe_active_counts_only_top_k_routed_experts():
    moe = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=1, first_dense_layers=1)
    config = ModelConfig(vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=6,
                         tie_embeddings=True, moe=moe)
    attention = 4 * 4 * 4
    expert = 3 * 4 * 8
    dense_block = attention + 3 * 4 * 6 + 2 * 4
    moe_total = attention + 4 * 4 + 4 * expert + expert + 2 * 4          # router, 4 routed, 1 shared
    moe_active = attention + 4 * 4 + 2 * expert + expert + 2 * 4
    counts = parameter_counts(config)
    assert counts["per_layer"] == [dense_block, moe_total]
    assert counts["total"] == 10 * 4 + dense_block + moe_total + 4
    assert counts["active"] == 10 * 4 + dense_block + moe_active + 4
    matmul = (dense_block - 8) + (moe_active - 8) + 10 * 4
    assert flops_per_token(config, 5) == 6 * matmul + 12 * 2 * 2 * 2 * 5


def test_attention_term_grows_linearly_with_sequence_length():
    config = preset("llama3-70b")
    step = flops_per_token(config, 2048) - flops_per_token(config, 1024)
    assert step == 12 * 80 * 64 * 128 * 1024
    with pytest.raises(ValueError):
        flops_per_token(config, 0)


@pytest.mark.parametrize("shape", [
    dict(tie_embeddings=True),
    dict(tie_embeddings=False, n_kv_heads=2),
    dict(tie_embeddings=False, moe=dict(n_experts=4, top_k=2, expert_ffn_dim=48, n_shared_experts=1,
                                        first_dense_layers=1, every_n_layers=2)),
])
def test_counts_equal_the_real_module(shape):
    decoder = pytest.importorskip("gonogo.model.decoder")
    import torch

    config = ModelConfig(vocab_size=96, d_model=64, n_layers=4, n_heads=4, ffn_dim=96, **shape)
    with torch.device("meta"):
        model = decoder.Decoder(config)
    assert parameter_counts(config)["total"] == sum(p.numel() for p in model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    assert parameter_counts(config)["embedding"] == embedding


@pytest.mark.parametrize("name", ["llama3-8b", "deepseek-v3", "gpt-oss-20b", "tiny-moe"])
def test_preset_counts_equal_the_real_module(name):
    decoder = pytest.importorskip("gonogo.model.decoder")
    import torch

    config = preset(name)
    with torch.device("meta"):
        model = decoder.Decoder(config)
    assert parameter_counts(config)["total"] == sum(p.numel() for p in model.parameters())
