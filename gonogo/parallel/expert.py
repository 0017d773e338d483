"""Expert parallelism: each rank of a process group holds n_experts / group_size experts.

Applied from the outside, after the model is built (the decoder knows nothing of it). Every MoE
layer's ``experts`` module is replaced by one that keeps only this rank's contiguous slice of the
stacked weights (rank r owns experts [r·L, (r+1)·L), L = n_experts / group size) and runs:

    tokens sorted by expert ──all_to_all (counts)──▶ how many rows each rank will send me
                           ──all_to_all (rows)────▶ rows for my experts, grouped by source rank
    regroup by local expert → SwiGLU per expert → undo the regrouping
                           ──all_to_all (rows)────▶ back to the rank that owns the token

Routing, capacity drops, the aux loss and the combine stay on the token's own rank, so a rank's
output is exactly what the unsharded layer gives for that rank's tokens. Gradients flow through
both exchanges (the backward of an all_to_all is the all_to_all with the splits swapped).

Two modules do this: ``ExpertParallelExperts`` holds its slice as plain tensors (parameter names
do not change, but whoever saves the full model gathers the slices: ``gather_full_state_dict``);
``ShardedExperts``, what the trainer uses (``shard_experts``), is built from one and holds the
slice as a DTensor sharded over the "ep" mesh (``Shard(0)`` on the expert dimension), so DCP
checkpoints, the optimizer state and the consolidated weights see one [n_experts, ...] tensor,
not K different tensors under one name. Along "edp" (the ranks holding the same experts) they are
replicated, and ``reduce_expert_gradients`` all-reduces their gradients over "edp" and divides by
W: each expert's gradient from the all_to_all backward is already the sum over the K ranks of its
group, so this gives the same average over all W ranks' data as FSDP gives every other weight.
"""

from __future__ import annotations

from typing import Any, Optional, cast

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
        return exchange_and_run(x, counts, (self.w1, self.w2, self.w3), self.group, self.group_size,
                                self.n_local_experts)


class ShardedExperts(nn.Module):
    """This rank's experts as DTensors sharded over the ep mesh, built from an ExpertParallelExperts.

    The exchange works on this rank's slice, so the forward runs with the local shards (cast to
    the compute dtype: FSDP leaves these weights in fp32); ``to_local`` is differentiable, so the
    gradients land on the DTensor parameters.
    """

    WEIGHTS = ("w1", "w2", "w3")

    def __init__(self, local: ExpertParallelExperts, mesh: Any, device: torch.device):
        from torch.distributed.tensor import DTensor, Shard

        super().__init__()
        # what gonogo.model.decoder reads to place this rank's slice in the full stacked tensor
        self.n_experts, self.n_local_experts = local.n_experts, local.n_local_experts
        self.expert_start = local.expert_start
        self.group, self.group_size = local.group, local.group_size
        for name in self.WEIGHTS:
            shard = getattr(local, name).detach().to(device)
            setattr(self, name, nn.Parameter(DTensor.from_local(shard, mesh, [Shard(0)], run_check=False)))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weights = tuple(getattr(self, name).to_local().to(x.dtype) for name in self.WEIGHTS)
        return exchange_and_run(x, counts, weights, self.group, self.group_size, self.n_local_experts)


def exchange_and_run(x: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, ...], group: Any,
                     group_size: int, n_local_experts: int) -> torch.Tensor:
    """The expert-parallel forward (see the module doc) with this rank's slice ``weights`` (w1, w2, w3)."""
    W, L = group_size, n_local_experts
    # received[s, j] = rows rank s sends to my local expert j
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    received = received.view(W, L)
    input_splits = counts.view(W, L).sum(dim=1).tolist()
    output_splits = received.sum(dim=1).tolist()

    rows = all_to_all(x, output_splits, input_splits, group)
    # rows arrive as blocks (source 0: expert 0..L-1), (source 1: ...); experts want theirs together
    local_expert = torch.arange(L, device=x.device).repeat(W)
    row_expert = torch.repeat_interleave(local_expert, received.flatten())
    order = torch.argsort(row_expert, stable=True)
    w1, w2, w3 = weights
    out = run_experts(w1, w2, w3, rows[order], received.sum(dim=0).tolist())
    out = torch.zeros_like(out).index_copy(0, order, out)
    return all_to_all(out, input_splits, output_splits, group)


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


def shard_experts(model: nn.Module, world: Any) -> list[nn.Parameter]:
    """Replace every ExpertParallelExperts by a ShardedExperts on ``world.ep_mesh``; their weights."""
    parameters: list[nn.Parameter] = []
    for moe in [module for module in model.modules() if isinstance(module, MoE)]:
        if type(moe.experts) is ExpertParallelExperts:
            # a new module in the old one's place (MoE declares GroupedExperts; this one holds DTensors)
            moe.experts = ShardedExperts(moe.experts, world.ep_mesh, world.device)  # type: ignore[assignment]
            parameters += [getattr(moe.experts, name) for name in ShardedExperts.WEIGHTS]
    return parameters


def is_expert_parameter(name: str) -> bool:
    return ".moe.experts." in name


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module, world: Any) -> None:
    """Average the ep-sharded experts' gradients like FSDP averages the rest (see the module doc)."""
    if world.ep_mesh is None:
        return
    for name, parameter in model.named_parameters():
        if is_expert_parameter(name) and parameter.grad is not None:
            local = cast(Any, parameter.grad).to_local()  # an ep-mesh DTensor
            if dist.get_world_size(world.edp_group) > 1:
                dist.all_reduce(local, group=world.edp_group)
            local.div_(world.world_size)
