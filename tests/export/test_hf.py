"""Hugging Face export: transformers loads it and computes our logits; the import round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from gonogo.errors import UserError
from gonogo.checkpoints.hf_import import load_hf_dir
from gonogo.export.hf import export_hf
from gonogo.model.shape import ModelConfig, MoEConfig
from gonogo.model.decoder import Decoder
from tests.conftest import run_gonogo
from tests.infer.conftest import write_checkpoint

# fp32 on both sides; the same math in a different order (HF's expert loop, fused gate_up)
LOGIT_TOLERANCE = 1e-4

BASE = dict(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
CASES = {
    "llama": (ModelConfig(**BASE), "LlamaForCausalLM"),
    "llama-untied": (ModelConfig(**BASE, tie_embeddings=False), "LlamaForCausalLM"),
    "mixtral": (ModelConfig(**BASE, moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32, route_norm=True)),
                "MixtralForCausalLM"),
    # the tiny-moe preset's routing: softmax top-k without renormalisation, no shared expert
    "qwen2moe": (ModelConfig(**BASE, moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32)), "Qwen2MoeForCausalLM"),
    "qwen2moe-shared": (ModelConfig(**BASE, moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32, n_shared_experts=1,
                                                            route_norm=True, first_dense_layers=1, aux_loss_coef=0.02)),
                        "Qwen2MoeForCausalLM"),
}


def random_model(config: ModelConfig, seed: int = 3) -> Decoder:
    """Weights large enough for varied routing and logits, norms that are not all ones."""
    model = Decoder(config)
    model.init_weights(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
            else:
                parameter.mul_(4.0)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_the_export_and_logits_match(tmp_path, case):
    from transformers import AutoModelForCausalLM

    config, architecture = CASES[case]
    model = random_model(config)
    checkpoint = write_checkpoint(tmp_path / "step-00000010", model)
    out = export_hf(checkpoint, tmp_path / "hf")

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]

    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == architecture
    tokens = torch.randint(0, 263, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert ours.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    assert (ours - theirs).abs().max().item() <= LOGIT_TOLERANCE

    imported, imported_config, meta = load_hf_dir(out)
    assert imported_config == config
    assert meta["tokenizer"] == "byte-v1" and meta["step"] == 10
    original = model.state_dict()
    for name, tensor in imported.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_the_exported_tokenizer_matches_ours(tmp_path):
    from transformers import AutoTokenizer

    from gonogo.data.tokenizer import ByteTokenizer

    config, _ = CASES["llama"]
    out = export_hf(write_checkpoint(tmp_path / "step-00000010", random_model(config)), tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "Q: 47+385= A: 7+5=12 c1; #### 432 — ünïcode"
    assert theirs.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    generation = json.loads((out / "generation_config.json").read_text())
    assert ByteTokenizer().eos_id in generation["eos_token_id"]


def test_bf16_export_halves_the_file(tmp_path):
    config, _ = CASES["llama"]
    checkpoint = write_checkpoint(tmp_path / "step-00000010", random_model(config))
    fp32 = export_hf(checkpoint, tmp_path / "fp32")
    bf16 = export_hf(checkpoint, tmp_path / "bf16", dtype="bfloat16")
    ratio = (fp32 / "model.safetensors").stat().st_size / (bf16 / "model.safetensors").stat().st_size
    assert 1.9 < ratio < 2.0
    model, _, _ = load_hf_dir(bf16)
    assert torch.equal(model.norm.weight, random_model(config).norm.weight.to(torch.bfloat16).float())


@pytest.mark.parametrize("change, message", [
    (dict(score_func="sigmoid"), "score_func='sigmoid'"),
    (dict(capacity_factor=1.25), "capacity_factor=1.25"),
])
def test_moe_variants_without_a_counterpart_are_refused(tmp_path, change, message):
    config = ModelConfig(**BASE, moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32, **change))
    checkpoint = write_checkpoint(tmp_path / "step-00000010", random_model(config))
    with pytest.raises(UserError, match=message):
        export_hf(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_trained_expert_bias_is_refused(tmp_path):
    config = ModelConfig(**BASE, moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32, bias_update_rate=0.001))
    model = random_model(config)
    with torch.no_grad():
        model.layers[0].moe.expert_bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.0]))
    with pytest.raises(UserError, match="non-zero expert_bias"):
        export_hf(write_checkpoint(tmp_path / "step-00000010", model), tmp_path / "hf")


def test_import_refuses_what_does_not_map(tmp_path):
    config, _ = CASES["llama"]
    out = export_hf(write_checkpoint(tmp_path / "step-00000010", random_model(config)), tmp_path / "hf")
    hf = json.loads((out / "config.json").read_text())
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0}
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match="rope_scaling type 'yarn'"):
        load_hf_dir(out)
    hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match="'llama3' lacks low_freq_factor"):
        load_hf_dir(out)
    hf["architectures"] = ["GPT2LMHeadModel"]
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        load_hf_dir(out)


def test_export_command_and_checkpoint_resolution(tmp_path):
    config, _ = CASES["qwen2moe"]
    write_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000010", random_model(config))
    # a run directory resolves to its newest committed checkpoint
    result = run_gonogo("export", "--checkpoint", tmp_path / "run", "--to", "hf", "--out", tmp_path / "hf",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Qwen2MoeForCausalLM" in result.stdout
    again = run_gonogo("export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "hf", cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr


def test_export_of_a_quantized_checkpoint_carries_the_dequantized_weights(tmp_path):
    from gonogo.checkpoints.quantized import QuantizedModel

    config, _ = CASES["llama"]
    quantized = QuantizedModel.from_model(random_model(config), "fp8", meta={"step": 10})
    directory = quantized.save(tmp_path / "q")
    imported, _, _ = load_hf_dir(export_hf(directory, tmp_path / "hf"))
    expected = quantized.to_decoder().state_dict()
    for name, tensor in imported.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_never_loads_pickled_weights(tmp_path):
    config, _ = CASES["llama"]
    out = export_hf(write_checkpoint(tmp_path / "step-00000010", random_model(config)), tmp_path / "hf")
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickled"):
        load_hf_dir(out)
