"""Analytic parameter and FLOP counts of a decoder shape (no model is built).

The counts follow the module layout of ``gonogo.model.decoder.Decoder`` parameter by parameter
(no biases anywhere; RMSNorm has one weight vector), so ``parameter_counts(config)["total"]``
equals ``sum(p.numel() for p in Decoder(config).parameters())``.

Training FLOPs per token follow torchtitan's convention (``torchtitan/models/utils.py``):

    flops_per_token = 6 * N_active_matmul + 12 * n_layers * n_heads * head_dim * seq_len

- ``6 * N``: every weight of a linear layer costs one multiply and one add in the forward
  (2 FLOPs) and twice that in the backward (gradients of the input and of the weight).
- ``N_active_matmul`` is the number of weights that take part in a matmul for one token: the
  attention and MLP projections, the MoE router, the shared experts and only the ``top_k``
  routed experts a token is sent to, plus the output head. The output head counts even when it
  is tied to the embedding (the matmul still happens); the embedding lookup and the norm weights
  do not (no matmul).
- ``12 * L * H * d_head * T``: per layer, the two attention matmuls (scores ``QK^T`` and
  ``scores @ V``) cost ``2 * 2 * T * H * d_head`` FLOPs per token forward and twice that
  backward. Causal masking is not discounted (the usual convention), and the recomputation
  inside a flash-attention backward is not counted (MFU counts useful work only).
"""

from __future__ import annotations

from typing import Any

from gonogo.model.shape import ModelConfig


def _attention_params(config: ModelConfig) -> int:
    D, head_dim = config.d_model, config.head_dim
    q_and_o = 2 * D * config.n_heads * head_dim
    k_and_v = 2 * D * config.n_kv_heads * head_dim
    return q_and_o + k_and_v


def _swiglu_params(d_model: int, hidden: int) -> int:
    return 3 * d_model * hidden  # w1, w3: D -> hidden; w2: hidden -> D


def layer_counts(config: ModelConfig, layer: int) -> dict[str, int]:
    """Parameters of one transformer block, by part (``active`` = touched by one token)."""
    D = config.d_model
    attention = _attention_params(config)
    norms = 2 * D  # attention_norm, ffn_norm
    if config.is_moe_layer(layer):
        moe = config.moe
        assert moe is not None  # is_moe_layer is False without it
        expert = _swiglu_params(D, moe.expert_ffn_dim)
        router = D * moe.n_experts
        routed = moe.n_experts * expert
        shared = moe.n_shared_experts * expert
        mlp_total = router + routed + shared
        mlp_active = router + moe.top_k * expert + shared
    else:
        routed = 0
        mlp_total = mlp_active = _swiglu_params(D, config.ffn_dim)
    return {
        "attention": attention,
        "mlp": mlp_total,
        "routed_experts": routed,
        "norms": norms,
        "total": attention + mlp_total + norms,
        "active": attention + mlp_active + norms,
        "active_matmul": attention + mlp_active,
    }


def parameter_counts(config: ModelConfig) -> dict[str, Any]:
    """Parameter counts of ``config``'s decoder.

    Returns ``total`` (every parameter, the tied embedding once), ``active`` (parameters one
    token touches: ``total`` minus the routed experts it is not sent to; equal to ``total`` for
    a dense model), ``embedding`` (the token embedding table), ``output`` (the untied output
    head, 0 when tied), ``non_embedding`` (``total - embedding``), ``active_matmul`` (the
    ``N`` of ``6N``, see the module docstring) and ``per_layer`` (each block's total).
    """
    embedding = config.vocab_size * config.d_model
    output = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    layers = [layer_counts(config, i) for i in range(config.n_layers)]
    final_norm = config.d_model
    total = embedding + output + final_norm + sum(layer["total"] for layer in layers)
    active = embedding + output + final_norm + sum(layer["active"] for layer in layers)
    # the output head's matmul runs whether or not its weight is shared with the embedding
    head_matmul = config.vocab_size * config.d_model
    active_matmul = head_matmul + sum(layer["active_matmul"] for layer in layers)
    return {
        "total": total,
        "active": active,
        "embedding": embedding,
        "output": output,
        "non_embedding": total - embedding,
        "active_matmul": active_matmul,
        "routed_experts": sum(layer["routed_experts"] for layer in layers),
        "per_layer": [layer["total"] for layer in layers],
    }


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """The attention-score term of training FLOPs per token: 12 * L * H * d_head * T."""
    return 12.0 * config.n_layers * config.n_heads * config.head_dim * seq_len


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length ``seq_len``.

    ``6 * N_active_matmul + 12 * n_layers * n_heads * head_dim * seq_len`` (torchtitan's
    convention; see the module docstring). Forward-only (inference) FLOPs are a third of it.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return 6.0 * parameter_counts(config)["active_matmul"] + attention_flops_per_token(config, seq_len)
