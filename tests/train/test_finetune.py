"""`gonogo finetune`: SFT from a checkpoint with the trainer, user JSONL validation (real torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gonogo.cli import main

# a 2-layer, d=64 model at sequence length 64: seconds per step on 2 CPU cores
TINY_TRAIN = ["train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2", "train.val_batches=1",
              "train.log_every=1", "train.val_every=0", "train.warmup_steps=1"]


def write_pretrained(directory: Path, seed: int = 1) -> Path:
    from safetensors.torch import save_file

    from gonogo.model.shape import ModelConfig
    from gonogo.model.decoder import Decoder
    from gonogo.checkpoints import manifest

    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128, max_seq_len=64)
    model = Decoder(config)
    model.init_weights(seed)
    directory.mkdir(parents=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "meta.json").write_text(json.dumps({"step": 100, "model": config.model_dump(), "tokenizer": "byte-v1",
                                                     "world_size": 1, "train": {}}))
    manifest.commit(directory)
    return directory


def write_chats(path: Path, good: int, bad: list[str]) -> Path:
    lines = []
    for number in range(good):
        if number % 2:
            lines.append(json.dumps({"prompt": f"{number}+1=", "completion": f"#### {number + 1}"}))
        else:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"double {number}"},
                                                  {"role": "assistant", "content": f"#### {2 * number}"}]}))
    lines[3:3] = bad  # bad lines 4, 5, ...
    path.write_text("\n".join(lines) + "\n")
    return path


BAD = ["{broken", json.dumps({"prompt": "x"}), json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "[1, 2]"]


def test_finetune_runs_on_the_good_lines_and_reports_the_bad_ones(tmp_path, capsys):
    pretrained = write_pretrained(tmp_path / "pretrained")
    chats = write_chats(tmp_path / "chats.jsonl", good=120, bad=BAD)
    out = tmp_path / "run"
    code = main(["finetune", "--checkpoint", str(pretrained), "--nproc", "1", "--out", str(out),
                 f"data.source={chats}", "data.val_percent=20", "train.steps=3", *TINY_TRAIN])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "stages" / "finetune" / "metrics.json").read_text())
    assert metrics["skipped_lines"] == 4 and metrics["good_lines"] == 120 and metrics["steps"] == 3
    assert metrics["final_loss"] > 0 and metrics["val_loss"] > 0 and metrics["tokens_per_second"] > 0
    bad = json.loads((out / "stages" / "finetune" / "bad_lines.json").read_text())
    assert [row["line"] for row in bad] == [4, 5, 6, 7]
    assert "not valid JSON" in bad[0]["problem"] and "role" in bad[2]["problem"]
    # the finetuned checkpoint is in the stage's own folder and says it was trained on chats
    [step] = list((out / "checkpoints" / "finetune").glob("step-*"))
    meta = json.loads((step / "meta.json").read_text())
    assert meta["data"]["format"] == "chat" and meta["model"]["d_model"] == 64
    assert not (out / "mlperf.log").exists()  # the MLPerf log times pretraining only


def test_a_mostly_broken_file_stops_with_exit_2_before_any_worker(tmp_path, capsys):
    pretrained = write_pretrained(tmp_path / "pretrained")
    chats = write_chats(tmp_path / "chats.jsonl", good=6, bad=BAD)
    out = tmp_path / "run"
    code = main(["finetune", "--checkpoint", str(pretrained), "--out", str(out), f"data.source={chats}",
                 "data.min_good_fraction=0.8", *TINY_TRAIN])
    assert code == 2
    error = capsys.readouterr().err
    assert "only 6 of 10 lines are usable" in error and "first bad line 4" in error
    assert not out.exists()


def test_the_model_shape_comes_from_the_checkpoint(tmp_path, capsys):
    pretrained = write_pretrained(tmp_path / "pretrained")
    assert main(["finetune", "--checkpoint", str(pretrained), "model.d_model=32"]) == 2
    assert "shape from the checkpoint" in capsys.readouterr().err


def test_initial_weights_are_the_checkpoint_s(tmp_path):
    import torch
    from safetensors.torch import load_file

    from gonogo.model.decoder import Decoder
    from gonogo.stages.finetune.stage import load_finetune_config
    from gonogo.train.loop import load_initial_weights

    pretrained = write_pretrained(tmp_path / "pretrained", seed=5)
    config, _path, _resolved = load_finetune_config("sft-tiny", pretrained, ["train.seq_len=64"])
    assert config.data.format == "chat" and config.train.init_from == str(pretrained.resolve())
    model = Decoder(config.model)
    model.init_weights(0)
    load_initial_weights(model, config.train.init_from)
    saved = load_file(str(pretrained / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_the_default_checkpoint_is_the_newest_of_the_run_s_train_stages(tmp_path):
    from gonogo.errors import UserError
    from gonogo.rundir import RunDir
    from gonogo.stages.finetune.stage import default_checkpoint

    run_dir = RunDir.create(tmp_path / "run", plan_name="laptop")
    with pytest.raises(UserError, match="no committed checkpoint of a `train` stage"):
        default_checkpoint(run_dir)
    step = write_pretrained(run_dir.checkpoints_dir / "pretrain" / "step-00000100")
    write_pretrained(run_dir.checkpoints_dir / "other" / "step-00000100")  # not a train stage
    run_dir.write_state({"stages": {"pretrain": {"kind": "train"}, "other": {"kind": "finetune"}}})
    assert default_checkpoint(run_dir) == step
