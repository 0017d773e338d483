"""Resolving a model directory into a CheckpointRef: torch-free, verified once per process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gonogo.checkpoints import STATS, CheckpointRef, resolve
from gonogo.checkpoints.checkpointer import Checkpointer
from gonogo.infer.device import load_for_inference
from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def run_with_checkpoints(root: Path, steps=(10, 20)) -> Path:
    from gonogo.model.decoder import Decoder

    torch.manual_seed(0)
    model = Decoder(CONFIG)
    model.init_weights(0)
    checkpointer = Checkpointer(root / "checkpoints" / "train")
    for step in steps:
        checkpointer.save(step, model, None, None, None, {}, CONFIG, {"train": {"steps": step}})
    return root


def test_a_run_dir_resolves_to_its_newest_checkpoint_with_format_and_metadata(tmp_path):
    run = run_with_checkpoints(tmp_path / "run")
    ref = resolve(run)
    assert isinstance(ref, CheckpointRef) and ref.verified and ref.format == "gonogo"
    assert ref.path == run / "checkpoints" / "train" / "step-00000020"
    assert ref.step == 20 and ref.tokenizer == "byte-v1" and ref.model_config == CONFIG.model_dump(mode="json")
    assert ref.manifest["algorithm"] == "xxh3-128" and "meta.json" in ref.manifest["files"]
    assert resolve(ref) is ref  # a reference handed on is not resolved again
    assert Path(ref) == ref.path


def test_a_run_of_several_training_stages_hashes_only_the_checkpoint_it_picks(tmp_path, caplog):
    """`gonogo serve --checkpoint RUN_DIR` after a plan (pretrain, then finetune): the finetune's
    checkpoint, committed last, is the run's model and the only one hashed; when it is damaged
    the next newest (pretrain's) is picked, and the damaged one is named."""
    from gonogo.model.decoder import Decoder

    run = run_with_checkpoints(tmp_path / "run", steps=(10, 20))  # checkpoints/train: the pretraining
    model = Decoder(CONFIG)
    Checkpointer(run / "checkpoints" / "finetune").save(5, model, None, None, None, {}, CONFIG, {})
    STATS.reset()
    ref = resolve(run)
    assert ref.path == run / "checkpoints" / "finetune" / "step-00000005"
    assert STATS.verifications == 1

    weights = ref.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    STATS.reset()
    with caplog.at_level("WARNING", logger="gonogo.checkpoints.reference"):
        fallback = resolve(run)
    assert fallback.path == run / "checkpoints" / "train" / "step-00000020"
    assert STATS.verifications == 2  # the damaged finetune checkpoint, then pretrain's newest
    assert any("skipping" in r.getMessage() and "step-00000005" in r.getMessage() for r in caplog.records)


def test_resolving_does_not_import_torch(tmp_path):
    run = run_with_checkpoints(tmp_path / "run", steps=(5,))
    code = ("import sys\nfrom gonogo.checkpoints import resolve\nref = resolve(sys.argv[1])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint(ref.format, ref.step)")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["gonogo", "5"]


def test_a_checkpoint_is_hashed_once_per_process_and_again_when_a_file_changes(tmp_path, caplog):
    run = run_with_checkpoints(tmp_path / "run")
    STATS.reset()
    with caplog.at_level("INFO", logger="gonogo.checkpoints.reference"):
        first = resolve(run)
        resolve(run)
        resolve(first.path)
        load_for_inference(run)  # what `serve`, `eval` and `export` do after their own checks
    assert STATS.verifications == 1 and STATS.cache_hits >= 3
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verified checkpoint")]
    assert len(lines) == 1 and "xxh3-128" in lines[0] and f"{len(first.manifest['files'])} files" in lines[0]

    # a file rewritten since (same size): not trusted from memory; hashed again, and refused
    weights = first.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse clocks: a visible change
    resolved = resolve(run)
    assert STATS.verifications == 3  # step 20 again (now refused), then step 10
    assert resolved.path.name == "step-00000010"
    with pytest.raises(UserError, match="model.safetensors: xxh3-128 does not match"):
        resolve(first.path)


def test_a_hugging_face_directory_is_a_reference_without_a_manifest(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "gonogo": {"step": 7}}))
    (export / "model.safetensors").write_bytes(b"")
    ref = resolve(export)
    assert ref.format == "hf" and not ref.verified and ref.manifest is None and ref.step == 7
    assert ref.model_config is None


def test_a_quantized_checkpoint_or_export_cannot_be_resumed(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="Hugging Face export has no optimizer"):
        Checkpointer(tmp_path / "ckpt").load(export, nn.Linear(2, 2))
