"""A training restore checks the shard files' digests while it reads them (VerifyingReader): each
shard is read once, a corrupt one is found even after its bytes went into the tensors, and the
resume then takes an older checkpoint, which overwrites them all, or stops."""

import pytest
import torch
from torch import nn

from gonogo.checkpoints import dcp_filesystem, manifest, reference
from gonogo.checkpoints.checkpointer import Checkpointer
from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig

CONFIG = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32)


def make_job(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))  # mostly tensor data on disk
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def train(model, optimizer) -> None:
    model(torch.randn(4, 256)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def save(root, step, job, consolidate=False):
    return Checkpointer(root).save(step, *job, None, {"position": step}, {}, CONFIG, consolidate=consolidate)


def state(model, optimizer) -> list[torch.Tensor]:
    return [t.clone() for t in model.state_dict().values()] + [
        t.clone() for s in optimizer.state_dict()["state"].values() for t in s.values()]


def assert_same(a, b) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(autouse=True)
def _nothing_remembered():
    reference._VERIFIED.clear()  # as in a new process: no verification remembered
    yield
    reference._VERIFIED.clear()


@pytest.fixture
def reads(monkeypatch):
    """Bytes read into tensors, bytes read to be hashed only, and files hashed whole."""
    counts = {"into_tensors": 0, "hashed_only": 0, "whole_files": []}
    into, hashed, whole = dcp_filesystem._read_exactly_into, dcp_filesystem._hash_range, manifest.hash_file

    def counting_into(fd, view, position):
        counts["into_tensors"] += len(view)
        into(fd, view, position)

    def counting_hashed(fd, start, end, hasher):
        counts["hashed_only"] += max(0, end - start)
        hashed(fd, start, end, hasher)

    def counting_whole(path, algorithm=manifest.ALGORITHM):
        counts["whole_files"].append(str(path))
        return whole(path, algorithm)

    monkeypatch.setattr(dcp_filesystem, "_read_exactly_into", counting_into)
    monkeypatch.setattr(dcp_filesystem, "_hash_range", counting_hashed)
    monkeypatch.setattr(manifest, "hash_file", counting_whole)
    monkeypatch.setattr(dcp_filesystem, "hash_file", counting_whole)
    return counts


def flip_tensor_byte(checkpoint) -> None:
    """Flip a byte in the middle of the shard: inside the 256 x 256 weight's data."""
    shard = checkpoint / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def test_a_load_reads_each_shard_once_and_hashes_it_on_the_way(tmp_path, reads):
    job = make_job()
    train(*job)
    path = save(tmp_path, 1, job, consolidate=True)
    expected = state(*job)
    fresh = make_job(seed=1)
    step, _, _ = Checkpointer(tmp_path).load(path, *fresh, model_config=CONFIG)
    assert step == 1
    assert_same(state(*fresh), expected)
    shard_bytes = (path / "dcp" / "__0_0.distcp").stat().st_size
    # every byte of the shard read once: the tensors' data into the tensors, the rest only hashed
    assert reads["into_tensors"] + reads["hashed_only"] == shard_bytes
    assert reads["into_tensors"] > 0.95 * shard_bytes
    # the small files were hashed whole before anything was parsed; the shard and the consolidated
    # weights (which a training restore does not read) were not
    hashed_whole = {name.split(str(path) + "/", 1)[1] for name in reads["whole_files"]}
    assert "dcp/.metadata" in hashed_whole and "meta.json" in hashed_whole
    assert not hashed_whole & {"dcp/__0_0.distcp", "model.safetensors"}


def test_a_checkpoint_verified_earlier_in_this_process_is_read_without_hashing(tmp_path, reads):
    path = save(tmp_path, 1, make_job())
    assert reference.verify(path)[0]
    reads["whole_files"].clear()
    Checkpointer(tmp_path).load(path, *make_job(seed=1), model_config=CONFIG)
    assert reads["hashed_only"] == 0 and reads["whole_files"] == []


def test_a_corrupt_tensor_found_after_it_was_read_fails_the_load(tmp_path, reads):
    path = save(tmp_path, 1, make_job())
    flip_tensor_byte(path)
    with pytest.raises(UserError, match=r"__0_0.distcp: xxh3-128 does not match the manifest .*must not be used"):
        Checkpointer(tmp_path).load(path, *make_job(seed=1), model_config=CONFIG)
    assert reads["into_tensors"] > 0  # the flipped byte went into a tensor before the digest was known


def test_resume_auto_goes_back_to_an_older_checkpoint_that_overwrites_every_tensor(tmp_path):
    job = make_job()
    train(*job)
    save(tmp_path, 10, job)
    expected = state(*job)
    train(*job)
    newest = save(tmp_path, 20, job)
    flip_tensor_byte(newest)
    fresh = make_job(seed=1)
    resumed = Checkpointer(tmp_path).load_latest("auto", *fresh, model_config=CONFIG)
    assert resumed.step == 10 and [path for path, _ in resumed.skipped] == [newest]
    assert "xxh3-128 does not match" in resumed.skipped[0][1]
    assert_same(state(*fresh), expected)


def test_resume_auto_stops_when_the_only_checkpoint_was_found_corrupt_while_read(tmp_path):
    flip_tensor_byte(save(tmp_path, 10, make_job()))
    with pytest.raises(UserError, match="--resume never"):
        Checkpointer(tmp_path).load_latest("auto", *make_job(seed=1), model_config=CONFIG)


def test_a_restore_does_not_read_the_consolidated_weights_and_inference_refuses_them(tmp_path):
    job = make_job()
    path = save(tmp_path, 1, job, consolidate=True)
    weights = path / manifest.WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    fresh = make_job(seed=1)
    assert Checkpointer(tmp_path).load(path, *fresh, model_config=CONFIG)[0] == 1
    assert_same(state(*fresh), state(*job))
    with pytest.raises(UserError, match="model.safetensors: xxh3-128 does not match"):
        reference.resolve(path)


def _exchange_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        failure = {0: None, 1: manifest.CorruptShard("dcp/__1_0.distcp: xxh3-128 does not match the manifest")}[rank]
        checked, problem = dcp_filesystem._exchange({f"__{rank}_0.distcp"}, failure)
        kind = type(problem).__name__ if problem is not None else None
        with open(f"{out}.{rank}", "w") as handle:
            handle.write(f"{sorted(checked)}|{kind}|{problem}")
    finally:
        dist.destroy_process_group()


def test_a_rank_that_found_nothing_hears_of_another_ranks_corrupt_shard(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_exchange_worker, args=(str(tmp_path / "store"), str(tmp_path / "said")), nprocs=2, join=True)
    for rank in (0, 1):
        checked, kind, problem = (tmp_path / f"said.{rank}").read_text().split("|")
        assert checked == "['__0_0.distcp', '__1_0.distcp']" and kind == "CorruptShard", rank
        assert "__1_0.distcp: xxh3-128 does not match" in problem
        assert ("(read by rank 1)" in problem) == (rank == 0)


def test_a_file_read_only_for_its_bytes_items_is_hashed_whole_before_dcp_unpickles_them(tmp_path, reads):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = {"weight": torch.randn(64, 64), "lr": 0.25, "names": ["a", "b"]}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    shard = next(tmp_path.glob("*.distcp"))
    digests = {shard.name: {"size": shard.stat().st_size, "xxh3-128": manifest.hash_file(shard)}}
    reads["whole_files"].clear()
    loaded = {"lr": None, "names": None}  # no tensor from this file: nothing to read it in one pass for
    dcp.load(loaded, storage_reader=dcp_filesystem.VerifyingReader(tmp_path, digests, "xxh3-128"), no_dist=True)
    assert loaded == {"lr": 0.25, "names": ["a", "b"]}
    assert reads["whole_files"] == [str(shard)] and reads["into_tensors"] == 0
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointException, match="xxh3-128 does not match"):  # before DCP unpickled anything
        dcp.load({"lr": None, "names": None},
                 storage_reader=dcp_filesystem.VerifyingReader(tmp_path, digests, "xxh3-128"), no_dist=True)
