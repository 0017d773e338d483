"""Process group set-up and how the model is parallelised, applied in one fixed order.

Order (torchtitan's): expert parallelism first (it changes which expert weights a rank holds),
then data parallelism: FSDP2 ``fully_shard`` per transformer block and on the root, or DDP, or
nothing for a single process.

Mixed precision ("bf16"): FSDP2 keeps fp32 master weights and optimizer state, all-gathers bf16
parameters for compute and reduce-scatters gradients in fp32
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). DDP and a single process keep
fp32 weights and run the forward under bf16 autocast; DDP all-reduces fp32 gradients.

Expert parallelism (``train.expert_parallel = K`` over W ranks, FSDP2 only): ranks form a
(W/K, K) mesh. Along "ep" the K ranks of a group each hold n_experts/K experts and exchange
tokens with all_to_all (gonogo.model.expert_parallel); their weights become DTensors sharded
over the "ep" mesh (``Shard(0)`` on the expert dimension), so DCP checkpoints, the optimizer
state and the consolidated weights see one [n_experts, ...] tensor, not K different tensors under
one name. FSDP leaves them alone (``ignored_params``); along "edp" (W/K ranks holding the same
experts) they are replicated, and ``reduce_expert_gradients`` all-reduces their gradients over
"edp" and divides by W: each expert's gradient from the all_to_all backward is already the sum
over the K ranks of its group, so this gives the same average over all W ranks' data as FSDP
gives every other weight. In bf16 mode the experts compute on a bf16 copy of their fp32 weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gonogo.errors import UserError
from gonogo.model.expert_parallel import ExpertParallelExperts
from gonogo.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    dp_mesh: Any = None        # 1-D mesh over every rank (non-expert weights)
    ep_mesh: Any = None        # the ranks that split the experts between them (EP>1 only)
    edp_group: Any = None      # the ranks that hold the same experts (EP>1 only)

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def init_distributed(timeout_s: float) -> World:
    """Join the torchrun job: cuda+nccl when a GPU is present, else cpu+gloo (chosen once here)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    else:
        # started without torchrun (a plain `python -m gonogo.train.worker`): a one-rank group
        # on a private file store, so DCP and collectives work the same way
        import tempfile

        store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="gonogo-store-"), "store"), 1)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
    return World(rank, world_size, local_rank, local_world_size, device, backend)


def build_meshes(world: World, expert_parallel: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    world.dp_mesh = init_device_mesh(world.device.type, (world.world_size,), mesh_dim_names=("dp",))
    if expert_parallel > 1:
        assert world.world_size % expert_parallel == 0, "checked by check_world"
        mesh = init_device_mesh(world.device.type, (world.world_size // expert_parallel, expert_parallel),
                                mesh_dim_names=("edp", "ep"))
        world.ep_mesh = mesh["ep"]
        world.edp_group = mesh["edp"].get_group()


class ShardedExperts(ExpertParallelExperts):
    """Expert-parallel experts whose w1/w2/w3 are DTensors sharded over the ep mesh.

    The all_to_all forward of gonogo.model.expert_parallel works on this rank's slice, so the
    forward runs with the local shards (cast to the compute dtype) in place of the DTensors;
    ``to_local`` is differentiable, so the gradients land on the DTensor parameters.
    """

    WEIGHTS = ("w1", "w2", "w3")

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        sharded = {name: self._parameters[name] for name in self.WEIGHTS}
        try:
            for name, weight in sharded.items():
                self._parameters[name] = weight.to_local().to(x.dtype)
            return super().forward(x, counts)
        finally:
            self._parameters.update(sharded)


def shard_experts(model: nn.Module, world: World) -> list[nn.Parameter]:
    """Turn every expert-parallel experts module's weights into ep-mesh DTensors; returns them."""
    from torch.distributed.tensor import DTensor, Shard

    parameters = []
    for module in list(model.modules()):
        if type(module) is ExpertParallelExperts:
            module.__class__ = ShardedExperts  # same state, the forward above
            for name in ShardedExperts.WEIGHTS:
                local = getattr(module, name).detach().to(world.device)
                sharded = nn.Parameter(DTensor.from_local(local, world.ep_mesh, [Shard(0)], run_check=False))
                setattr(module, name, sharded)
                parameters.append(sharded)
    return parameters


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


def parallelize(model: nn.Module, config: TrainConfig, world: World) -> nn.Module:
    """Expert parallelism, then FSDP2 / DDP / nothing, as ``config.train.parallel`` says."""
    train = config.train
    bf16 = train.precision == "bf16"
    expert_parameters: set[nn.Parameter] = set()
    if train.expert_parallel > 1:
        from gonogo.model.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, world.ep_mesh.get_group())
        expert_parameters = set(shard_experts(model, world))
    model.to(world.device)

    if train.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32)
        ignored = fsdp_ignored_kwargs(fully_shard, expert_parameters)
        for block in model.layers:
            fully_shard(block, mesh=world.dp_mesh, mp_policy=policy, **ignored)
        # the root holds the embedding (shared with the output head when tied) and the final norm;
        # it is the last to run, so it keeps its parameters gathered after the forward
        fully_shard(model, mesh=world.dp_mesh, mp_policy=policy, reshard_after_forward=False, **ignored)
        return model
    if train.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    assert world.world_size == 1, "checked by check_world"
    return model


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module, world: World) -> None:
    """Average the ep-sharded experts' gradients like FSDP averages the rest (see the module doc)."""
    if world.ep_mesh is None:
        return
    for name, parameter in model.named_parameters():
        if is_expert_parameter(name) and parameter.grad is not None:
            local = parameter.grad.to_local()
            if dist.get_world_size(world.edp_group) > 1:
                dist.all_reduce(local, group=world.edp_group)
            local.div_(world.world_size)


def unwrap(model: nn.Module) -> nn.Module:
    """The Decoder inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def autocast(config: TrainConfig, world: World):
    """bf16 autocast for DDP / single process; FSDP2 casts the parameters itself."""
    enabled = config.train.precision == "bf16" and config.train.parallel != "fsdp"
    return torch.autocast(device_type=world.device.type, dtype=torch.bfloat16, enabled=enabled)


def set_gradient_sync(model: nn.Module, config: TrainConfig, enabled: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulation."""
    import contextlib

    if config.train.parallel == "fsdp":
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if config.train.parallel == "ddp" and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, world: World) -> torch.Tensor:
    """Global gradient norm over every rank's gradients (and clip to ``max_norm`` if > 0).

    Gradients are DTensors on one of two meshes (all ranks; the experts' ep mesh), which
    ``torch.nn.utils.clip_grad_norm_`` cannot mix in one norm; so the norm is taken per mesh (a
    DTensor norm reduces over its own mesh) and the two are combined.
    """
    dense, experts = [], []
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


def is_expert_parameter(name: str) -> bool:
    return ".moe.experts." in name
