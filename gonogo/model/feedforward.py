"""The dense SwiGLU feed-forward layer, and when stacking two weights into one GEMM pays.

Its own module because both the decoder's dense layers and an MoE layer's shared expert use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STACK_MIN_TOKENS = 64


def stack_pays(x: torch.Tensor) -> bool:
    """Whether to stack weights into one GEMM: only in a forward that records no gradient (a
    prefill, a validation batch) of enough tokens.

    The copy is d·width, the GEMM tokens·d·width: a decode step (one token per row) would copy
    every weight once more per token, so it keeps separate calls. Training keeps them too: in bf16
    the stacked GEMM rounds differently (gradients ~0.6% apart), and over the laptop plan's 300
    pretraining steps that moved the run onto another trajectory whose finetune reached val loss
    0.39 instead of 0.21 and greedy accuracy 0.08 instead of 0.22 (2 of 2 runs; the separate
    layers reproduce the calibrated run bit for bit). Until the eval's gates are measured over
    several trajectories, a training step computes what the gates were calibrated on.
    """
    return not torch.is_grad_enabled() and x.numel() >= STACK_MIN_TOKENS * x.shape[-1]


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if stack_pays(x) and type(self.w1) is nn.Linear and type(self.w3) is nn.Linear:
            # w1 and w3 in one GEMM (as gonogo.model.decoder.Attention._project_qkv): same values, one pass
            gate, up = F.linear(x, torch.cat([self.w1.weight, self.w3.weight])).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
