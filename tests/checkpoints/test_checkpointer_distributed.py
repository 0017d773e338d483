"""Checkpoints across real torchrun/gloo processes: FSDP2 resharding 2 -> 1 -> 2, async save."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gonogo.checkpoints.manifest import verify_checkpoint
from gonogo.cluster.torchrun import free_port, torchrun_env

WORKER = Path(__file__).with_name("checkpoint_worker.py")
STEPS = 3


def torchrun(nproc: int, *args) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(WORKER), *map(str, args)]
    result = subprocess.run(command, env=torchrun_env({"OMP_NUM_THREADS": "1"}), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def saved_at_two_ranks(tmp_path_factory):
    """Two FSDP2 ranks train 3 steps and save it twice: sync, then async while training goes on."""
    work = tmp_path_factory.mktemp("two-ranks")
    torchrun(2, "save", "--root", work / "sync", "--async-root", work / "async", "--steps", STEPS,
             "--expected", work / "expected.pt", "--report", work / "report.json")
    return work


@pytest.mark.slow
def test_async_save_writes_the_same_checkpoint_without_blocking_the_loop(saved_at_two_ranks):
    sync = saved_at_two_ranks / "sync" / f"step-{STEPS:08d}"
    asynchronous = saved_at_two_ranks / "async" / f"step-{STEPS:08d}"
    assert verify_checkpoint(sync) == (True, "ok") and verify_checkpoint(asynchronous) == (True, "ok")
    sync_files = json.loads((sync / "manifest.json").read_text())["files"]
    async_files = json.loads((asynchronous / "manifest.json").read_text())["files"]
    assert sync_files.keys() == async_files.keys()
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "ranks/rank-00000.json", "ranks/rank-00001.json"} <= set(sync_files)
    # same bytes, but for DCP's metadata (it records ids of the write) and meta.json's creation time
    for name in set(sync_files) - {"dcp/.metadata", "meta.json"}:
        assert sync_files[name]["xxh3-128"] == async_files[name]["xxh3-128"], name
    report = json.loads((saved_at_two_ranks / "report.json").read_text())
    # save() returned while the write still ran: the commit came later, after 2 more training steps
    assert report["committed_after_s"] > report["blocked_s"]


@pytest.mark.slow
def test_fsdp_checkpoint_loads_at_one_rank_and_back_at_two(saved_at_two_ranks, tmp_path):
    work = saved_at_two_ranks
    # 2 -> 1 into a plain module (sync and async checkpoints alike), then train a step and save at 1
    torchrun(1, "load", "--plain", "--root", work / "sync", "--also-root", work / "async", "--steps", STEPS,
             "--saved-world-size", 2, "--expected", work / "expected.pt",
             "--then-save", tmp_path / "one", "--then-expected", tmp_path / "expected-one.pt")
    assert verify_checkpoint(tmp_path / "one" / f"step-{STEPS + 1:08d}") == (True, "ok")
    # 1 -> 2 into FSDP2
    torchrun(2, "load", "--root", tmp_path / "one", "--steps", STEPS + 1, "--saved-world-size", 1,
             "--expected", tmp_path / "expected-one.pt")


@pytest.mark.slow
def test_a_shard_corrupt_on_one_rank_fails_the_load_on_every_rank(saved_at_two_ranks, tmp_path):
    checkpoint = tmp_path / "step"
    shutil.copytree(saved_at_two_ranks / "sync" / f"step-{STEPS:08d}", checkpoint)
    shard = checkpoint / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    report = tmp_path / "said"
    # rank 1 reads its own shard and finds it corrupt; rank 0 finds it too if it reads an item of
    # that file, else hears it from rank 1; no rank hangs (torchrun() would time out)
    torchrun(2, "corrupt", "--root", checkpoint, "--expected", tmp_path / "unused", "--report", report)
    for rank in (0, 1):
        said = report.with_suffix(f".rank{rank}").read_text()
        assert "dcp/__1_0.distcp: xxh3-128 does not match the manifest" in said, (rank, said)
        assert "tensors must not be used" in said, (rank, said)
