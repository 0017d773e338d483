"""The process group and the device meshes every rank joins before the model is parallelised."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


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
    """The "dp" mesh over every rank, and with expert parallelism K the (W/K, K) "edp" x "ep" mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    world.dp_mesh = init_device_mesh(world.device.type, (world.world_size,), mesh_dim_names=("dp",))
    if expert_parallel > 1:
        assert world.world_size % expert_parallel == 0, "checked by check_world"
        mesh = init_device_mesh(world.device.type, (world.world_size // expert_parallel, expert_parallel),
                                mesh_dim_names=("edp", "ep"))
        world.ep_mesh = mesh["ep"]
        world.edp_group = mesh["edp"].get_group()


def leave_together(dist, world_size: int, timeout_s: float = 60.0) -> None:
    """Wait, through the rendezvous store rather than gloo, until every rank has left the last
    barrier: a rank returns from a gloo barrier while its own last message to a peer may still be
    in flight, and tearing the pairs down then aborted the peer. Once every rank is here, no gloo
    traffic is pending in either direction. Bounded: a peer that never comes is left behind."""
    if world_size <= 1:
        return
    store = dist.distributed_c10d._get_default_store()
    key = f"gonogo-leave-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < world_size and time.monotonic() < deadline:
        time.sleep(0.01)
