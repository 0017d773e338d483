"""Finetuning an imported Hugging Face model on chats with its own template, then exporting it back."""

from __future__ import annotations

import json

import torch

from gonogo.cli import main
from tests.train.test_finetune import TINY_TRAIN, write_chats


def test_finetune_an_hf_model_with_its_template_then_export_to_its_architecture(tmp_path, tiny_hf_models, capsys):
    from transformers import AutoModelForCausalLM

    from gonogo.data.hf_tokenizer import HFTokenizer
    from gonogo.export.hf import export_hf, load_hf_dir
    from gonogo.train.checkpoint import load_for_inference

    source = tiny_hf_models["qwen3"]
    chats = write_chats(tmp_path / "chats.jsonl", 40, [])
    out = tmp_path / "run"
    code = main(["finetune", "--checkpoint", str(source), "--nproc", "1", "--out", str(out),
                 f"data.source={chats}", "data.val_percent=20", "train.steps=3", *TINY_TRAIN])
    assert code == 0, capsys.readouterr().err
    [step] = list((out / "checkpoints" / "finetune").glob("step-*"))
    meta = json.loads((step / "meta.json").read_text())
    # trained with the model's own tokenizer, recorded so that serve/eval/export use it too
    assert meta["tokenizer"] == "hf" and meta["tokenizer_dir"] == str(source.resolve())
    assert meta["data"]["tokenizer"] == str(source.resolve()) and meta["model"]["hf_architecture"] == "Qwen3ForCausalLM"

    tuned, _, _ = load_for_inference(step)
    original, _, _ = load_hf_dir(source)
    moved = [name for name, tensor in tuned.state_dict().items() if not torch.equal(tensor, original.state_dict()[name])]
    assert moved  # the finetune changed the weights

    exported = export_hf(step, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    tokens = torch.tensor([HFTokenizer(exported).apply_chat_template([{"role": "user", "content": "double 4 🙂"}],
                                                                       add_generation_prompt=True)[0]])
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, tuned(tokens), atol=1e-4, rtol=0)
