"""How the trainer parallelises the model, applied in one fixed order, and how it then runs it.

Order (torchtitan's): expert parallelism first (it changes which expert weights a rank holds;
gonogo.parallel.expert), then data parallelism: FSDP2 (gonogo.parallel.fsdp) or DDP
(gonogo.parallel.ddp), or nothing for a single process. The model itself knows nothing of it.

Precision ("bf16"): FSDP2 casts the parameters itself (fp32 master weights, bf16 compute); DDP and
a single process keep fp32 weights and run the forward under bf16 autocast. In bf16 mode the
expert-parallel experts compute on a bf16 copy of their fp32 weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
from torch import nn

from gonogo.parallel.world import World


def parallelize(model: nn.Module, config: Any, world: World) -> nn.Module:
    """Expert parallelism, then FSDP2 / DDP / nothing, as ``config.train.parallel`` says."""
    train = config.train
    expert_parameters: set[nn.Parameter] = set()
    if train.expert_parallel > 1:
        from gonogo.parallel.expert import apply_expert_parallel, shard_experts

        apply_expert_parallel(model, world.ep_mesh.get_group())
        expert_parameters = set(shard_experts(model, world))
    model.to(world.device)
    if train.compile:
        compile_blocks(model)

    if train.parallel == "fsdp":
        from gonogo.parallel.fsdp import apply_fsdp

        return apply_fsdp(model, world.dp_mesh, train.precision == "bf16", expert_parameters,
                          reshard_after_forward=train.fsdp_reshard_after_forward, unit=train.fsdp_unit)
    if train.parallel == "ddp":
        from gonogo.parallel.ddp import apply_ddp

        return apply_ddp(model, world)
    assert world.world_size == 1, "checked by check_world"
    return model


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every transformer block in place, before FSDP2 wraps them (torchtitan's
    order): ``Module.compile`` keeps the parameters' names, so checkpoints and exports are the
    same as an eager run's."""
    from gonogo.model.decoder import TransformerBlock

    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile()


def unwrap(model: nn.Module) -> nn.Module:
    """The Decoder inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def autocast(config: Any, world: World):
    """bf16 autocast for DDP / single process; FSDP2 casts the parameters itself."""
    enabled = config.train.precision == "bf16" and config.train.parallel != "fsdp"
    return torch.autocast(device_type=world.device.type, dtype=torch.bfloat16, enabled=enabled)


def set_gradient_sync(model: nn.Module, config: Any, enabled: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulation."""
    if config.train.parallel == "fsdp":
        cast(Any, model).set_requires_gradient_sync(enabled)  # added by fully_shard
        return contextlib.nullcontext()
    if config.train.parallel == "ddp" and not enabled:
        return cast(Any, model).no_sync()
    return contextlib.nullcontext()
