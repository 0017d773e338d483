"""The Mixture-of-Experts layer: a token-choice top-k router over SwiGLU experts.

For each token the router scores every expert (softmax or sigmoid), picks the top_k experts
(by score + a per-expert bias that only steers the choice, DeepSeek-V3's aux-loss-free
balancing), and the token's output is the score-weighted sum of those experts' outputs, plus an
optional always-on shared expert. Load balancing: the Switch-style auxiliary loss
(``aux_loss_coef``) and/or the bias update (``bias_update_rate``). Routing is dropless, or with a
``capacity_factor`` each expert takes at most ceil(capacity_factor · tokens · top_k / n_experts)
assignments in training: the earliest tokens in the batch win and the rest get 0 from that
expert. In eval mode routing is always dropless, so a token's output never depends on which
other requests share its batch (the inference engine batches them freely).

Computation: the (token, expert) assignments are sorted by expert, so each expert runs one
matmul over a contiguous block of tokens (a loop over experts, not over tokens). The experts
module only sees "tokens sorted by expert + counts per expert", which is what lets
``gonogo.parallel.expert`` replace it with a version that sends the blocks to other ranks.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gonogo.model.shape import MoEConfig
from gonogo.model.feedforward import FeedForward


def run_experts(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """SwiGLU of each expert over its block of ``x`` (rows sorted by expert, ``counts`` rows each)."""
    assert len(counts) == w1.shape[0] and sum(counts) == x.shape[0]
    outputs = []
    # unbind, not w1[e]: its backward is one stack, where indexing adds a full-size [E, ...]
    # gradient per expert (quadratic in E; measured 4x slower at 64 experts)
    for gate, down, up, block in zip(w1.unbind(0), w2.unbind(0), w3.unbind(0), x.split(counts)):
        # empty blocks are computed too (no cost): every expert weight then gets a gradient, zero if
        # unused, which DDP/FSDP need, and expert-parallel ranks run the same backward collectives
        hidden = F.silu(block @ gate.t()) * (block @ up.t())
        outputs.append(hidden @ down.t())
    return torch.cat(outputs)


class GroupedExperts(nn.Module):
    """n_experts SwiGLU MLPs with stacked weights: w1, w3 [E, hidden, D] and w2 [E, D, hidden].

    Each expert's slice has nn.Linear's [out, in] layout (what the Hugging Face export expects).
    ``expert_start`` / ``n_local_experts`` say which experts of ``n_experts`` this module holds:
    all of them here, a slice under expert parallelism.
    """

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.expert_start = 0
        self.n_local_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        for weight in (self.w1, self.w2, self.w3):
            nn.init.normal_(weight, std=0.02)  # a no-op on the meta device

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: token rows sorted by expert; counts: LongTensor[n_experts] rows per expert."""
        return run_experts(self.w1, self.w2, self.w3, x, counts.tolist())


class MoE(nn.Module):
    """Router + routed experts (+ shared expert); replaces the dense MLP of a transformer block."""

    expert_bias: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = nn.Linear(dim, config.n_experts, bias=False)
        self.experts = GroupedExperts(config.n_experts, dim, config.expert_ffn_dim)
        if config.n_shared_experts:
            width = config.shared_expert_ffn_dim or config.n_shared_experts * config.expert_ffn_dim
            self.shared_expert: Optional[FeedForward] = FeedForward(dim, width)
        else:
            self.shared_expert = None
        # Qwen2-MoE scales the shared expert's output by sigmoid(gate · x), per token
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if config.shared_expert_gate else None
        # steers expert selection only; saved with the model, never trained by gradients
        self.register_buffer("expert_bias", torch.zeros(config.n_experts), persistent=True)
        self.last_token_counts: Optional[torch.Tensor] = None
        self.last_dropped: Optional[torch.Tensor] = None
        self.last_aux_loss: Optional[torch.Tensor] = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens x [N, D]: chosen experts [N, k], their combine weights [N, k] (fp32), scores [N, E]."""
        logits = self.router(x).float()
        if self.config.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        # the bias moves the choice, the unbiased score weighs the output (DeepSeek-V3)
        chosen = (scores + self.expert_bias.float()).topk(self.config.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.config.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights, scores

    def load_balancing_loss(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """coef · E · Σ_e f_e · P_e: f_e = share of assignments to e, P_e = mean routing probability of e.

        Equal to coef when the load is uniform; it rises as tokens and probability pile on the
        same experts. Sigmoid scores are normalised per token to make P a distribution.
        """
        n_experts = self.config.n_experts
        fraction = counts.float() / counts.sum()
        probability = scores / scores.sum(dim=-1, keepdim=True) if self.config.score_func == "sigmoid" else scores
        return self.config.aux_loss_coef * n_experts * (fraction * probability.mean(dim=0)).sum()

    def capacity(self, n_tokens: int) -> Optional[int]:
        """Assignments each expert accepts from ``n_tokens`` tokens; None = unlimited."""
        if self.config.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.config.capacity_factor * n_tokens * self.config.top_k / self.config.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        tokens = x.reshape(-1, D)
        N, k, E = tokens.shape[0], self.config.top_k, self.config.n_experts
        chosen, weights, scores = self.route(tokens)

        counts = torch.bincount(chosen.flatten(), minlength=E)
        self.last_token_counts = counts.detach()
        # coefficient included: the trainer adds model.aux_loss() to the loss as it is
        self.last_aux_loss = self.load_balancing_loss(scores, counts) if self.config.aux_loss_coef > 0 else None

        # assignment a = token a // k, slot a % k; a stable sort keeps token order within an expert
        order = torch.argsort(chosen.flatten(), stable=True)
        capacity = self.capacity(N)
        if capacity is not None:
            expert_starts = torch.cumsum(counts, 0) - counts
            sorted_experts = chosen.flatten()[order]
            position_in_expert = torch.arange(N * k, device=x.device) - expert_starts[sorted_experts]
            order = order[position_in_expert < capacity]
            kept = counts.clamp(max=capacity)
        else:
            kept = counts
        self.last_dropped = (counts - kept).sum().detach()

        expert_outputs = self.experts(tokens[order // k], kept)
        # each assignment has one row; scattering (not adding) into it keeps this deterministic
        per_assignment = tokens.new_zeros(N * k, D).index_copy(0, order, expert_outputs.to(tokens.dtype))
        out = (per_assignment.view(N, k, D) * weights.to(tokens.dtype).unsqueeze(-1)).sum(dim=1)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared
        return out.view(B, T, D)

    @torch.no_grad()
    def update_bias(self, process_group: Any = None) -> None:
        """bias_e += rate · sign(mean load − load_e), centred: under-loaded experts get chosen more."""
        if self.config.bias_update_rate == 0 or self.last_token_counts is None:
            return
        counts = self.last_token_counts.float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, group=process_group)
        delta = self.config.bias_update_rate * torch.sign(counts.mean() - counts)
        self.expert_bias.add_((delta - delta.mean()).to(self.expert_bias.dtype))

    def reset_state(self) -> None:
        self.expert_bias.zero_()
        self.last_token_counts = None
        self.last_dropped = None
        self.last_aux_loss = None
