"""Tiny random Hugging Face models for the import tests, made with transformers' own classes.

Each model is 2 layers of width 64, saved with ``save_pretrained`` in the Hugging Face layout
(the Llama one sharded, with model.safetensors.index.json), next to a byte-level BPE tokenizer
trained with ``tokenizers`` on gonogo's built-in corpus and a chat template in the style of that
model family. Every weight is drawn at random (norms and biases included), so a wrong mapping
cannot hide behind a zero or a one.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 320
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]"]

LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

FAMILY = {  # chat template, bos, eos (tokenizer_config), eos ids of generation_config.json
    "llama": (LLAMA_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"]),
    "chatml": (CHATML_TEMPLATE, None, "<|im_end|>", ["<|im_end|>", "<|end_of_text|>"]),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", ["</s>"]),
}


def _configs() -> dict:
    import transformers as t

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)
    return {
        "llama": ("llama", t.LlamaConfig(**common, intermediate_size=128, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "mistral": ("mistral", t.MistralConfig(**common, intermediate_size=128, head_dim=32, sliding_window=None,
                    tie_word_embeddings=False)),
        "qwen2": ("chatml", t.Qwen2Config(**common, intermediate_size=128, tie_word_embeddings=True)),
        "qwen3": ("chatml", t.Qwen3Config(**common, intermediate_size=128, head_dim=32, tie_word_embeddings=False)),
        "mixtral": ("mistral", t.MixtralConfig(**common, intermediate_size=64, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None)),
        "qwen2moe": ("chatml", t.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                     mlp_only_layers=[0], norm_topk_prob=False, tie_word_embeddings=False)),
        "qwen3moe": ("chatml", t.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                     num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)),
    }


ARCHITECTURE_NAMES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2moe", "qwen3moe")


def train_tokenizer():
    """A byte-level BPE of VOCAB ids trained on the synthetic corpus (a few hundred documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gonogo.data.sources import make_source

    source = make_source("synthetic")
    texts = [source.document(index, 0) for index in range(300)] + ["héllo wörld 你好 世界 🙂"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _randomise(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight") or "layernorm" in name:
                parameter.copy_(1 + 0.2 * noise)
            else:
                parameter.copy_(0.15 * noise)


def make_models(root: Path) -> dict[str, Path]:
    """Every architecture's tiny model under root/<name>; -> {name: directory}."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    directories = {}
    for seed, (name, (family, config)) in enumerate(_configs().items()):
        directory = root / name
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        _randomise(model, seed)
        model.save_pretrained(directory, max_shard_size="60KB" if name == "llama" else "50MB")
        save_tokenizer(tokenizer, directory, family)
        directories[name] = directory
    return directories


def save_tokenizer(tokenizer, directory: Path, family: str) -> None:
    template, bos, eos, eos_list = FAMILY[family]
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": "<|end_of_text|>", "add_bos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 256, "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
    generation["eos_token_id"] = [tokenizer.token_to_id(token) for token in eos_list]
    if bos:
        generation["bos_token_id"] = tokenizer.token_to_id(bos)
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
