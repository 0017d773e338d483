"""DDP: every rank holds the whole model in fp32; gradients are all-reduced in fp32 (bf16 runs
the forward under autocast, see ``gonogo.parallel.parallelize.autocast``)."""

from __future__ import annotations

from torch import nn

from gonogo.parallel.world import World


def apply_ddp(model: nn.Module, world: World) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
