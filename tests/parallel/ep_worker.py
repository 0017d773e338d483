"""torchrun worker for test_expert_parallel: EP over 2 gloo ranks against the unsharded layer.

Every rank builds the same full model (same seed), keeps a full copy as the reference, splits the
other copy's experts over the two ranks, runs its own batch through both, and writes the largest
differences (logits, aux loss, counts, gradients) to <out>/rank<r>.json.
"""

import copy
import json
import sys
from types import SimpleNamespace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gonogo.model.shape import ModelConfig, MoEConfig
from gonogo.model.decoder import Decoder
from gonogo.parallel.expert import (ExpertParallelExperts, ShardedExperts, apply_expert_parallel,
                                   gather_full_state_dict, load_full_state_dict, shard_experts)
from gonogo.parallel import leave_together

SCENARIOS = {
    "softmax-shared": MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=24, n_shared_experts=1, aux_loss_coef=0.01),
    "sigmoid-capacity": MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=24, score_func="sigmoid",
                                  route_norm=True, capacity_factor=0.75, first_dense_layers=1),
    # every token prefers rank 0's experts: rank 1 receives nothing (empty exchanges)
    "all-to-rank-0": MoEConfig(n_experts=4, top_k=1, expert_ffn_dim=24),
}


def loss_of(model, batch):
    logits = model(batch)
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    return logits, (logits * probe).sum() + model.aux_loss()


def batch_of(rank):
    return torch.randint(0, 384, (2, 6), generator=torch.Generator().manual_seed(100 + rank))


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def run_scenario(name, moe_config, rank, world):
    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48, moe=moe_config)
    full = Decoder(config)
    full.init_weights(seed=3)
    if name == "all-to-rank-0":
        for moe in full.moe_layers():
            moe.expert_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    sharded = apply_expert_parallel(copy.deepcopy(full), group=None)
    assert all(isinstance(moe.experts, ExpertParallelExperts) for moe in sharded.moe_layers())

    # reference: the full model on each rank's batch separately
    reference = {}
    for source in range(world):
        full.zero_grad()
        logits, loss = loss_of(full, batch_of(source))
        loss.backward()
        reference[source] = dict(logits=logits.detach(), aux=full.aux_loss().detach(),
                                 counts=[c.clone() for c in full.moe_token_counts()], grads=grads(full))

    logits, loss = loss_of(sharded, batch_of(rank))
    loss.backward()
    own = reference[rank]
    diffs = {
        "logits": (logits - own["logits"]).abs().max().item(),
        "aux": abs(sharded.aux_loss().item() - own["aux"].item()),
        "counts_equal": all(torch.equal(a, b) for a, b in zip(sharded.moe_token_counts(), own["counts"])),
    }
    worst_dense, worst_expert = 0.0, 0.0
    for param_name, parameter in sharded.named_parameters():
        if ".moe.experts." in param_name:
            # an expert's gradient collects every rank's tokens routed to it
            start = rank * parameter.shape[0]
            expected = sum(reference[s]["grads"][param_name] for s in range(world))[start:start + parameter.shape[0]]
            worst_expert = max(worst_expert, (parameter.grad - expected).abs().max().item())
            assert parameter.shape[0] == moe_config.n_experts // world
        else:
            worst_dense = max(worst_dense, (parameter.grad - own["grads"][param_name]).abs().max().item())
    diffs["grad_dense"] = worst_dense
    diffs["grad_expert"] = worst_expert
    diffs["expert_grad_scale"] = max(g.abs().max().item() for n, g in own["grads"].items() if ".moe.experts." in n)

    # re-initialising the sharded model gives each rank its slice of the full init
    sharded.init_weights(seed=3)
    full.init_weights(seed=3)
    slice_ok = True
    for param_name, parameter in sharded.named_parameters():
        expected = dict(full.named_parameters())[param_name]
        if ".moe.experts." in param_name:
            expected = expected[rank * parameter.shape[0]:(rank + 1) * parameter.shape[0]]
        slice_ok &= torch.equal(parameter, expected)
    diffs["init_slice_equal"] = slice_ok

    # gathering the slices gives the full model back; loading a full state dict slices it again
    gathered = gather_full_state_dict(sharded)
    diffs["gathered_equal"] = all(torch.equal(gathered[k], v) for k, v in full.state_dict().items())
    fresh = apply_expert_parallel(Decoder(config), group=None)
    load_full_state_dict(fresh, full.state_dict())
    diffs["reloaded_equal"] = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sharded.state_dict().values()))
    return diffs


def sharded_against_plain(rank, world):
    """The trainer's ShardedExperts (ep-mesh DTensors) against ExpertParallelExperts: the same module
    tree and names, a new module in place of the old one (no class swap), the same numbers."""
    from torch.distributed.device_mesh import init_device_mesh

    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48, moe=SCENARIOS["softmax-shared"])
    plain, sharded = Decoder(config), Decoder(config)
    plain.init_weights(seed=3)
    sharded.init_weights(seed=3)
    apply_expert_parallel(plain, group=None)
    apply_expert_parallel(sharded, group=None)
    before = [moe.experts for moe in sharded.moe_layers()]
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    returned = shard_experts(sharded, SimpleNamespace(ep_mesh=mesh, device=torch.device("cpu")))
    after = [moe.experts for moe in sharded.moe_layers()]
    result = {"types": all(type(e) is ShardedExperts for e in after),
              "old_modules_untouched": all(type(e) is ExpertParallelExperts for e in before),
              "names_equal": list(dict(plain.named_parameters())) == list(dict(sharded.named_parameters())),
              "returned_are_the_dtensors": returned == [getattr(e, n) for e in after for n in ShardedExperts.WEIGHTS]}
    logits_plain, loss_plain = loss_of(plain, batch_of(rank))
    logits_sharded, loss_sharded = loss_of(sharded, batch_of(rank))
    loss_plain.backward()
    loss_sharded.backward()
    result["logits_equal"] = torch.equal(logits_plain, logits_sharded)
    grads_equal, full_equal = True, True
    plain_parameters = dict(plain.named_parameters())
    for name, parameter in sharded.named_parameters():
        grad = parameter.grad.to_local() if ".moe.experts." in name else parameter.grad
        grads_equal &= torch.equal(grad, plain_parameters[name].grad)
        if ".moe.experts." in name:  # the DTensor's global view is every rank's slice in order
            full_equal &= torch.equal(parameter.full_tensor(), gather_full_state_dict(plain)[name])
    result["grads_equal"], result["full_tensor_equal"] = grads_equal, full_equal
    return result


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    result = {name: run_scenario(name, moe_config, rank, world) for name, moe_config in SCENARIOS.items()}

    # EP over a group of one rank: experts stay local and the model is unchanged
    singles = [dist.new_group([r]) for r in range(world)]
    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=48, moe=SCENARIOS["softmax-shared"])
    local = Decoder(config)
    before = local(batch_of(rank))
    apply_expert_parallel(local, group=singles[rank])
    result["ep1_local"] = (not isinstance(local.moe_layers()[0].experts, ExpertParallelExperts)
                           and torch.equal(local(batch_of(rank)), before))

    result["sharded"] = sharded_against_plain(rank, world)

    odd = Decoder(config.model_copy(update={"moe": MoEConfig(n_experts=3, top_k=1)}))
    try:
        apply_expert_parallel(odd)
        result["indivisible_error"] = None
    except ValueError as error:
        result["indivisible_error"] = str(error)

    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    leave_together(dist, dist.get_world_size())  # as gonogo.train.worker: no rank tears its pairs down early
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
