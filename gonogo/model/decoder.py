"""The decoder: a Llama-style transformer in plain PyTorch, read top to bottom.

tokens → embedding → n_layers × [RMSNorm → grouped-query attention with RoPE → residual,
RMSNorm → SwiGLU MLP (or a Mixture-of-Experts layer) → residual] → RMSNorm → output head.

The module knows nothing of parallelism: the trainer applies FSDP / expert parallelism from the
outside (gonogo.parallel), the inference engine passes its
own KV cache object through ``forward(..., cache=...)``.

RoPE uses the "rotate half" layout of Hugging Face's Llama (the two halves of each head are the
real and imaginary parts), so exported weights load into ``LlamaForCausalLM`` by renaming only,
with no permutation of wq/wk.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Any, Iterator, Optional, cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from gonogo.model.shape import ModelConfig, RopeScaling
from gonogo.model.feedforward import FeedForward, stack_pays
from gonogo.model.moe import MoE

INIT_STD = 0.02


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at ``positions`` [B, T], each shaped [B, 1, T, head_dim].

    Computed per forward from the positions (no cached table): it is B·T·head_dim/2 work, and a
    buffer would have to be rebuilt after every meta-device build.
    """
    inverse_frequency = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inverse_frequency = _llama3_frequencies(inverse_frequency, scaling)
    angles = positions.float()[..., None] * inverse_frequency  # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _llama3_frequencies(inverse_frequency: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.x: long wavelengths slowed by ``factor``, short ones kept, a smooth blend between."""
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inverse_frequency
    slow = wavelength > context / scaling.low_freq_factor
    fast = wavelength < context / scaling.high_freq_factor
    smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inverse_frequency / scaling.factor + smooth * inverse_frequency
    scaled = torch.where(slow, inverse_frequency / scaling.factor, inverse_frequency)
    return torch.where(~slow & ~fast, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim]: pairs are (i, i + head_dim/2), the Hugging Face layout."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos + rotated_half * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Causal SDPA over whole sequences; in fp32 when training in bf16/fp16 on a CPU.

    ATen's CPU flash-attention backward in bf16 runs its small per-block GEMMs with bf16
    accumulators (grad_q/k/v summed in bf16 over the query blocks); in fp32 it is both exact to
    fp32 and faster: on a 2-core Xeon with AMX, a bf16 training step at d=256, T=256 went from
    ~10.0k to ~11.4k tokens/s (two interleaved pairs of `gonogo train`, 3 December 2026). The casts
    are B·T·d elements each, noise beside the T² work. A forward without gradients (validation,
    eval) keeps the input dtype: there the bf16 forward kernel is the faster one. CUDA keeps its
    own (fp32-accumulating) kernels.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled():
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=grouped)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)


def _causal_mask(T_new: int, T_all: int, device: torch.device) -> Optional[torch.Tensor]:
    """Causal mask for T_new queries that are the last T_new of T_all keys (None = attend all)."""
    if T_new == 1:
        return None
    offset = T_all - T_new
    query_positions = torch.arange(T_new, device=device)[:, None] + offset
    key_positions = torch.arange(T_all, device=device)[None, :]
    return key_positions <= query_positions


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        bias = config.qkv_bias
        self.wq = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, T, heads·head_dim]: one GEMM over the three weights stacked when they are plain
        Linear layers (a LoRA/peft wrapper keeps its own three calls).

        Same math as three calls: every output element is the same dot product; the weights keep
        their own names (checkpoints, export), only the forward stacks them. One GEMM of 3x the
        width uses the cores better than three thin ones, and the backward gives x one gradient
        instead of three to add.
        """
        if not stack_pays(x) or not self._fusable:
            return self.wq(x), self.wk(x), self.wv(x)
        weight = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
        bias = None if self.wq.bias is None else torch.cat([self.wq.bias, self.wk.bias, self.wv.bias])
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return F.linear(x, weight, bias).split([q_width, kv_width, kv_width], dim=-1)

    @property
    def _fusable(self) -> bool:
        return all(type(layer) is nn.Linear for layer in (self.wq, self.wk, self.wv))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        grouped = self.n_kv_heads != self.n_heads
        if cache is None:
            out = causal_attention(q, k, v, grouped)
        else:
            k_all, v_all, mask = cache.update(self.layer_index, k, v)
            T_all = k_all.shape[2]
            if mask is None:
                if T == T_all:
                    out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=grouped)
                else:
                    # SDPA's is_causal aligns the mask top-left; new queries sit at the bottom
                    mask = _causal_mask(T, T_all, x.device)
                    out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=grouped)
            else:
                out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=grouped)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config, layer_index)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        if config.is_moe_layer(layer_index):
            assert config.moe is not None  # is_moe_layer is False without it
            self.moe = MoE(config.d_model, config.moe)
        else:
            self.feed_forward = FeedForward(config.d_model, config.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        mlp = self.moe if hasattr(self, "moe") else self.feed_forward
        return h + mlp(self.ffn_norm(h))


if TYPE_CHECKING:
    class _Blocks(nn.ModuleList):
        """Decoder.layers as the type checker sees it: a plain nn.ModuleList at runtime that holds
        only TransformerBlocks (torch types a ModuleList's items as Module)."""

        def __iter__(self) -> Iterator[TransformerBlock]: ...

        @overload
        def __getitem__(self, idx: slice) -> nn.ModuleList: ...
        @overload
        def __getitem__(self, idx: int) -> TransformerBlock: ...
        def __getitem__(self, idx: int | slice) -> TransformerBlock | nn.ModuleList: ...


class Decoder(nn.Module):
    """A Llama-style decoder; MoE layers where ``config.moe`` says so.

    A model built on a real device starts initialised as ``init_weights(seed=0)``; one built on
    the meta device allocates nothing (call ``to_empty`` then ``init_weights`` to materialise it).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = cast("_Blocks", nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers)))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if not config.tie_embeddings:
            self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights(seed=0)

    def forward(self, tokens: torch.Tensor, *, positions: Optional[torch.Tensor] = None, cache: Any = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T].

        ``positions`` [B, T] are the RoPE positions (default 0..T-1 for every row); with a
        ``cache``, each layer hands its new keys/values to ``cache.update`` and attends over what
        it returns (see gonogo/infer for the cache).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype, self.config.rope_scaling)
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        h = self.norm(h)
        if self.config.tie_embeddings:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    # ---- Mixture-of-Experts bookkeeping (all no-ops for a dense model) ----

    def moe_layers(self) -> list[MoE]:
        return [layer.moe for layer in self.layers if hasattr(layer, "moe")]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the load-balancing losses of the last forward, coefficient included (0-dim)."""
        total = torch.zeros((), device=self.norm.weight.device)
        for moe in self.moe_layers():
            if moe.last_aux_loss is not None:
                total = total + moe.last_aux_loss
        return total

    def moe_token_counts(self) -> list[torch.Tensor]:
        """Per MoE layer, the tokens routed to each expert in the last forward (LongTensor[n_experts])."""
        return [moe.last_token_counts for moe in self.moe_layers() if moe.last_token_counts is not None]

    @torch.no_grad()
    def update_router_biases(self, process_group: Any = None) -> None:
        """The aux-loss-free bias update (DeepSeek-V3) from the last forward's counts.

        When torch.distributed is initialised the counts are summed over ``process_group``
        (default: all ranks) first, so every rank moves its biases identically.
        """
        for moe in self.moe_layers():
            moe.update_bias(process_group)

    # ---- initialisation ----

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init: normal(0, 0.02), output projections scaled by 1/sqrt(2·n_layers).

        Each parameter draws from its own CPU generator seeded by (seed, parameter name), so the
        values do not depend on the device, on the order of initialisation, or on which
        parameters a rank holds (an expert-parallel rank takes its slice of the full experts).
        """
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for module_path, parameter in self.named_parameters():
            name = _canonical_name(module_path)
            if name.endswith("norm.weight"):
                _copy_into(parameter, torch.ones(parameter.shape))
                continue
            if name.endswith(".bias"):
                _copy_into(parameter, torch.zeros(parameter.shape))
                continue
            std = residual_std if _is_residual_projection(name) else INIT_STD
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full_shape, index = _full_shape_and_slice(self, module_path, parameter)
            values = torch.randn(full_shape, generator=generator) * std
            _copy_into(parameter, values[index] if index is not None else values)
        for moe in self.moe_layers():
            moe.reset_state()


def _canonical_name(name: str) -> str:
    """The contract name of a parameter, without wrapper prefixes added by compile or checkpointing."""
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _is_residual_projection(name: str) -> bool:
    """wo and w2 write into the residual stream; GPT-2 scales their init by 1/sqrt(2·n_layers)."""
    parts = name.split(".")
    key = parts[-2] if parts[-1] == "weight" else parts[-1]  # stacked experts have no ".weight"
    return key in ("wo", "w2")


def _full_shape_and_slice(model: Decoder, module_path: str, parameter: torch.Tensor) -> tuple[torch.Size, Optional[slice]]:
    """For expert weights held in part by this rank: the full stacked shape and this rank's slice."""
    if ".moe.experts." in module_path:
        # a GroupedExperts, or gonogo.parallel.expert's ShardedExperts (not a subclass, same counts)
        experts: Any = model.get_submodule(module_path.rsplit(".", 1)[0])
        start, count, total = experts.expert_start, experts.n_local_experts, experts.n_experts
        if count != total:
            return torch.Size((total, *parameter.shape[1:])), slice(start, start + count)
    return parameter.shape, None  # a DTensor reports its global shape here


def _copy_into(parameter: torch.Tensor, values: torch.Tensor) -> None:
    """Copy full CPU values into a parameter that may live on any device or be a sharded DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(parameter, DTensor):
        mesh = parameter.device_mesh
        values = distribute_tensor(values.to(mesh.device_type), mesh, parameter.placements)
        parameter.copy_(values)
    else:
        parameter.copy_(values.to(parameter.device, parameter.dtype))
