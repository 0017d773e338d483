"""Expert parallelism: each rank of a process group holds n_experts / group_size experts.

Applied from the outside, after the model is built (the decoder knows nothing of it). Every MoE
layer's ``experts`` module is swapped for one that keeps only this rank's contiguous slice of the
stacked weights (rank r owns experts [r·L, (r+1)·L), L = n_experts / group size) and runs:

    tokens sorted by expert ──all_to_all (counts)──▶ how many rows each rank will send me
                           ──all_to_all (rows)────▶ rows for my experts, grouped by source rank
    regroup by local expert → SwiGLU per expert → undo the regrouping
                           ──all_to_all (rows)────▶ back to the rank that owns the token

Routing, capacity drops, the aux loss and the combine stay on the token's own rank, so a rank's
output is exactly what the unsharded layer gives for that rank's tokens. Gradients flow through
both exchanges (the backward of an all_to_all is the all_to_all with the splits swapped).

Parameter names do not change (``layers.{i}.moe.experts.w1`` ...), but each rank's tensors are
its slice: whoever saves or exports the full model gathers the slices in rank order.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from gonogo.model.moe import GroupedExperts, MoE, run_experts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


class ExpertParallelExperts(GroupedExperts):
    """This rank's slice of a GroupedExperts, fed by all_to_all over ``group``."""

    def __init__(self, full: GroupedExperts, group: Any, rank: int, group_size: int):
        nn.Module.__init__(self)
        self.n_experts = full.n_experts
        self.n_local_experts = full.n_experts // group_size
        self.expert_start = rank * self.n_local_experts
        self.group, self.group_size = group, group_size
        local = slice(self.expert_start, self.expert_start + self.n_local_experts)
        self.w1 = nn.Parameter(full.w1.detach()[local].clone(), requires_grad=full.w1.requires_grad)
        self.w2 = nn.Parameter(full.w2.detach()[local].clone(), requires_grad=full.w2.requires_grad)
        self.w3 = nn.Parameter(full.w3.detach()[local].clone(), requires_grad=full.w3.requires_grad)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: this rank's token rows sorted by (global) expert; counts: LongTensor[n_experts]."""
        W, L = self.group_size, self.n_local_experts
        # received[s, j] = rows rank s sends to my local expert j
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        received = received.view(W, L)
        input_splits = counts.view(W, L).sum(dim=1).tolist()
        output_splits = received.sum(dim=1).tolist()

        rows = all_to_all(x, output_splits, input_splits, self.group)
        # rows arrive as blocks (source 0: expert 0..L-1), (source 1: ...); experts want theirs together
        local_expert = torch.arange(L, device=x.device).repeat(W)
        row_expert = torch.repeat_interleave(local_expert, received.flatten())
        order = torch.argsort(row_expert, stable=True)
        out = run_experts(self.w1, self.w2, self.w3, rows[order], received.sum(dim=0).tolist())
        out = torch.zeros_like(out).index_copy(0, order, out)
        return all_to_all(out, input_splits, output_splits, self.group)


def apply_expert_parallel(model: nn.Module, group: Optional[Any] = None) -> nn.Module:
    """Split every MoE layer's experts over the ranks of ``group`` (None = all ranks), in place.

    A group of one rank leaves the experts local (no communication). Raises ValueError when the
    number of experts does not divide by the group size.
    """
    group_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    for moe in [module for module in model.modules() if isinstance(module, MoE)]:
        n_experts = moe.experts.n_experts
        if n_experts % group_size:
            raise ValueError(f"expert parallelism over {group_size} ranks needs n_experts divisible by {group_size}, "
                             f"but n_experts={n_experts}; change moe.n_experts or the expert-parallel size")
        if group_size > 1 and not isinstance(moe.experts, ExpertParallelExperts):
            moe.experts = ExpertParallelExperts(moe.experts, group, rank, group_size)
    return model


def _expert_parallel_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ExpertParallelExperts)}


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert-parallel slice gathered into the full stacked tensor.

    A collective: every rank of each expert group must call it. The result is the same on every
    rank and loads into an unsharded Decoder (what a consolidated checkpoint or an export needs).
    """
    state = model.state_dict()
    for prefix, experts in _expert_parallel_modules(model).items():
        for weight in ("w1", "w2", "w3"):
            key = f"{prefix}.{weight}"
            local = state[key].detach().contiguous()
            pieces = [torch.empty_like(local) for _ in range(experts.group_size)]
            dist.all_gather(pieces, local, group=experts.group)
            state[key] = torch.cat(pieces)
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load an unsharded state dict into an expert-parallel model: each rank takes its experts' slice."""
    state = dict(state)
    for prefix, experts in _expert_parallel_modules(model).items():
        local = slice(experts.expert_start, experts.expert_start + experts.n_local_experts)
        for weight in ("w1", "w2", "w3"):
            key = f"{prefix}.{weight}"
            if key in state:
                if state[key].shape[0] != experts.n_experts:
                    raise ValueError(f"{key} holds {state[key].shape[0]} experts, the model has {experts.n_experts}")
                state[key] = state[key][local]
    model.load_state_dict(state, strict=strict)
