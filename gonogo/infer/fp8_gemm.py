"""Real FP8 matrix multiplies (``torch._scaled_mm``) for the ``fp8`` format, where the GPU has them.

Hopper (sm_90) and Ada (sm_89) GPUs multiply FP8 E4M3 matrices in their tensor cores at twice
the bf16 rate. ``Fp8Linear`` replaces a decoder's ``nn.Linear``: its weight is E4M3 with one
fp32 scale per tensor (``amax / 448``); each input is quantized the same way on the fly
(dynamic per-tensor scaling, as vLLM's and TransformerEngine's default FP8 recipes do), and
``_scaled_mm`` returns ``(x_scale · x8) @ (w_scale · w8)ᵀ`` in bf16. Per-tensor scaling is the
form every ``_scaled_mm`` build supports; it rounds the stored per-row weights once more, and
that cost is inside the accuracy delta the quantize stage reports.

``_scaled_mm`` wants both dimensions of both operands divisible by 16 and the second operand
column-major: the weight is padded with zero rows/columns once, the input's rows and columns
per call (zeros add nothing to a dot product), and the result is cut back.

Where there is no FP8 GEMM (the CPU, a GPU before sm_89) the format stays emulated: the weights
are dequantized into an ordinary bf16/fp32 decoder (gonogo.checkpoints.quantized), which measures the
format's accuracy cost but not its speed. NVFP4's 4-bit GEMMs need Blackwell (sm_100); gonogo
emulates NVFP4 everywhere and says so.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
ALIGN = 16
FP8_MIN_CAPABILITY = (8, 9)      # Ada; Hopper is (9, 0)
NVFP4_MIN_CAPABILITY = (10, 0)   # Blackwell


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def gemm_path(format: str, device: torch.device) -> tuple[bool, str]:
    """(whether real low-precision GEMMs run, one line saying which path and why)."""
    capability = _capability(device)
    where = "the CPU" if capability is None else f"sm_{capability[0]}{capability[1]}"
    if format == "fp8":
        if capability is not None and capability >= FP8_MIN_CAPABILITY:
            return True, f"FP8 GEMMs (torch._scaled_mm, per-tensor scales) on {where}"
        return False, f"emulated (dequantized weights): FP8 GEMMs need sm_89 or newer (Ada/Hopper); this is {where}"
    if capability is not None and capability >= NVFP4_MIN_CAPABILITY:
        return False, f"emulated (dequantized weights): gonogo has no NVFP4 GEMM kernel yet, even on {where}"
    return False, f"emulated (dequantized weights): NVFP4 GEMMs need Blackwell (sm_100); this is {where}"


def _round_up(value: int) -> int:
    return -(-value // ALIGN) * ALIGN


def _to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale as saturated E4M3, the fp32 per-tensor scale)."""
    scale = (x.detach().abs().amax().float() / E4M3_MAX).clamp_min(1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """y = x Wᵀ with W in E4M3 (per-tensor scale) and x quantized per call, via ``torch._scaled_mm``.

    The E4M3 bytes and the fp32 scale are kept as integer buffers (viewed back per call), so a
    ``model.to(dtype=bf16)`` of the surrounding decoder does not cast them.
    """

    weight_bits: torch.Tensor
    scale_bits: torch.Tensor

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        padded = torch.zeros(_round_up(self.out_features), _round_up(self.in_features), device=weight.device)
        padded[:self.out_features, :self.in_features] = weight.detach().float()
        weight8, scale = _to_e4m3(padded)
        self.register_buffer("weight_bits", weight8.view(torch.uint8))          # [N_pad, K_pad] row-major
        self.register_buffer("scale_bits", scale.reshape(1).view(torch.int32))  # fp32 bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        M, K = rows.shape
        M_pad, K_pad = _round_up(M), int(self.weight_bits.shape[1])
        if (M_pad, K_pad) != (M, K):
            rows = torch.nn.functional.pad(rows, (0, K_pad - K, 0, M_pad - M))
        x8, x_scale = _to_e4m3(rows)
        weight8 = self.weight_bits.view(torch.float8_e4m3fn)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        out = torch._scaled_mm(x8, weight8.t(), scale_a=x_scale, scale_b=self.scale_bits.view(torch.float32)[0],
                               out_dtype=out_dtype)
        return out[:M, :self.out_features].to(x.dtype).reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"


def use_fp8_gemms(model: nn.Module) -> int:
    """Replace the decoder's linear layers that the ``fp8`` format quantizes (attention and the
    dense MLP) by ``Fp8Linear``, in place; the embedding, the head and MoE experts stay as they
    are. -> how many layers were replaced."""
    replaced = 0
    for block in getattr(model, "layers", []):
        targets = [(block.attention, name) for name in ("wq", "wk", "wv", "wo")]
        if hasattr(block, "feed_forward"):
            targets += [(block.feed_forward, name) for name in ("w1", "w2", "w3")]
        for parent, name in targets:
            linear = getattr(parent, name)
            if isinstance(linear, nn.Linear):
                setattr(parent, name, Fp8Linear(linear.weight))
                replaced += 1
    return replaced


def has_fp8_gemms(model: nn.Module) -> bool:
    return any(isinstance(module, Fp8Linear) for module in model.modules())
