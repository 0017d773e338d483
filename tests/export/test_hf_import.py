"""Importing real Hugging Face checkpoints: every supported architecture computes transformers' logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gonogo.errors import UserError
from gonogo.checkpoints.hf_import import load_hf_dir
from tests.hf_models import ARCHITECTURE_NAMES


def _transformers_logits(directory, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_imported_model_computes_transformers_logits(tiny_hf_models, name):
    directory = tiny_hf_models[name]
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    model, config, meta = load_hf_dir(directory)
    assert meta["source"]["architecture"] == json.loads((directory / "config.json").read_text())["architectures"][0]
    assert next(model.parameters()).dtype == torch.float32  # the checkpoint's dtype
    with torch.no_grad():
        ours = model(tokens)
    expected = _transformers_logits(directory, tokens)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_the_features_each_architecture_brings(tiny_hf_models):
    configs = {name: load_hf_dir(tiny_hf_models[name])[1] for name in ("llama", "qwen2", "qwen3", "qwen2moe", "mistral")}
    assert configs["llama"].rope_scaling is not None and not configs["llama"].tie_embeddings
    assert configs["qwen2"].qkv_bias and configs["qwen2"].tie_embeddings
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 32
    assert configs["mistral"].head_dim == 32
    moe = configs["qwen2moe"].moe
    assert moe.shared_expert_gate and moe.shared_expert_ffn_dim == 48 and moe.first_dense_layers == 1
    assert (tiny_hf_models["llama"] / "model.safetensors.index.json").is_file()  # the sharded one


def test_dtype_is_the_checkpoints_unless_told(tmp_path, tiny_hf_models):
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_hf_models["qwen3"], dtype=torch.bfloat16).save_pretrained(bf16)
    model, _, meta = load_hf_dir(bf16)
    assert next(model.parameters()).dtype == torch.bfloat16 and meta["source"]["dtype"] == "bfloat16"
    model32, _, _ = load_hf_dir(bf16, dtype=torch.float32)
    assert next(model32.parameters()).dtype == torch.float32


def _edited(tmp_path, source, **changes):
    directory = tmp_path / "edited"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("name, changes, message", [
    ("mistral", {"sliding_window": 16}, "sliding_window: sliding-window attention"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
               "layer_types": ["sliding_attention", "sliding_attention"]}, "use_sliding_window"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_scaling type 'yarn'"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("qwen3", {"architectures": ["GptOssForCausalLM"]}, "architectures 'GptOssForCausalLM'"),
    ("qwen3moe", {"mlp_only_layers": [1], "num_hidden_layers": 4}, "MoE layers at \\[0, 2, 3\\]"),
    ("qwen3", {"num_hidden_layers": 1}, "tensor model.layers.1"),
    ("qwen3", {"head_dim": 16}, "has shape"),
])
def test_what_gonogo_cannot_honour_is_named(tmp_path, tiny_hf_models, name, changes, message):
    with pytest.raises(UserError, match=message):
        load_hf_dir(_edited(tmp_path, tiny_hf_models[name], **changes))


def test_a_truncated_shard_is_a_user_error(tmp_path, tiny_hf_models):
    directory = _edited(tmp_path, tiny_hf_models["llama"])
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(UserError, match="cannot read"):
        load_hf_dir(directory)
    shard.unlink()
    with pytest.raises(UserError, match="is missing"):
        load_hf_dir(directory)


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_export_goes_back_to_the_same_architecture_with_equal_logits(tmp_path, tiny_hf_models, name):
    from transformers import AutoTokenizer

    from gonogo.export.hf import export_hf

    directory = tiny_hf_models[name]
    out = export_hf(directory, tmp_path / "out")
    original, exported = (json.loads((path / "config.json").read_text()) for path in (directory, out))
    assert exported["architectures"] == original["architectures"]
    tokens = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_transformers_logits(out, tokens), _transformers_logits(directory, tokens),
                               atol=1e-4, rtol=0)
    # the model's own tokenizer, chat template and stop ids travel with it
    chat = [{"role": "user", "content": "hi 🙂 你好"}]
    assert (AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == AutoTokenizer.from_pretrained(directory).apply_chat_template(chat, tokenize=False,
                                                                           add_generation_prompt=True))
    generation = [json.loads((path / "generation_config.json").read_text()) for path in (directory, out)]
    assert generation[1]["eos_token_id"] == generation[0]["eos_token_id"]
    again, _, _ = load_hf_dir(out)  # and gonogo imports its own export of it
    assert again.config == load_hf_dir(directory)[1]


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_the_engines_cached_decode_computes_the_imported_models_logits(tiny_hf_models, name):
    """Prefill and a decode step through the KV cache (and the fused path where it applies)."""
    from gonogo.infer.cache import KVCache
    from gonogo.infer.fast_decode import maybe_fast

    model, config, _ = load_hf_dir(tiny_hf_models[name])
    forward = maybe_fast(model, True)
    cache = KVCache(n_layers=config.n_layers, max_batch=1, n_kv_heads=config.n_kv_heads, max_len=64,
                    head_dim=config.head_dim)
    tokens = torch.randint(0, 320, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache.begin(0, 1, 12)
        prefill = forward(tokens[:, :12], positions=torch.arange(12)[None], cache=cache)
        cache.commit()
        cache.begin(0, 1, 1)
        step = forward(tokens[:, 12:], positions=torch.tensor([[12]]), cache=cache)
        cache.commit()
        full = model(tokens)
    torch.testing.assert_close(prefill[0, -1], full[0, 11], atol=1e-4, rtol=0)
    torch.testing.assert_close(step[0, -1], full[0, 12], atol=1e-4, rtol=0)
