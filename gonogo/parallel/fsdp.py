"""FSDP2: ``fully_shard`` on every transformer block, then on the root.

Mixed precision ("bf16"): FSDP2 keeps fp32 master weights and optimizer state, all-gathers bf16
parameters for compute and reduce-scatters gradients in fp32
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). Expert-parallel experts are
left to their own mesh (``ignored_params``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gonogo.errors import UserError


def apply_fsdp(model: nn.Module, mesh: Any, bf16: bool, ignored: set[nn.Parameter],
               reshard_after_forward: bool = True, unit: str = "block") -> nn.Module:
    """Shard ``model`` in place over ``mesh``; ``ignored`` are parameters FSDP must leave alone;
    ``unit``: "block" (each block, then the root) or "model" (the root alone, one unit);
    ``reshard_after_forward``: free each block's gathered parameters after its forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    ignored_kwargs = fsdp_ignored_kwargs(fully_shard, ignored)
    blocks: Any = model.layers if unit == "block" else []
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    **ignored_kwargs)
    # the root holds the embedding (shared with the output head when tied) and the final norm (and,
    # as the one unit, everything); it is the last to run, so it keeps its parameters gathered
    # after the forward
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, **ignored_kwargs)
    return model


def fsdp_ignored_kwargs(fully_shard: Any, ignored: set) -> dict[str, Any]:
    """``ignored_params`` for ``fully_shard`` only when there are parameters to ignore: the
    keyword exists from torch 2.7, and a dense model runs on the torch 2.6 that pyproject accepts."""
    if not ignored:
        return {}
    import inspect

    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise UserError(f"expert parallelism with FSDP needs torch >= 2.7 (fully_shard's ignored_params); "
                        f"this is torch {torch.__version__}: upgrade torch or set train.expert_parallel=1")
    return {"ignored_params": ignored}
