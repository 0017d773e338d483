"""The shape of a decoder (its `ModelConfig`): dense Llama-style, optionally with Mixture-of-Experts layers.

Kept as data (the ``[model]`` table of a preset in ``gonogo/configs/``) so that the same shape
drives the trainer, the inference engine, the Hugging Face export and the capacity planner.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import model_validator

from gonogo.typed_config import Strict


class MoEConfig(Strict):
    n_experts: int = 8
    top_k: int = 2
    expert_ffn_dim: int = 256                # hidden width of one routed expert
    n_shared_experts: int = 0                # always-on experts (DeepSeek style), same width
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_norm: bool = False                 # renormalise the top-k scores to sum to 1
    aux_loss_coef: float = 0.01              # Switch-style load-balancing loss; 0 disables it
    bias_update_rate: float = 0.0            # aux-loss-free balancing (DeepSeek-V3); 0 disables it
    capacity_factor: Optional[float] = None  # None = dropless; else tokens per expert are capped
    first_dense_layers: int = 0              # the first k layers keep a dense MLP
    every_n_layers: int = 1                  # then every n-th layer is MoE
    # Qwen2-MoE's shared expert: its own width (None = n_shared_experts · expert_ffn_dim) and a
    # per-token sigmoid gate on its output
    shared_expert_ffn_dim: Optional[int] = None
    shared_expert_gate: bool = False

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if (self.shared_expert_ffn_dim is not None or self.shared_expert_gate) and not self.n_shared_experts:
            raise ValueError("shared_expert_ffn_dim / shared_expert_gate need n_shared_experts >= 1")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError("capacity_factor must be > 0 (or left out for dropless routing)")
        return self

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers and (layer - self.first_dense_layers) % self.every_n_layers == 0


class RopeScaling(Strict):
    """Llama 3.x's RoPE frequency scaling (the "llama3" rope_type of Hugging Face configs)."""

    rope_type: Literal["llama3"] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


class ModelConfig(Strict):
    vocab_size: int = 384
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 512                       # SwiGLU hidden width of the dense MLP
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    moe: Optional[MoEConfig] = None
    # features of imported Hugging Face models; the defaults are gonogo's own decoder
    attention_head_dim: Optional[int] = None  # None = d_model / n_heads (Qwen3 and Mistral set their own)
    rope_scaling: Optional[RopeScaling] = None
    qkv_bias: bool = False                    # biases on q, k, v (Qwen2); never on the output projection
    qk_norm: bool = False                     # RMSNorm of each q and k head before RoPE (Qwen3)
    # the transformers architecture the weights were imported from (export goes back to it)
    hf_architecture: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.attention_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2 or self.head_dim <= 0:
            raise ValueError(f"the head dimension {self.head_dim} must be even and positive for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer)
