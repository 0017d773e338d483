"""torchrun worker for test_checkpoint_distributed.py: save and load a small FSDP2 model.

    save: train a few steps, save (sync, and optionally async while training goes on),
          and write the full model + optimizer state as the expected reference.
    load: load the newest checkpoint into a fresh model (FSDP2, or a plain module with --plain),
          compare the full state with the reference, then optionally train one step and save.

Every check is an assert, so a wrong result is a non-zero exit of torchrun. The
``if __name__ == "__main__"`` guard is required by DCP's process-based async save.
"""

import argparse
import json
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from gonogo.checkpoints.checkpointer import Checkpointer
from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig
from gonogo.parallel import leave_together

CONFIG = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32)


def build(plain: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    if not plain:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> None:
    generator = torch.Generator().manual_seed(1000 + dist.get_rank())
    for _ in range(steps):
        inputs = torch.randn(4, 16, generator=generator)
        loss = model(inputs).pow(2).mean()
        loss.backward()
        if dist.get_world_size() > 1 and not hasattr(model[0].weight, "device_mesh"):
            for parameter in model.parameters():  # plain module at several ranks: average by hand
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.AVG)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def full_state(model, optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # cloned: a full state dict may alias live tensors (the optimizer's scalar "step" does)
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone,
                                             {"model": model_state, "optimizer": optimizer_state})


def assert_same(actual, expected, where="state") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where}: tensors differ"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def loader_state(step: int) -> dict:
    return {"rank": dist.get_rank(), "position": 100 * dist.get_rank() + step}


def save_mode(args) -> None:
    model, optimizer, scheduler = build(plain=args.plain)
    train(model, optimizer, scheduler, args.steps)
    expected = full_state(model, optimizer)
    Checkpointer(Path(args.root)).save(args.steps, model, optimizer, scheduler, loader_state(args.steps),
                                       {"tokens": 1234}, CONFIG, {"train": {"steps": args.steps}})
    report = {}
    if args.async_root:
        checkpointer = Checkpointer(Path(args.async_root), async_mode=True)
        started = time.monotonic()
        checkpointer.save(args.steps, model, optimizer, scheduler, loader_state(args.steps),
                          {"tokens": 1234}, CONFIG, {"train": {"steps": args.steps}})
        returned = time.monotonic()
        train(model, optimizer, scheduler, 2)  # the loop goes on while the checkpoint is written
        checkpointer.close()
        if dist.get_rank() == 0:
            report = {"blocked_s": returned - started, "committed_after_s": checkpointer.last_commit_time - started}
    if dist.get_rank() == 0:
        torch.save(expected, args.expected)
        Path(args.report).write_text(json.dumps(report))


def load_mode(args) -> None:
    model, optimizer, scheduler = build(plain=args.plain)
    resumed = Checkpointer(Path(args.root)).load_latest("auto", model, optimizer, scheduler, model_config=CONFIG)
    assert resumed.path is not None and resumed.step == args.steps, resumed
    assert resumed.resharded == (args.saved_world_size != dist.get_world_size()), resumed
    expected_loader = {"rank": 0, "position": args.steps} if resumed.resharded else loader_state(args.steps)
    assert resumed.loader_state == expected_loader, resumed.loader_state
    assert resumed.extra == {"tokens": 1234}, resumed.extra
    assert scheduler.last_epoch == args.steps, scheduler.state_dict()
    state = full_state(model, optimizer)
    if dist.get_rank() == 0:
        assert_same(state, torch.load(args.expected, weights_only=True))
    if args.also_root:  # the async save of the same state must load to the same result
        model, optimizer, scheduler = build(plain=args.plain)
        Checkpointer(Path(args.also_root)).load_latest("auto", model, optimizer, scheduler, model_config=CONFIG)
        state = full_state(model, optimizer)
        if dist.get_rank() == 0:
            assert_same(state, torch.load(args.expected, weights_only=True), "async")
    if args.then_save:
        train(model, optimizer, scheduler, 1)
        expected = full_state(model, optimizer)
        Checkpointer(Path(args.then_save)).save(args.steps + 1, model, optimizer, scheduler,
                                                loader_state(args.steps + 1), {"tokens": 1234}, CONFIG)
        if dist.get_rank() == 0:
            torch.save(expected, args.then_expected)


def corrupt_mode(args) -> None:
    """Every rank loads a checkpoint with one rank's shard corrupted: all of them must say so (a
    rank that found nothing wrong hears it from the other), none waits forever."""
    model, optimizer, scheduler = build(plain=args.plain)
    try:
        Checkpointer(Path(args.root)).load(args.root, model, optimizer, scheduler, model_config=CONFIG)
    except UserError as error:
        said = str(error)
    else:
        said = "loaded"
    Path(args.report).with_suffix(f".rank{dist.get_rank()}").write_text(said)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load", "corrupt"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--expected", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--async-root")
    parser.add_argument("--report")
    parser.add_argument("--saved-world-size", type=int)
    parser.add_argument("--also-root")
    parser.add_argument("--then-save")
    parser.add_argument("--then-expected")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        {"save": save_mode, "load": load_mode, "corrupt": corrupt_mode}[args.mode](args)
        # leave together, as the trainer's workers do (gonogo.train.worker): a rank that tears its
        # gloo pairs down while its peer still uses them aborts the peer in C++ ("terminate called
        # without an active exception", 2 in ~9 runs of the reshard test under load)
        dist.barrier()
        leave_together(dist, dist.get_world_size())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
