"""The training Checkpointer in one process: round trip, atomicity, verification, retention, user errors."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gonogo.checkpoints import manifest
from gonogo.checkpoints.checkpointer import Checkpointer
from gonogo.infer.device import load_for_inference
from gonogo.checkpoints.manifest import decode_state, encode_state, verify_checkpoint
from gonogo.checkpoints.reference import resolve_path as resolve_checkpoint
from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig

CONFIG = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32)


def make_job(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def save(checkpointer, step, job, loader=None, extra=None, config=CONFIG):
    model, optimizer, scheduler = job
    return checkpointer.save(step, model, optimizer, scheduler, loader or {"position": step},
                             extra or {"tokens": step * 10}, config, {"train": {"steps": step}})


def snapshot(model, optimizer) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": {index: {k: v.clone() for k, v in state.items()}
                          for index, state in optimizer.state_dict()["state"].items()}}


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for index in a["optimizer"]:
        for key in a["optimizer"][index]:
            assert torch.equal(a["optimizer"][index][key], b["optimizer"][index][key]), (index, key)


def directory_listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_restores_model_optimizer_scheduler_loader_and_rng(tmp_path):
    job = make_job()
    train(*job, steps=3)
    loader = {"epoch": 1, "position": 17, "offsets": (3, 4), "raw": b"\x00\x01"}
    path = save(Checkpointer(tmp_path), 3, job, loader=loader, extra={"tokens": 4096, "best": 1.5})
    expected = snapshot(job[0], job[1])
    draws_after_save = (torch.rand(3), random.random(), np.random.rand())

    restored = make_job(seed=1)
    train(*restored, steps=1)  # a different state everywhere, so every part must come back
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    step, loader_state, extra = Checkpointer(tmp_path).load(path, *restored, model_config=CONFIG)

    assert step == 3 and loader_state == loader and extra == {"tokens": 4096, "best": 1.5}
    assert_same_snapshot(snapshot(restored[0], restored[1]), expected)
    assert restored[2].state_dict() == job[2].state_dict()
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], draws_after_save[0]) and draws[1:] == draws_after_save[1:]


def test_committed_checkpoint_layout(tmp_path):
    path = save(Checkpointer(tmp_path), 40, make_job())
    assert path == tmp_path / "step-00000040"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000040"]  # no temporary directory left
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 40 and meta["world_size"] == 1 and meta["tokenizer"] == "byte-v1"
    assert meta["model"] == CONFIG.model_dump(mode="json") and meta["train"] == {"steps": 40}
    listed = set(json.loads((path / "manifest.json").read_text())["files"])
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"manifest.json", "COMMITTED"}
    assert listed == on_disk and {"model.safetensors", "dcp/.metadata", "ranks/rank-00000.json"} <= listed
    assert verify_checkpoint(path) == (True, "ok")


def test_uncommitted_checkpoint_is_skipped(tmp_path):
    checkpointer, job = Checkpointer(tmp_path), make_job()
    save(checkpointer, 10, job)
    torn = save(checkpointer, 20, job)
    (torn / "COMMITTED").unlink()  # as if the process died just before the marker

    resumed = Checkpointer(tmp_path).load_latest("auto", *make_job(), model_config=CONFIG)
    assert resumed.step == 10 and resumed.path == tmp_path / "step-00000010"
    assert resumed.skipped == [(torn, "not committed (no COMMITTED marker: the save did not finish)")]


def test_flipped_byte_is_detected_and_previous_checkpoint_loaded(tmp_path):
    checkpointer, job = Checkpointer(tmp_path), make_job()
    save(checkpointer, 10, job)
    train(*job, steps=1)
    corrupt = save(checkpointer, 20, job)
    shard = corrupt / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    before = directory_listing(tmp_path)

    ok, reason = verify_checkpoint(corrupt)
    assert not ok and "dcp/__0_0.distcp" in reason and "xxh3-128" in reason
    resumed = Checkpointer(tmp_path).load_latest("auto", *make_job(), model_config=CONFIG)
    assert resumed.step == 10 and [p for p, _ in resumed.skipped] == [corrupt]
    with pytest.raises(UserError, match="xxh3-128"):
        Checkpointer(tmp_path).load(corrupt, *make_job(), model_config=CONFIG)
    assert directory_listing(tmp_path) == before  # a failed resume deletes and rewrites nothing


def test_truncated_file_is_detected_without_hashing(tmp_path):
    path = save(Checkpointer(tmp_path), 10, make_job())
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    ok, reason = verify_checkpoint(path, hashes=False)
    assert not ok and "model.safetensors has" in reason


def test_retention_keeps_last_and_every_and_nothing_else_is_touched(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "README").write_text("mine")
    foreign = tmp_path / "step-00000001"  # named like ours but not written by gonogo
    foreign.mkdir()
    (foreign / "COMMITTED").write_text("")
    checkpointer, job = Checkpointer(tmp_path, keep_last=2, keep_every=30), make_job()
    for step in range(10, 70, 10):
        save(checkpointer, step, job)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README", "notes", "step-00000001", "step-00000030", "step-00000050", "step-00000060"]


def test_retention_never_deletes_the_checkpoint_just_saved(tmp_path):
    checkpointer, job = Checkpointer(tmp_path, keep_last=1), make_job()
    save(checkpointer, 50, job)
    save(checkpointer, 20, job)  # an older step saved after a resume from an earlier checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000050"]


def test_leftover_temporary_directory_of_a_crashed_save_is_replaced(tmp_path):
    leftover = tmp_path / ".tmp-step-00000010"
    (leftover / "dcp").mkdir(parents=True)
    (leftover / "dcp" / "stale.distcp").write_bytes(b"half written")
    path = save(Checkpointer(tmp_path), 10, make_job())
    assert not leftover.exists() and not (path / "dcp" / "stale.distcp").exists()
    assert verify_checkpoint(path)[0]


def test_never_starts_fresh_and_auto_without_checkpoints_starts_fresh(tmp_path):
    save(Checkpointer(tmp_path / "a"), 10, make_job())
    assert Checkpointer(tmp_path / "a").load_latest("never", *make_job()).path is None
    resumed = Checkpointer(tmp_path / "empty").load_latest("auto", *make_job())
    assert resumed.path is None and resumed.step == 0 and resumed.loader_state is None


def test_not_a_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path in (tmp_path / "missing", tmp_path / "empty", tmp_path / "file.txt"):
        with pytest.raises(UserError, match="not a checkpoint|no such directory"):
            Checkpointer(tmp_path).load(path, *make_job(), model_config=CONFIG)


def test_other_model_shape_is_a_user_error_and_changes_nothing(tmp_path):
    path = save(Checkpointer(tmp_path), 10, make_job())
    before = directory_listing(tmp_path)
    other = CONFIG.model_copy(update={"d_model": 32})
    with pytest.raises(UserError, match="different model.*d_model: checkpoint 16, now 32"):
        Checkpointer(tmp_path).load_latest("auto", *make_job(), model_config=other)
    with pytest.raises(UserError, match="different model"):
        Checkpointer(tmp_path).load(path, *make_job(), model_config=other)
    assert directory_listing(tmp_path) == before


def test_resolve_checkpoint_accepts_checkpoint_run_and_export_dirs(tmp_path):
    run = tmp_path / "run"
    checkpointer, job = Checkpointer(run / "checkpoints"), make_job()
    older = save(checkpointer, 10, job)
    newest = save(checkpointer, 20, job)
    assert resolve_checkpoint(older) == older
    assert resolve_checkpoint(run) == newest
    assert resolve_checkpoint(run / "checkpoints") == newest
    (newest / "COMMITTED").unlink()
    assert resolve_checkpoint(run) == older  # the newest that verifies
    with pytest.raises(UserError, match="cannot be used: not committed"):
        resolve_checkpoint(newest)

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    assert resolve_checkpoint(export) == export
    with pytest.raises(UserError, match="Hugging Face export has no optimizer"):
        Checkpointer(tmp_path).load(export, *job)
    with pytest.raises(UserError, match="not a checkpoint, run or Hugging Face export"):
        resolve_checkpoint(tmp_path)  # holds a run dir, but is none itself
    empty_run = tmp_path / "empty-run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no committed checkpoint"):
        resolve_checkpoint(empty_run)


def test_async_save_writes_the_state_of_its_step_while_training_goes_on(tmp_path):
    job = make_job()
    train(*job, steps=2)
    save(Checkpointer(tmp_path / "sync"), 2, job)
    expected = snapshot(job[0], job[1])
    checkpointer = Checkpointer(tmp_path / "async", async_mode=True)
    path = save(checkpointer, 2, job)
    train(*job, steps=2)  # changes the live tensors; the checkpoint must keep the step-2 state
    checkpointer.close()

    assert verify_checkpoint(path) == (True, "ok")
    sync_files = json.loads((tmp_path / "sync" / "step-00000002" / "manifest.json").read_text())["files"]
    async_files = json.loads((path / "manifest.json").read_text())["files"]
    assert sync_files.keys() == async_files.keys()
    for name in ("model.safetensors", "train_state.json", "dcp/__0_0.distcp"):
        assert sync_files[name]["xxh3-128"] == async_files[name]["xxh3-128"], name
    restored = make_job(seed=3)
    Checkpointer(tmp_path / "async").load(path, *restored, model_config=CONFIG)
    assert_same_snapshot(snapshot(restored[0], restored[1]), expected)


def test_state_encoding_round_trips_exactly():
    value = {"tuple": (1, (2.5, "x")), "bytes": b"\xff\x00", "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
             "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "scalar": torch.tensor(7),
             "empty": torch.empty(0, 3), "int_keys": {1: "a", 2: [None, True]}, "nested": [{"__odd": 1}]}
    decoded = decode_state(json.loads(json.dumps(encode_state(value, "value"))))
    assert decoded["tuple"] == (1, (2.5, "x")) and decoded["bytes"] == b"\xff\x00"
    assert decoded["array"].dtype == np.uint32 and (decoded["array"] == value["array"]).all()
    for name in ("bf16", "scalar", "empty"):
        assert decoded[name].dtype == value[name].dtype and torch.equal(decoded[name], value[name])
    assert decoded["int_keys"] == {1: "a", 2: [None, True]} and decoded["nested"] == [{"__odd": 1}]
    with pytest.raises(TypeError, match="loader_state.fn holds a function"):
        encode_state({"fn": lambda: 0}, "loader_state")


def test_load_for_inference_builds_the_decoder_from_safetensors(tmp_path):
    from gonogo.model.decoder import Decoder

    config = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    torch.manual_seed(0)
    model = Decoder(config)
    model.init_weights(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    Checkpointer(tmp_path / "run" / "checkpoints").save(5, model, optimizer, None, None, {}, config)

    loaded, loaded_config, meta = load_for_inference(tmp_path / "run")
    assert loaded_config == config and meta["step"] == 5 and not loaded.training
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model.eval()(tokens))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())

    # a Hugging Face export of it loads through the same call (imported by gonogo.export.hf)
    from gonogo.export.hf import export_hf

    export_hf(tmp_path / "run", tmp_path / "export")
    imported, imported_config, _ = load_for_inference(tmp_path / "export")
    assert imported_config == config and not imported.training
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens), model(tokens))


def test_commit_marker_protects_the_manifest(tmp_path):
    path = save(Checkpointer(tmp_path), 10, make_job())
    listing = json.loads((path / "manifest.json").read_text())
    listing["files"]["meta.json"]["size"] += 0  # same content, rewritten with other spacing
    (path / "manifest.json").write_text(json.dumps(listing))
    assert verify_checkpoint(path) == (False, "manifest.json does not match the hash recorded in COMMITTED")
    assert manifest.looks_like_checkpoint(path)


def test_resume_from_outside_the_run_refuses_a_checkpoint_that_does_not_verify(tmp_path, capsys):
    import hashlib
    import shutil

    """DCP's .metadata is a pickle: a checkpoint is verified (every file it would read listed and
    hashed) in the parent, before a worker starts, and refused in one line with exit 2."""
    from gonogo.checkpoints import check_resume_path
    from gonogo.cli import main

    outside = save(Checkpointer(tmp_path / "elsewhere"), 2, make_job())
    check_resume_path(str(outside))  # a good one passes
    # a forged manifest that leaves the pickle out (and a COMMITTED that matches it)
    forged = tmp_path / "forged"

    shutil.copytree(outside, forged)
    listed = json.loads((forged / "manifest.json").read_text())
    del listed["files"]["dcp/.metadata"]
    forged_bytes = json.dumps(listed).encode()
    (forged / "manifest.json").write_bytes(forged_bytes)
    (forged / "COMMITTED").write_text(json.dumps({"format": 1, "manifest_sha256":
                                                  hashlib.sha256(forged_bytes).hexdigest()}))
    assert verify_checkpoint(forged) == (True, "ok")  # the manifest alone cannot tell
    with pytest.raises(UserError, match=r"dcp/\.metadata is not listed in the manifest"):
        check_resume_path(str(forged))
    # the same forged checkpoint found inside a run directory someone else made
    foreign_run = tmp_path / "foreign-run"
    shutil.copytree(forged, foreign_run / "checkpoints" / "train" / forged.name.replace("forged", "step-00000002"))
    with pytest.raises(UserError, match=r"dcp/\.metadata is not listed in the manifest"):
        check_resume_path(str(foreign_run))
    # a flipped byte in the pickle itself
    flipped = tmp_path / "flipped"
    shutil.copytree(outside, flipped)
    metadata = flipped / "dcp" / ".metadata"
    data = bytearray(metadata.read_bytes())
    data[len(data) // 2] ^= 0xFF
    metadata.write_bytes(bytes(data))
    for bad, why in ((forged, "not listed in the manifest"), (flipped, "corrupted")):
        code = main(["train", "tiny-dense", "--nproc", "1", "--out", str(tmp_path / f"run-{bad.name}"),
                     "--resume", str(bad), "train.parallel=none"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and why in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / f"run-{bad.name}" / "stages").exists()  # no worker started


def test_an_async_save_whose_write_fails_never_commits(tmp_path, monkeypatch):
    """A background write that dies half-way leaves only the hidden temporary directory; the
    previous checkpoint stays the newest good one, and the failure reaches the training loop."""
    from torch.distributed.checkpoint import filesystem

    job = make_job()
    checkpointer = Checkpointer(tmp_path, async_mode=True)
    save(checkpointer, 1, job)
    checkpointer.wait()
    real_write = filesystem._write_files_from_queue

    def dying_write(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_files_from_queue", dying_write)
    save(checkpointer, 2, job)
    with pytest.raises(RuntimeError, match="async checkpoint step-00000002 failed"):
        checkpointer.wait()
    monkeypatch.setattr(filesystem, "_write_files_from_queue", real_write)
    assert not (tmp_path / "step-00000002").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["step-00000001"]
    assert manifest.newest_verified(tmp_path)[0] == tmp_path / "step-00000001"


def test_a_save_without_consolidated_weights_still_loads_for_inference(tmp_path):
    """Intermediate training saves leave out model.safetensors (a second copy of the weights);
    inference then reads the model part of the verified DCP shards, with the same result."""
    from gonogo.model.decoder import Decoder

    config = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    torch.manual_seed(0)
    model = Decoder(config)
    model.init_weights(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = Checkpointer(tmp_path).save(5, model, optimizer, None, None, {}, config, consolidate=False)
    assert not (path / "model.safetensors").exists() and verify_checkpoint(path) == (True, "ok")
    loaded, _, meta = load_for_inference(path)
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model.eval()(tokens))
    assert meta["step"] == 5


def test_a_sync_save_hashes_while_writing_and_reads_nothing_back(tmp_path, monkeypatch):
    def no_read_back(path, algorithm=manifest.ALGORITHM):
        raise AssertionError(f"{path} was read back to be hashed")

    monkeypatch.setattr(manifest, "hash_file", no_read_back)
    path = save(Checkpointer(tmp_path), 3, make_job())
    monkeypatch.undo()
    listing = json.loads((path / "manifest.json").read_text())
    assert listing["algorithm"] == "xxh3-128" and listing["format"] == 2
    assert {"model.safetensors", "dcp/.metadata", "dcp/__0_0.distcp", "meta.json", "train_state.json",
            "ranks/rank-00000.json"} <= set(listing["files"])
    for name, entry in listing["files"].items():  # what was hashed in flight is what is on disk
        assert entry["xxh3-128"] == manifest.hash_file(path / name), name
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(weights[name], tensor) for name, tensor in make_job()[0].state_dict().items())


def test_a_sha256_manifest_of_an_older_checkpoint_still_verifies(tmp_path):
    import hashlib

    path = save(Checkpointer(tmp_path), 10, make_job())
    files = json.loads((path / "manifest.json").read_text())["files"]
    old = {"format": 1, "files": {name: {"size": entry["size"], "sha256": manifest.sha256_file(path / name)}
                                  for name, entry in files.items()}}
    old_bytes = json.dumps(old).encode()
    (path / "manifest.json").write_bytes(old_bytes)
    (path / "COMMITTED").write_text(json.dumps({"format": 1, "manifest_sha256": hashlib.sha256(old_bytes).hexdigest()}))
    assert verify_checkpoint(path) == (True, "ok")
    shard = path / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(path) == (False, "dcp/__0_0.distcp: sha256 does not match the manifest (corrupted)")


def test_the_manifest_digest_is_xxh3_128_as_xxhsum_H2_prints_it(tmp_path):
    """The reference values are `xxhsum -H2`'s (xxHash 0.8): a user can check a file by hand."""
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "word").write_bytes(b"gonogo")
    assert manifest.hash_file(tmp_path / "empty") == "99aa06d3014798d86001c324468d497f"
    assert manifest.hash_file(tmp_path / "word") == "724a858f65809cd225d81c9b3943c6c4"
    writer = manifest.HashingWriter(tmp_path / "written")
    writer.write(b"gono")
    writer.write(b"go")
    assert writer.close() == {"size": 6, "xxh3-128": "724a858f65809cd225d81c9b3943c6c4"}


def test_a_blake3_manifest_of_an_older_checkpoint_still_verifies_and_loads(tmp_path):
    import hashlib

    job = make_job()
    path = save(Checkpointer(tmp_path), 10, job)
    files = json.loads((path / "manifest.json").read_text())["files"]
    old = {"format": 2, "algorithm": "blake3",
           "files": {name: {"size": entry["size"], "blake3": manifest.hash_file(path / name, "blake3")}
                     for name, entry in files.items()}}
    old_bytes = json.dumps(old).encode()
    (path / "manifest.json").write_bytes(old_bytes)
    (path / "COMMITTED").write_text(json.dumps({"format": 2, "manifest_sha256": hashlib.sha256(old_bytes).hexdigest()}))
    assert verify_checkpoint(path) == (True, "ok")
    fresh = make_job(seed=1)
    assert Checkpointer(tmp_path).load(path, *fresh, model_config=CONFIG)[0] == 10  # shards hashed while read
    assert_same_snapshot(snapshot(*fresh[:2]), snapshot(*job[:2]))
    shard = path / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(path) == (False, "dcp/__0_0.distcp: blake3 does not match the manifest (corrupted)")
    with pytest.raises(UserError, match="blake3 does not match"):
        Checkpointer(tmp_path).load(path, *make_job(seed=1), model_config=CONFIG)


def _zip_record_crcs(path: Path) -> list[int]:
    """The CRC-32 field of every zip central directory entry in ``path`` (a DCP shard is torch.save
    records, each a small zip archive, one after another; torch writes the CRC there and in a data
    descriptor, the local headers hold 0)."""
    import struct

    data, crcs, at = path.read_bytes(), [], 0
    while (at := data.find(b"PK\x01\x02", at)) != -1:
        crcs.append(struct.unpack_from("<I", data, at + 16)[0])
        at += 4
    return crcs


def test_dcp_shards_are_written_without_zip_crc32_and_the_option_is_restored(tmp_path):
    """The manifest digest of each file covers its bytes, so torch.save's CRC-32 (45% of a sync save) is not
    computed for a checkpoint's shards; the process-wide option comes back as it was, and the
    checkpoint loads exactly."""
    job = make_job()
    train(*job, steps=2)
    assert torch.serialization.get_crc32_options() is True
    path = save(Checkpointer(tmp_path), 2, job)
    assert torch.serialization.get_crc32_options() is True
    shards = sorted((path / "dcp").glob("*.distcp"))
    crcs = [crc for shard in shards for crc in _zip_record_crcs(shard)]
    assert shards and crcs and set(crcs) == {0}
    # the same tensors saved by a plain torch.save carry CRCs: the check above can fail
    torch.save(job[0].state_dict(), tmp_path / "plain.pt")
    assert any(_zip_record_crcs(tmp_path / "plain.pt"))
    restored = make_job(seed=1)
    Checkpointer(tmp_path).load(path, *restored, model_config=CONFIG)
    assert_same_snapshot(snapshot(restored[0], restored[1]), snapshot(job[0], job[1]))
