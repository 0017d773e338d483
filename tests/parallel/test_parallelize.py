"""How the trainer parallelises a model: what it asks of ``fully_shard`` across torch releases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed.fsdp as fsdp

from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig
from gonogo.model.decoder import Decoder
from gonogo.parallel import parallelize
from gonogo.parallel.fsdp import fsdp_ignored_kwargs


def _torch_2_6_fully_shard(calls, reshards=None):
    """fully_shard as torch 2.6 has it: no ``ignored_params`` keyword (it came in 2.7)."""
    def fully_shard(module, *, mesh=None, reshard_after_forward=True, shard_placement_fn=None,
                    mp_policy=None, offload_policy=None):
        calls.append(module)
        if reshards is not None:
            reshards.append(reshard_after_forward)
        return module
    return fully_shard


def _setup(expert_parallel=1, reshard_after_forward=True, unit="block"):
    model = Decoder(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=16))
    config = SimpleNamespace(train=SimpleNamespace(precision="bf16", expert_parallel=expert_parallel, parallel="fsdp",
                                                   fsdp_reshard_after_forward=reshard_after_forward,
                                                   fsdp_unit=unit, compile=False))
    world = SimpleNamespace(device=torch.device("cpu"), dp_mesh=None)
    return model, config, world


def test_fsdp_of_a_dense_model_works_with_torch_2_6(monkeypatch):
    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", _torch_2_6_fully_shard(calls))
    model, config, world = _setup()
    assert parallelize(model, config, world) is model
    assert calls == [*model.layers, model]  # each block, then the root


@pytest.mark.parametrize("reshard", [True, False])
def test_blocks_reshard_after_forward_as_the_config_says(monkeypatch, reshard):
    calls, reshards = [], []
    monkeypatch.setattr(fsdp, "fully_shard", _torch_2_6_fully_shard(calls, reshards))
    model, config, world = _setup(reshard_after_forward=reshard)
    parallelize(model, config, world)
    # the blocks as configured; the root, which runs last, always keeps its weights for the backward
    assert reshards == [reshard] * len(model.layers) + [False]


def test_one_unit_shards_only_the_root(monkeypatch):
    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", _torch_2_6_fully_shard(calls))
    model, config, world = _setup(unit="model")
    parallelize(model, config, world)
    assert calls == [model]


def test_expert_parallel_fsdp_on_torch_without_ignored_params_is_a_user_error():
    with pytest.raises(UserError, match="torch >= 2.7"):
        fsdp_ignored_kwargs(_torch_2_6_fully_shard([]), {torch.nn.Parameter(torch.zeros(1))})
    assert fsdp_ignored_kwargs(fsdp.fully_shard, set()) == {}


def test_compile_blocks_compiles_each_block_in_place_with_the_same_names_and_values(tmp_path, monkeypatch):
    import copy

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing half-written from elsewhere

    from torch._dynamo.utils import counters

    eager, config, world = _setup()
    config.train.parallel, config.train.precision, config.train.compile = "none", "fp32", True
    world.world_size = 1
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    assert parallelize(compiled, config, world) is compiled
    assert all(block._compiled_call_impl is not None for block in compiled.layers)
    assert eager.layers[0]._compiled_call_impl is None
    # Module.compile wraps no module: the state dict's names are the eager model's (checkpoints, export)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    out_eager, out_compiled = eager(tokens), compiled(tokens)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks ran through dynamo
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    out_eager.square().mean().backward()
    out_compiled.square().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)
