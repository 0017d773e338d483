"""Finetuning an imported Hugging Face model on chats with its own template, then exporting it back."""

from __future__ import annotations

import json

import torch

from gonogo.cli import main
from tests.train.test_finetune import TINY_TRAIN, write_chats


def test_lora_finetune_an_hf_model_with_its_template_then_export_merged(tmp_path, tiny_hf_models, capsys):
    """LoRA through peft (full finetuning of an imported model runs in tests/test_byo_model_plan.py)."""
    from transformers import AutoModelForCausalLM

    from gonogo.data.hf_tokenizer import HFTokenizer
    from gonogo.checkpoints.hf_import import load_hf_dir
    from gonogo.export.hf import export_hf
    from gonogo.infer.device import load_for_inference

    source = tiny_hf_models["qwen3"]
    chats = write_chats(tmp_path / "chats.jsonl", 40, [])
    out = tmp_path / "run"
    code = main(["finetune", "--checkpoint", str(source), "--nproc", "1", "--out", str(out),
                 f"data.source={chats}", "data.val_percent=20", "train.steps=3", "train.lora_rank=4",
                 "train.lr=1e-2", *TINY_TRAIN])
    assert code == 0, capsys.readouterr().err
    [step] = list((out / "checkpoints" / "finetune").glob("step-*"))
    meta = json.loads((step / "meta.json").read_text())
    # trained with the model's own tokenizer, recorded so that serve/eval/export use it too
    assert meta["tokenizer"] == "hf" and meta["tokenizer_dir"] == str(source.resolve())
    assert meta["data"]["tokenizer"] == str(source.resolve()) and meta["model"]["hf_architecture"] == "Qwen3ForCausalLM"

    tuned, _, _ = load_for_inference(step)
    original, _, _ = load_hf_dir(source)
    moved = {name for name, tensor in tuned.state_dict().items() if not torch.equal(tensor, original.state_dict()[name])}
    # the adapters moved the targeted projections (merged into them); norms and embeddings stayed frozen
    assert moved and all(name.split(".")[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for name in moved), moved
    assert any(".wq." in name for name in moved) and any(".w2." in name for name in moved)
    from safetensors import safe_open

    with safe_open(str(step / "lora_adapters.safetensors"), "pt") as adapters:
        assert any("lora_A" in key for key in adapters.keys()) and any("lora_B" in key for key in adapters.keys())

    exported = export_hf(step, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    tokens = torch.tensor([HFTokenizer(exported).apply_chat_template([{"role": "user", "content": "double 4 🙂"}],
                                                                       add_generation_prompt=True)[0]])
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, tuned(tokens), atol=1e-4, rtol=0)


def test_merged_adapters_compute_what_the_adapted_model_computes():
    from gonogo.model.shape import ModelConfig
    from gonogo.model.decoder import Decoder
    from gonogo.checkpoints.adapters import is_lora_state, merge
    from gonogo.train.lora import add_lora

    config = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, qkv_bias=True)
    adapted = add_lora(Decoder(config), rank=4, alpha=8.0, targets=["wq", "wv", "w2"])
    assert {name for name, p in adapted.named_parameters() if p.requires_grad} == {
        name for name, _ in adapted.named_parameters() if ".lora_" in name}
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_" in name:
                parameter.normal_(0, 0.1)  # B starts at 0; make the adapters do something
    tokens = torch.randint(0, 300, (2, 10))
    state = adapted.state_dict()
    assert is_lora_state(state)
    merged, adapters = merge(state, rank=4, alpha=8.0)
    plain = Decoder(config)
    plain.load_state_dict(merged)  # strict: exactly the decoder's own names
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), adapted(tokens), atol=1e-5, rtol=0)
    assert len(adapters) == 2 * 3 * 2  # A and B for 3 targets in 2 layers


def test_default_lora_targets_are_the_projections_the_model_has():
    """An all-MoE model (Mixtral, Qwen3-MoE) has no dense w1 w2 w3; a target named by the user must exist."""
    import pytest

    from gonogo.errors import UserError
    from gonogo.model.shape import ModelConfig, MoEConfig
    from gonogo.model.decoder import Decoder
    from gonogo.train.lora import add_lora

    config = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32))
    adapted = add_lora(Decoder(config), rank=4, alpha=8.0, targets=None)
    adapted_layers = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _ in adapted.named_parameters()
                      if ".lora_" in name}
    assert adapted_layers == {"wq", "wk", "wv", "wo"}
    dense = add_lora(Decoder(config.model_copy(update={"moe": None})), rank=4, alpha=8.0, targets=None)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _ in dense.named_parameters()
            if ".lora_" in name} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    with pytest.raises(UserError, match="train.lora_targets: no module named 'w1'"):
        add_lora(Decoder(config), rank=4, alpha=8.0, targets=["wq", "w1"])
