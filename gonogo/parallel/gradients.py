"""The global gradient norm and its clip, over gradients that live on two meshes."""

from __future__ import annotations

import torch
from torch import nn

from gonogo.parallel.expert import is_expert_parameter
from gonogo.parallel.world import World


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, world: World) -> torch.Tensor:
    """Global gradient norm over every rank's gradients (and clip to ``max_norm`` if > 0).

    Gradients are DTensors on one of two meshes (all ranks; the experts' ep mesh), which
    ``torch.nn.utils.clip_grad_norm_`` cannot mix in one norm; so the norm is taken per mesh (a
    DTensor norm reduces over its own mesh) and the two are combined.
    """
    dense: list[torch.Tensor] = []
    experts: list[torch.Tensor] = []
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            (experts if is_expert_parameter(name) and world.ep_mesh is not None else dense).append(parameter.grad)
    total = (_norm(dense, world) ** 2 + _norm(experts, world) ** 2).sqrt()
    if max_norm > 0:
        coefficient = float((max_norm / (total + 1e-6)).clamp(max=1.0))
        if coefficient < 1.0:
            for group in (dense, experts):
                if group:
                    torch._foreach_mul_(group, coefficient)
    return total


def _norm(grads: list[torch.Tensor], world: World) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if not grads:
        return torch.zeros((), device=world.device, dtype=torch.float64)
    # float64 sums: FSDP (norms of shards, then across ranks) and DDP (norms of whole gradients)
    # add in different orders; in float64 the clip factor still rounds to the same fp32 number,
    # which keeps deterministic FSDP and DDP runs bitwise equal with clipping on
    norms = [torch.linalg.vector_norm(grad, dtype=torch.float64) for grad in grads]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm
