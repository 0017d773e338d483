"""Parallelism of the trainer: the process group and meshes (world), expert parallelism (expert),
FSDP2 (fsdp), DDP (ddp), applied in one fixed order by ``parallelize``; the gradient norm over
both meshes (gradients)."""

from gonogo.parallel.expert import reduce_expert_gradients
from gonogo.parallel.gradients import clip_grad_norm
from gonogo.parallel.parallelize import autocast, parallelize, set_gradient_sync, unwrap
from gonogo.parallel.world import World, build_meshes, init_distributed, leave_together

__all__ = ["World", "autocast", "build_meshes", "clip_grad_norm", "init_distributed", "leave_together", "parallelize",
           "reduce_expert_gradients", "set_gradient_sync", "unwrap"]
