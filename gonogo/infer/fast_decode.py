"""An inference-only forward pass over a Decoder's weights, with fewer, fused operations.

Decoding a small model on a CPU is bound by per-operation overhead, not arithmetic: one token
through 4 layers of d=256 is a few MFLOP but ~250 PyTorch calls. This path computes exactly the
Decoder's math (tests/infer/test_fast_decode.py checks the logits against it) with:

- q, k and v from one matmul (their weights concatenated once at load), and w1 and w3 likewise;
- RMSNorm as one ``F.rms_norm`` call (in fp32, as the Decoder does), RoPE applied to q and k together;
- the output head only for the positions whose logits are used (the last of a prefill, or each
  row's own last position in a right-padded batch of prompts: ``last_index``);
- every weight stored transposed ([in, out], contiguous) and applied with ``torch.matmul``: a
  plain GEMM without the transpose handling of ``F.linear`` (measured 15-20% less matmul time at
  batch 1 and 8 on an AVX2 EPYC; bench/serve.py);
- no nn.Module calls in the loop. MoE layers call the model's own MoE module unchanged.

The weights are views of / copies from the Decoder taken at construction; the Decoder itself stays
the reference implementation and is what training and export use.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypedDict

import torch
import torch.nn.functional as F

from gonogo.model.decoder import Decoder, rope_cos_sin
from gonogo.model.moe import MoE


class _Layer(TypedDict, total=False):
    """One block's weights as the loop reads them: w13/w2 for a dense block, moe for an MoE one."""

    attention_norm: torch.Tensor
    wqkv: torch.Tensor
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    moe: Optional[MoE]
    w13: torch.Tensor
    w2: torch.Tensor


class FastDecoder:
    def __init__(self, model: Decoder):
        self.config = model.config
        self.model = model
        config = model.config
        self.eps = config.norm_eps
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.grouped = bool(config.n_heads != config.n_kv_heads)   # a plain bool: no symbolic size under compile
        self.embedding = model.tok_embeddings.weight
        self.final_norm = model.norm.weight
        self.output = _t(model.tok_embeddings.weight if config.tie_embeddings else model.output.weight)
        # cos/sin of every position once (the same function the Decoder calls per forward)
        every_position = torch.arange(config.max_seq_len, device=self.embedding.device)[None]
        cos, sin = rope_cos_sin(every_position, config.head_dim, config.rope_theta, torch.float32, config.rope_scaling)
        self.rope_cos, self.rope_sin = cos[0, 0], sin[0, 0]  # [max_seq_len, head_dim]
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for block in model.layers:
                attention = block.attention
                layer: _Layer = {
                    "attention_norm": block.attention_norm.weight,
                    "wqkv": _t(torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight])),
                    "wo": _t(attention.wo.weight),
                    "ffn_norm": block.ffn_norm.weight,
                    "moe": getattr(block, "moe", None),
                }
                if layer["moe"] is None:
                    feed_forward = block.feed_forward
                    layer["w13"] = _t(torch.cat([feed_forward.w1.weight, feed_forward.w3.weight]))
                    layer["w2"] = _t(feed_forward.w2.weight)
                self.layers.append(layer)

    def parameters(self):
        return self.model.parameters()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # the Decoder normalises in fp32 and casts back before scaling by the weight
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return weight * normed

    def _block(self, h: torch.Tensor, index: int, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor,
               attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One transformer block; ``attend(index, q, k, v)`` stores this step's keys and values
        where the caller keeps them and returns the attention output [B, H, T, head_dim]."""
        B, T, _ = h.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        x = self._norm(h, layer["attention_norm"])
        qkv = torch.matmul(x, layer["wqkv"]).view(B, T, H + 2 * KV, hd).transpose(1, 2)
        qk = _rope(qkv[:, :H + KV], cos, sin)
        out = attend(index, qk[:, :H], qk[:, H:], qkv[:, H + KV:])
        h = h + torch.matmul(out.transpose(1, 2).reshape(B, T, H * hd), layer["wo"])
        x = self._norm(h, layer["ffn_norm"])
        moe = layer["moe"]
        if moe is not None:
            return h + moe(x)
        gate, up = torch.matmul(x, layer["w13"]).chunk(2, dim=-1)
        return h + torch.matmul(F.silu(gate) * up, layer["w2"])

    def __call__(self, tokens: torch.Tensor, *, positions: torch.Tensor, cache: Any,
                 last_only: bool = True, last_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T or 1, vocab]; with ``last_only`` only the last position's, with
        ``last_index`` [B] only position ``last_index[b]`` of each row b ([B, 1, vocab])."""
        B, T = tokens.shape
        grouped = self.grouped
        h = F.embedding(tokens, self.embedding)
        cos = self.rope_cos[positions].to(h.dtype)[:, None]  # [B, 1, T, head_dim]
        sin = self.rope_sin[positions].to(h.dtype)[:, None]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_all, v_all, mask = cache.update(index, k, v)
            if mask is None and T > 1:
                assert k_all.shape[2] == T, "a prefill into a non-empty row needs the cache's mask"
                return F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=grouped)
            # a decode step of equal rows (mask None, T == 1) attends to every cached key
            return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=grouped)

        for index, layer in enumerate(self.layers):
            h = self._block(h, index, layer, cos, sin, attend)
        if last_index is not None:
            h = h[torch.arange(B, device=h.device), last_index][:, None]
        elif last_only:
            h = h[:, -1:]
        return torch.matmul(self._norm(h, self.final_norm), self.output)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                    values: list[torch.Tensor], end: int) -> torch.Tensor:
        """One decode step of rows 0 .. B-1 as a pure function of tensors: logits [B, vocab].

        Row b's token ``tokens[b, 0]`` is at position ``positions[b]``; its key and value are written
        into ``keys[layer][b, :, positions[b]]`` (the KV cache's buffers, in place) and it attends to
        the keys ``0 .. positions[b]`` of ``keys[layer][:B, :, :end]`` (``end`` above every position;
        the engine rounds it up so that a compiled graph serves many steps). The same math as
        ``__call__`` with the cache's exact mask; no Python state, no ``.tolist()``: this is the
        function ``EngineSettings.compile`` hands to ``torch.compile`` (dense models only).
        """
        B = tokens.shape[0]
        h = F.embedding(tokens, self.embedding)                       # [B, 1, d]
        cos = self.rope_cos[positions].to(h.dtype)[:, None, None]     # [B, 1, 1, head_dim]
        sin = self.rope_sin[positions].to(h.dtype)[:, None, None]
        rows = torch.arange(B, device=tokens.device)
        key_positions = torch.arange(end, device=tokens.device)
        mask = (key_positions[None, :] <= positions[:, None])[:, None, None]   # [B, 1, 1, end]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys[index][rows, :, positions] = k[:, :, 0]
            values[index][rows, :, positions] = v[:, :, 0]
            return F.scaled_dot_product_attention(q, keys[index][:B, :, :end], values[index][:B, :, :end],
                                                  attn_mask=mask, enable_gqa=self.grouped)

        for index, layer in enumerate(self.layers):
            h = self._block(h, index, layer, cos, sin, attend)
        return torch.matmul(self._norm(h, self.final_norm), self.output)[:, 0]


def _t(weight: torch.Tensor) -> torch.Tensor:
    """A Linear's [out, in] weight as a contiguous [in, out] copy, for ``x @ w``."""
    return weight.detach().t().contiguous()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Decoder's rotate-half RoPE, on q and k stacked along the head axis."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def maybe_fast(model: Decoder, enabled: bool) -> Any:
    """The fused path for a plain Decoder; anything else (or disabled) runs as it is.

    Attention biases and QK-norm (imported Qwen models) are not fused here: the Decoder runs them.
    """
    # the fused path reads plain weights; FP8 GEMM layers (gonogo/infer/fp8_gemm.py) have none
    plain = isinstance(model, Decoder) and all(isinstance(block.attention.wq, torch.nn.Linear) for block in model.layers)
    if enabled and plain and not (model.config.qkv_bias or model.config.qk_norm):
        return FastDecoder(model)
    return model



def attended_length(longest: int, max_len: int) -> int:
    """Keys a compiled decode step attends to: ``longest`` rounded up to a multiple of 64 (at most
    the cache's ``max_len``), so that the mask's length changes every 64 steps, not every step."""
    return min(max_len, -(-longest // 64) * 64)


def compile_decode_step(forward: Any, *, fused: bool) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of the fused forward's decode step, or a UserError naming what to change."""
    from gonogo.errors import UserError

    if not isinstance(forward, FastDecoder):
        why = ("the fused forward is off" if not fused else
               "this model does not run on the fused forward (attention biases, QK-norm or FP8 layers)")
        raise UserError(f"--compile compiles the fused decode step, and {why}; serve without --compile")
    if any(layer["moe"] is not None for layer in forward.layers):
        raise UserError("--compile supports dense models only (an MoE layer routes tokens with "
                        "data-dependent shapes); serve this model without --compile")
    # dynamic: one graph for every batch size and attended length (the 1-row batch aside);
    # cpp_wrapper: the graph's calls made from C++, not Python (measured: bench/results/serve.md)
    return torch.compile(forward.decode_step, dynamic=True, options={"cpp_wrapper": True})
