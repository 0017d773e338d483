"""The dense decoder: shapes, causality, GQA, RoPE positions, the KV-cache protocol, init, meta build."""

from __future__ import annotations

import pytest
import torch

from gonogo.model.shape import ModelConfig
from gonogo.model.decoder import Decoder

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and OpenMP barriers stall when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def tokens(B: int = 2, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (B, T), generator=torch.Generator().manual_seed(seed))


class ConcatCache:
    """The simplest cache honouring the protocol: keep every layer's keys/values, concatenate."""

    def __init__(self, mask_fn=None):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.mask_fn = mask_fn

    def update(self, layer_index, k, v):
        if layer_index in self.keys:
            k = torch.cat([self.keys[layer_index], k], dim=2)
            v = torch.cat([self.values[layer_index], v], dim=2)
        self.keys[layer_index], self.values[layer_index] = k, v
        return k, v, None if self.mask_fn is None else self.mask_fn(k.shape[2])


def test_logits_shape_and_dtype():
    model = Decoder(tiny())
    logits = model(tokens(3, 10))
    assert logits.shape == (3, 10, 384)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_changing_a_future_token_leaves_past_logits_unchanged():
    model = Decoder(tiny())
    x = tokens(2, 12)
    changed = x.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 384
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_heads():
    grouped = Decoder(tiny(n_heads=4, n_kv_heads=2))
    full = Decoder(tiny(n_heads=4, n_kv_heads=4))
    head_dim = grouped.config.head_dim
    state = {}
    for name, value in grouped.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # query heads 0,1 share kv head 0 and 2,3 share kv head 1
            value = value.view(2, head_dim, -1).repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
        state[name] = value
    full.load_state_dict(state)
    assert grouped.layers[0].attention.wk.weight.shape == (2 * head_dim, 64)
    x = tokens()
    torch.testing.assert_close(grouped(x), full(x))


def test_rope_depends_only_on_relative_positions():
    model = Decoder(tiny())
    x = tokens(2, 10)
    base = torch.arange(10).expand(2, 10)
    a = model(x, positions=base)
    b = model(x, positions=base + 37)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(a, model(x, positions=base.flip(-1)))


def test_tied_output_has_one_vocab_matrix_fewer():
    tied = Decoder(tiny(tie_embeddings=True))
    untied = Decoder(tiny(tie_embeddings=False))
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(untied) - count(tied) == 384 * 64
    assert "output.weight" not in dict(tied.named_parameters())
    assert untied(tokens()).shape == (2, 12, 384)


def test_parameter_names_follow_the_contract():
    names = set(dict(Decoder(tiny(tie_embeddings=False)).named_parameters()))
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    assert names == expected


def test_incremental_decoding_with_a_cache_matches_the_full_forward():
    model = Decoder(tiny())
    x = tokens(2, 12)
    full = model(x)
    cache = ConcatCache()
    prefill = model(x[:, :5], positions=torch.arange(5).expand(2, 5), cache=cache)
    steps = [prefill]
    # one chunk of 3 new tokens (queries at the bottom of the causal mask), then one at a time
    steps.append(model(x[:, 5:8], positions=torch.arange(5, 8).expand(2, 3), cache=cache))
    for t in range(8, 12):
        steps.append(model(x[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.keys[0].shape == (2, 2, 12, 16)  # [B, n_kv_heads, T, head_dim]


def test_cache_mask_is_honoured_for_left_padded_rows():
    """A cache that masks out a padded prefix gives the same logits as the unpadded sequence."""
    model = Decoder(tiny())
    x = tokens(1, 6)
    reference = model(x)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    positions = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.arange(6)[None]], dim=1)

    def mask_fn(T_all):
        causal = torch.ones(T_all, T_all, dtype=torch.bool).tril()
        causal[:, :3] = False  # nobody attends to the padding...
        causal |= torch.eye(T_all, dtype=torch.bool)  # ...but a padded query needs one key (its output is ignored)
        return causal[None, None]

    logits = model(padded, positions=positions, cache=ConcatCache(mask_fn))
    torch.testing.assert_close(logits[:, 3:], reference, atol=1e-5, rtol=1e-4)


def test_init_is_deterministic_and_seeded():
    a, b = Decoder(tiny()), Decoder(tiny())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    b.init_weights(seed=1)
    assert not torch.equal(a.tok_embeddings.weight, b.tok_embeddings.weight)
    std = a.tok_embeddings.weight.std().item()
    assert 0.018 < std < 0.022
    residual_std = a.layers[0].attention.wo.weight.std().item()
    assert 0.018 / 2 < residual_std < 0.022 / 2  # 0.02 / sqrt(2 · n_layers), n_layers = 2
    assert torch.equal(a.norm.weight, torch.ones(64))


def test_meta_build_then_to_empty_and_init_equals_a_direct_build():
    direct = Decoder(tiny())
    direct.init_weights(seed=5)
    with torch.device("meta"):
        lazy = Decoder(tiny())
    assert lazy.tok_embeddings.weight.is_meta
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=5)
    for (name, pa), pb in zip(direct.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_a_405b_shape_builds_on_meta_without_allocating():
    config = ModelConfig(vocab_size=128256, d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                         ffn_dim=53248, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False)
    with torch.device("meta"):
        model = Decoder(config)
    parameters = list(model.parameters())
    assert all(p.is_meta for p in parameters)
    total = sum(p.numel() for p in parameters)
    assert 405e9 < total < 406e9  # Llama 3.1 405B: 405.8B parameters
    logits = model(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 4, 128256)


def test_matches_hugging_face_llama_with_renamed_weights():
    transformers = pytest.importorskip("transformers")
    config = tiny(tie_embeddings=False)
    model = Decoder(config)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    renames = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
    state = {}
    for name, value in model.state_dict().items():
        if name == "output.weight":
            state["lm_head.weight"] = value
            continue
        name = name.replace("tok_embeddings", "embed_tokens")
        for ours, theirs in renames.items():
            name = name.replace(ours, theirs)
        state["model." + name] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in key for key in missing)
    x = tokens(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_stacked_projections_give_the_same_logits_as_separate_ones(monkeypatch, qkv_bias):
    """A prefill (no gradient recorded, >= 64 tokens) stacks q/k/v and w1/w3 into one GEMM each:
    the logits agree with the separate layers' to fp32 rounding."""
    import gonogo.model.feedforward as feedforward_module

    model = Decoder(tiny(qkv_bias=qkv_bias))
    batch = tokens(B=4, T=32, seed=0)
    with torch.no_grad():
        stacked = model(batch)
        monkeypatch.setattr(feedforward_module, "STACK_MIN_TOKENS", 10**9)
        separate = model(batch)
    torch.testing.assert_close(stacked, separate, rtol=1e-5, atol=1e-5)


def test_training_keeps_separate_projections():
    """A forward that records gradients never stacks: training computes what the plan's gates were
    calibrated on (the stacked GEMM's bf16 rounding moved a 300-step run onto another trajectory)."""
    from gonogo.model import feedforward

    x = torch.zeros(2, 64, 8)
    assert not feedforward.stack_pays(x)
    with torch.no_grad():
        assert feedforward.stack_pays(x)
    model = Decoder(tiny())
    calls = []
    model.layers[0].attention.wq.register_forward_hook(lambda *_: calls.append("wq"))
    model.layers[0].feed_forward.w1.register_forward_hook(lambda *_: calls.append("w1"))
    model(tokens(B=2, T=40)).sum().backward()
    assert calls == ["wq", "w1"]


def test_a_decode_step_keeps_separate_projections(monkeypatch):
    """One token per row would copy every weight once more per token: no stacking there."""
    from gonogo.model import feedforward

    with torch.no_grad():
        assert feedforward.stack_pays(torch.zeros(2, 64, 8))
        assert not feedforward.stack_pays(torch.zeros(4, 1, 8))
    model = Decoder(tiny())
    calls = []
    model.layers[0].attention.wq.register_forward_hook(lambda *_: calls.append("wq"))
    with torch.no_grad():
        model(tokens(B=1, T=1))
    assert calls == ["wq"]
    calls.clear()
    with torch.no_grad():
        model(tokens(B=2, T=40))
    assert calls == []  # stacked: the wq module is not called, its weight is


@pytest.mark.parametrize("grouped", [False, True])
def test_bf16_training_attention_on_a_cpu_runs_in_fp32_and_a_forward_without_gradients_does_not(grouped):
    import torch.nn.functional as F

    from gonogo.model.decoder import causal_attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2 if grouped else 4, 32, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = causal_attention(q, k, v, grouped)
    assert out.dtype == torch.bfloat16
    in_fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=grouped)
    assert torch.equal(out, in_fp32.to(torch.bfloat16))
    # the fp32 kernel's gradients (cast to bf16 by autograd) are closer to the exact ones than bf16 flash's
    grad = torch.randn_like(out)
    out.backward(grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=grouped).backward(grad.double())
    ours = [t.grad.double() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped).backward(grad)
    bf16_flash = [t.grad.double() for t in (q, k, v)]

    def error(grads):
        return sum(((g - e.grad).norm() / e.grad.norm()).item() for g, e in zip(grads, exact))
    assert error(ours) < error(bf16_flash)
    with torch.no_grad():  # validation and eval: the bf16 forward kernel, the faster one there
        assert torch.equal(causal_attention(q, k, v, grouped),
                           F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped))
