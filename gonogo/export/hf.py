"""Hugging Face export and import: ``gonogo export --checkpoint DIR --to hf --out DIR``.

The export is a directory that ``transformers`` (``AutoModelForCausalLM.from_pretrained``) and
vLLM load as they are: ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
byte tokenizer's ``tokenizer.json`` / ``tokenizer_config.json`` (with the chat template).

Architectures, chosen from the model's shape, in the standard on-disk weight layout:

- dense → ``LlamaForCausalLM``. Our RoPE already uses Llama's "rotate half" pairing
  (gonogo.model.decoder), so wq/wk are copied as they are, with no row permutation.
- MoE with softmax top-k, renormalised top-k weights, no shared expert, every layer MoE →
  ``MixtralForCausalLM`` (Mixtral always renormalises its top-k weights).
- other softmax MoE → ``Qwen2MoeForCausalLM``: ``norm_topk_prob`` = our ``route_norm``, dense layers
  listed in ``mlp_only_layers``. Two things Qwen2-MoE has that we do not are set so they change
  nothing: the q/k/v biases are zeros, and the shared expert's sigmoid gate gets zero weights, so
  it multiplies by exactly 0.5, and its down projection is stored doubled (both are exact in
  floating point). A model without a shared expert gets a width-1 all-zero one (adds exactly 0).
- sigmoid router scores, capacity-limited routing (token dropping) and a non-zero expert bias
  (DeepSeek-V3's aux-loss-free balancing) have no counterpart in these architectures: the export
  refuses them with a UserError that names what does not map.

``config.json`` also carries a ``gonogo`` entry with our full model config, so the import
restores the training-only settings (aux loss coefficient, bias update rate) as well; the
architecture fields remain the source of truth for the shapes. ``load_hf_dir`` imports an
export back (safetensors only: no pickle is ever loaded); it accepts any Llama, Mixtral or
Qwen2-MoE directory whose features map onto our decoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from gonogo.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
ARCHITECTURES = ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
               "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
               "Qwen3MoeForCausalLM": "qwen3_moe"}
DTYPES = ("float32", "bfloat16")


# -- choosing the architecture -------------------------------------------------------------

def choose_architecture(config, weights: dict[str, Any], source_architecture: Optional[str] = None) -> str:
    """The transformers architecture that computes exactly what our model does (or UserError).

    A model imported from Hugging Face (``source_architecture``) goes back to its own architecture.
    """
    moe = config.moe
    if source_architecture is not None:
        return _check_source_architecture(config, source_architecture)
    if config.qkv_bias or config.qk_norm or (moe is not None and moe.shared_expert_gate):
        raise UserError("this model has Qwen features (q/k/v biases, QK-norm or a gated shared expert) but no "
                        "recorded source architecture; export the checkpoint it was imported from")
    if moe is None:
        return "LlamaForCausalLM"
    problems = []
    if moe.score_func != "softmax":
        problems.append(f"score_func={moe.score_func!r} (Mixtral and Qwen2-MoE route with softmax)")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor={moe.capacity_factor} (token dropping; these architectures are dropless)")
    biased = [name for name, tensor in weights.items() if name.endswith("moe.expert_bias") and bool(tensor.ne(0).any())]
    if biased:
        problems.append(f"a non-zero expert_bias in {biased[0]} (aux-loss-free balancing steers routing; "
                        "these routers have no bias)")
    if problems:
        raise UserError("this MoE model cannot be exported to a Hugging Face architecture exactly: "
                        + "; ".join(problems) + "; train with score_func='softmax', no capacity_factor and "
                        "bias_update_rate=0 to export")
    all_moe = all(config.is_moe_layer(layer) for layer in range(config.n_layers))
    if moe.n_shared_experts == 0 and moe.route_norm and all_moe:
        return "MixtralForCausalLM"
    return "Qwen2MoeForCausalLM"


def _check_source_architecture(config, architecture: str) -> str:
    """UserError when the (finetuned) model no longer fits the architecture it was imported as."""
    moe = config.moe
    wants_moe = architecture in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
    problems = []
    if wants_moe != (moe is not None):
        problems.append("MoE layers" if moe is not None else "no MoE layers")
    if config.qkv_bias and architecture not in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        problems.append("q/k/v biases")
    if not config.qkv_bias and architecture == "Qwen2ForCausalLM":
        problems.append("no q/k/v biases")
    if config.qk_norm != (architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")):
        problems.append("QK-norm" if config.qk_norm else "no QK-norm")
    if moe is not None and (moe.score_func != "softmax" or moe.capacity_factor is not None):
        problems.append("score_func/capacity_factor other than a dropless softmax router")
    if problems:
        raise UserError(f"the model cannot be exported as {architecture}, the architecture it was imported as: "
                        f"it has {', '.join(problems)}")
    return architecture


# -- config.json ---------------------------------------------------------------------------

def _rope_parameters(config) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope.update(config.rope_scaling.model_dump(mode="json"))
    return rope


def hf_config(config, architecture: str, dtype: str, special_ids: Optional[dict] = None) -> dict[str, Any]:
    """config.json for ``architecture``; ``special_ids`` (bos/eos/pad) default to the byte tokenizer's."""
    from gonogo.data.tokenizer import ByteTokenizer

    if special_ids is None:
        tokenizer = ByteTokenizer()
        special_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                       "pad_token_id": tokenizer.pad_id}
        tokenizer_name = tokenizer.name
    else:
        tokenizer_name = "hf"
    rope = _rope_parameters(config)
    common = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters, 4.x and vLLM read rope_theta / rope_scaling
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        **({"rope_scaling": rope} if config.rope_scaling is not None else {}),
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        **special_ids,
        "torch_dtype": dtype,
        "gonogo": {"model": config.model_dump(mode="json"), "tokenizer": tokenizer_name},
    }
    moe = config.moe
    no_window = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layers,
                 "layer_types": ["full_attention"] * config.n_layers}
    if architecture == "LlamaForCausalLM":
        return {**common, "intermediate_size": config.ffn_dim, "attention_bias": False, "mlp_bias": False}
    if architecture == "MistralForCausalLM":
        return {**common, "intermediate_size": config.ffn_dim, "sliding_window": None}
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        return {**common, "intermediate_size": config.ffn_dim, "attention_bias": False, **no_window}
    if architecture == "MixtralForCausalLM":
        return {**common, "intermediate_size": moe.expert_ffn_dim, "num_local_experts": moe.n_experts,
                "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
                "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None}
    dense_layers = [layer for layer in range(config.n_layers) if not config.is_moe_layer(layer)]
    moe_fields = {"intermediate_size": config.ffn_dim, "moe_intermediate_size": moe.expert_ffn_dim,
                  "num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.route_norm,
                  "decoder_sparse_step": 1, "mlp_only_layers": dense_layers,
                  "router_aux_loss_coef": moe.aux_loss_coef, "output_router_logits": False, **no_window}
    if architecture == "Qwen3MoeForCausalLM":
        if moe.n_shared_experts:
            raise UserError("Qwen3MoeForCausalLM has no shared expert; this model has one")
        return {**common, **moe_fields, "attention_bias": False}
    return {**common, **moe_fields, "shared_expert_intermediate_size": _shared_width(config), "qkv_bias": True}


def _shared_width(config) -> int:
    """Qwen2-MoE always has a shared expert: ours, or a width-1 placeholder of zeros."""
    moe = config.moe
    return moe.shared_expert_ffn_dim or moe.n_shared_experts * moe.expert_ffn_dim or 1


# -- weights: our names -> the standard on-disk Hugging Face names -------------------------------

_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def to_hf_weights(weights: dict, config, architecture: str) -> dict:
    """Our state dict -> the exported tensors (new tensors; the input is not modified)."""
    import torch

    out = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = weights["output.weight"]
    for layer in range(config.n_layers):
        ours, hf = f"layers.{layer}", f"model.layers.{layer}"
        out[f"{hf}.input_layernorm.weight"] = weights[f"{ours}.attention_norm.weight"]
        out[f"{hf}.post_attention_layernorm.weight"] = weights[f"{ours}.ffn_norm.weight"]
        for our_name, hf_name in _ATTENTION.items():
            out[f"{hf}.self_attn.{hf_name}.weight"] = weights[f"{ours}.attention.{our_name}.weight"]
            if config.qkv_bias and our_name != "wo":
                out[f"{hf}.self_attn.{hf_name}.bias"] = weights[f"{ours}.attention.{our_name}.bias"]
            elif architecture == "Qwen2MoeForCausalLM" and our_name != "wo":
                rows = weights[f"{ours}.attention.{our_name}.weight"].shape[0]
                out[f"{hf}.self_attn.{hf_name}.bias"] = torch.zeros(rows, dtype=weights["norm.weight"].dtype)
        if config.qk_norm:
            out[f"{hf}.self_attn.q_norm.weight"] = weights[f"{ours}.attention.q_norm.weight"]
            out[f"{hf}.self_attn.k_norm.weight"] = weights[f"{ours}.attention.k_norm.weight"]
        if not config.is_moe_layer(layer):
            for our_name, hf_name in _MLP.items():
                out[f"{hf}.mlp.{hf_name}.weight"] = weights[f"{ours}.feed_forward.{our_name}.weight"]
            continue
        router = weights[f"{ours}.moe.router.weight"]
        experts = {name: weights[f"{ours}.moe.experts.{name}"] for name in ("w1", "w2", "w3")}
        if architecture == "MixtralForCausalLM":
            out[f"{hf}.block_sparse_moe.gate.weight"] = router
            for expert in range(config.moe.n_experts):
                for name, stacked in experts.items():
                    out[f"{hf}.block_sparse_moe.experts.{expert}.{name}.weight"] = stacked[expert]
            continue
        out[f"{hf}.mlp.gate.weight"] = router
        for expert in range(config.moe.n_experts):
            for name, stacked in experts.items():
                out[f"{hf}.mlp.experts.{expert}.{_MLP[name]}.weight"] = stacked[expert]
        if architecture == "Qwen3MoeForCausalLM":
            continue
        dtype = router.dtype
        if config.moe.shared_expert_gate:
            out[f"{hf}.mlp.shared_expert_gate.weight"] = weights[f"{ours}.moe.shared_expert_gate.weight"]
            for name, hf_name in _MLP.items():
                out[f"{hf}.mlp.shared_expert.{hf_name}.weight"] = weights[f"{ours}.moe.shared_expert.{name}.weight"]
            continue
        out[f"{hf}.mlp.shared_expert_gate.weight"] = torch.zeros(1, config.d_model, dtype=dtype)
        if config.moe.n_shared_experts:
            for name, hf_name in _MLP.items():
                tensor = weights[f"{ours}.moe.shared_expert.{name}.weight"]
                # the gate multiplies by sigmoid(0) = 0.5: store 2·w2 (exact) so the product is ours
                out[f"{hf}.mlp.shared_expert.{hf_name}.weight"] = tensor * 2 if name == "w2" else tensor
        else:
            width = _shared_width(config)
            out[f"{hf}.mlp.shared_expert.gate_proj.weight"] = torch.zeros(width, config.d_model, dtype=dtype)
            out[f"{hf}.mlp.shared_expert.up_proj.weight"] = torch.zeros(width, config.d_model, dtype=dtype)
            out[f"{hf}.mlp.shared_expert.down_proj.weight"] = torch.zeros(config.d_model, width, dtype=dtype)
    return out


# -- export ------------------------------------------------------------------------------------

def _load_source(checkpoint: str | Path):
    """(Decoder, ModelConfig, meta) from a gonogo, quantized or Hugging Face checkpoint."""
    from gonogo.infer.quantize import is_quantized_dir, load_quantized
    from gonogo.train.checkpoint import load_for_inference, resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    if is_quantized_dir(directory):
        return load_quantized(directory)  # exports the dequantized weights
    return load_for_inference(directory)  # gonogo or Hugging Face; damaged files: one line


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write a Hugging Face directory for ``checkpoint`` at ``out`` (a new or empty directory)."""
    import torch
    from safetensors.torch import save_file

    from gonogo.data.tokenizer import ByteTokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose another --out")
    model, config, meta = _load_source(checkpoint)
    from gonogo.data.hf_tokenizer import HFTokenizer, load_tokenizer

    own_tokenizer = load_tokenizer(meta)
    own_tokenizer = own_tokenizer if isinstance(own_tokenizer, HFTokenizer) else None
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    architecture = choose_architecture(config, weights, config.hf_architecture)
    torch_dtype = getattr(torch, dtype)
    tensors = {name: tensor.to(torch_dtype).contiguous().clone()
               for name, tensor in to_hf_weights(weights, config, architecture).items()}

    temporary = out.with_name(f".tmp-{out.name}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    save_file(tensors, str(temporary / WEIGHTS_NAME), metadata={"format": "pt"})
    if own_tokenizer is not None:
        special_ids = {"bos_token_id": own_tokenizer.bos_id, "eos_token_id": own_tokenizer.eos_ids,
                       "pad_token_id": own_tokenizer.pad_id}
        generation = dict(special_ids)
    else:
        tokenizer = ByteTokenizer()
        special_ids = None
        generation = {"bos_token_id": tokenizer.bos_id,
                      "eos_token_id": [tokenizer.eos_id, tokenizer.end_id],  # <|end|> closes a chat turn
                      "pad_token_id": tokenizer.pad_id}
    config_json = hf_config(config, architecture, dtype, special_ids)
    if meta.get("step") is not None:
        config_json["gonogo"]["step"] = meta["step"]
    _write_json(temporary / "config.json", config_json)
    _write_json(temporary / "generation_config.json", generation)
    if own_tokenizer is not None:
        own_tokenizer.save(temporary)  # the model's own tokenizer files, chat template included
    else:
        tokenizer.save_hf(temporary)
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary.rename(out)
    log.info("exported %s as %s to %s", checkpoint, architecture, out)
    return out


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


# -- import ------------------------------------------------------------------------------------

IMPORT_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                        "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
_MOE = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
# tensors some checkpoints carry that hold no weights of the model (recomputed from the config)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _field(hf: dict, name: str, source: str):
    if hf.get(name) is None:
        raise UserError(f"{source}: config field {name!r} is missing")
    return hf[name]


def _rope_fields(hf: dict, source: str) -> dict:
    """rope_theta and, for Llama 3.x, the frequency scaling; any other RoPE variant is refused."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"{source}: partial_rotary_factor={partial} is not supported (gonogo rotates whole heads)")
    if rope_type == "default":
        return {"rope_theta": theta}
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [key for key in keys if rope.get(key) is None]
        if missing:
            raise UserError(f"{source}: rope_scaling type 'llama3' lacks {', '.join(missing)}")
        return {"rope_theta": theta, "rope_scaling": {"rope_type": "llama3", **{key: rope[key] for key in keys}}}
    raise UserError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                    "(gonogo implements plain RoPE and Llama 3's 'llama3' scaling)")


def _check_sliding_window(hf: dict, architecture: str, source: str) -> None:
    """Sliding-window attention differs from full attention once a sequence exceeds the window."""
    window = hf.get("sliding_window")
    max_positions = hf.get("max_position_embeddings") or 0
    if architecture in _QWEN:
        layer_types = hf.get("layer_types")
        if layer_types:
            sliding = "sliding_attention" in layer_types
        else:
            sliding = bool(hf.get("use_sliding_window")) and hf.get("max_window_layers", 0) < hf["num_hidden_layers"]
        if not sliding:
            return
        field = "use_sliding_window / layer_types"
    else:
        field = "sliding_window"
    if window and window < max_positions:
        raise UserError(f"{source}: {field}: sliding-window attention (window {window} < "
                        f"max_position_embeddings {max_positions}) is not supported; gonogo attends to the full context")


def _moe_layer_pattern(hf: dict, source: str) -> tuple[int, int]:
    """(first_dense_layers, every_n_layers) of a Qwen-MoE layout (UserError when it has another)."""
    n_layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    moe_layers = [layer for layer in range(n_layers) if layer not in dense and (layer + 1) % step == 0]
    if not moe_layers:
        raise UserError(f"{source}: no layer is MoE (decoder_sparse_step / mlp_only_layers); "
                        "give it as a dense model instead")
    first = moe_layers[0]
    every = moe_layers[1] - moe_layers[0] if len(moe_layers) > 1 else n_layers
    if moe_layers != list(range(first, n_layers, every)):
        raise UserError(f"{source}: decoder_sparse_step / mlp_only_layers put MoE layers at {moe_layers}, which "
                        "is not gonogo's pattern (the first k layers dense, then every n-th layer MoE)")
    return first, every


def _model_config_from_hf(hf: dict, source: str):
    """(architecture, ModelConfig, own export?) from a config.json (UserError naming what does not map)."""
    from gonogo.model.config import ModelConfig
    from gonogo.typed_config import validate

    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in IMPORT_ARCHITECTURES:
        raise UserError(f"{source}: architectures {architecture!r} cannot be imported; "
                        f"supported: {', '.join(IMPORT_ARCHITECTURES)}")
    saved = (hf.get("gonogo") or {}).get("model") or {}
    # written by export_hf from one of gonogo's own models: its Qwen2-MoE extras are neutral placeholders
    own_export = bool(saved) and not saved.get("qkv_bias") and not (saved.get("moe") or {}).get("shared_expert_gate")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (gonogo's MLP is SwiGLU with silu)")
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias=true is not supported (gonogo's MLP has no biases)")
    if hf.get("attention_bias") and architecture != "Qwen2MoeForCausalLM":
        raise UserError(f"{source}: attention_bias=true is not supported for {architecture} "
                        "(it biases o_proj too; gonogo supports q/k/v biases only, as Qwen2 has)")
    _check_sliding_window(hf, architecture, source)
    hidden, heads = _field(hf, "hidden_size", source), _field(hf, "num_attention_heads", source)
    head_dim = hf.get("head_dim") or hidden // heads
    qkv_bias = architecture == "Qwen2ForCausalLM" or (architecture == "Qwen2MoeForCausalLM"
                                                      and hf.get("qkv_bias", True) and not own_export)
    fields = {
        "vocab_size": _field(hf, "vocab_size", source), "d_model": hidden,
        "n_layers": _field(hf, "num_hidden_layers", source), "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "ffn_dim": _field(hf, "intermediate_size", source),
        "max_seq_len": _field(hf, "max_position_embeddings", source),
        "norm_eps": _field(hf, "rms_norm_eps", source),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **_rope_fields(hf, source),
    }
    if head_dim * heads != hidden:
        fields["attention_head_dim"] = head_dim
    # gonogo's own model exported as Llama/Mixtral/Qwen2-MoE keeps no architecture (export picks one)
    hf_architecture = saved.get("hf_architecture") if own_export else architecture
    if hf_architecture is not None:
        fields["hf_architecture"] = hf_architecture
    if qkv_bias:
        fields["qkv_bias"] = True
    if architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        fields["qk_norm"] = True
    saved_moe = saved.get("moe") or {}
    training_only = {key: saved_moe[key] for key in ("aux_loss_coef", "bias_update_rate") if key in saved_moe}
    if architecture == "MixtralForCausalLM":
        fields["ffn_dim"] = saved.get("ffn_dim", hf["intermediate_size"])  # unused: every layer is MoE
        fields["moe"] = {"n_experts": _field(hf, "num_local_experts", source),
                         "top_k": _field(hf, "num_experts_per_tok", source),
                         "expert_ffn_dim": hf["intermediate_size"], "route_norm": True, **training_only}
    elif architecture in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        first, every = _moe_layer_pattern(hf, source)
        n_experts = hf.get("num_experts") or hf.get("num_local_experts")
        if not n_experts:
            raise UserError(f"{source}: config field 'num_experts' is missing")
        expert_width = _field(hf, "moe_intermediate_size", source)
        moe = {"n_experts": n_experts, "top_k": _field(hf, "num_experts_per_tok", source),
               "expert_ffn_dim": expert_width, "route_norm": bool(hf.get("norm_topk_prob", False)),
               "first_dense_layers": first, "every_n_layers": every, **training_only}
        shared_width = hf.get("shared_expert_intermediate_size") or 0
        if architecture == "Qwen2MoeForCausalLM" and own_export:
            if shared_width > 1 and shared_width % expert_width:
                raise UserError(f"{source}: shared_expert_intermediate_size {shared_width} is not a whole "
                                f"number of experts of moe_intermediate_size {expert_width}")
            moe["n_shared_experts"] = shared_width // expert_width if shared_width > 1 else 0
        elif shared_width:
            moe.update(n_shared_experts=1, shared_expert_ffn_dim=shared_width, shared_expert_gate=True)
        fields["moe"] = moe
    return architecture, validate(ModelConfig, fields, source=source), own_export


class _Target:
    """Where one Hugging Face tensor goes: a parameter (an expert's slice of it), or a check."""

    __slots__ = ("name", "expert", "kind")

    def __init__(self, name: Optional[str], expert: Optional[int] = None, kind: str = "copy"):
        self.name, self.expert, self.kind = name, expert, kind  # kind: copy, half or zero


def _import_names(config, architecture: str, own_export: bool) -> dict[str, _Target]:
    """Every tensor the checkpoint must hold -> where it goes in gonogo's Decoder."""
    names = {"model.embed_tokens.weight": _Target("tok_embeddings.weight"),
             "model.norm.weight": _Target("norm.weight")}
    if not config.tie_embeddings:
        names["lm_head.weight"] = _Target("output.weight")
    for layer in range(config.n_layers):
        ours, hf = f"layers.{layer}", f"model.layers.{layer}"
        names[f"{hf}.input_layernorm.weight"] = _Target(f"{ours}.attention_norm.weight")
        names[f"{hf}.post_attention_layernorm.weight"] = _Target(f"{ours}.ffn_norm.weight")
        for our_name, hf_name in _ATTENTION.items():
            names[f"{hf}.self_attn.{hf_name}.weight"] = _Target(f"{ours}.attention.{our_name}.weight")
            if our_name == "wo":
                continue
            if config.qkv_bias:
                names[f"{hf}.self_attn.{hf_name}.bias"] = _Target(f"{ours}.attention.{our_name}.bias")
            elif architecture == "Qwen2MoeForCausalLM":  # gonogo's own export: zero placeholders
                names[f"{hf}.self_attn.{hf_name}.bias"] = _Target(None, kind="zero")
        if config.qk_norm:
            names[f"{hf}.self_attn.q_norm.weight"] = _Target(f"{ours}.attention.q_norm.weight")
            names[f"{hf}.self_attn.k_norm.weight"] = _Target(f"{ours}.attention.k_norm.weight")
        if not config.is_moe_layer(layer):
            for our_name, hf_name in _MLP.items():
                names[f"{hf}.mlp.{hf_name}.weight"] = _Target(f"{ours}.feed_forward.{our_name}.weight")
            continue
        moe = config.moe
        if architecture == "MixtralForCausalLM":
            names[f"{hf}.block_sparse_moe.gate.weight"] = _Target(f"{ours}.moe.router.weight")
            for expert in range(moe.n_experts):
                for name in ("w1", "w2", "w3"):
                    names[f"{hf}.block_sparse_moe.experts.{expert}.{name}.weight"] = _Target(
                        f"{ours}.moe.experts.{name}", expert)
            continue
        names[f"{hf}.mlp.gate.weight"] = _Target(f"{ours}.moe.router.weight")
        for expert in range(moe.n_experts):
            for name, hf_name in _MLP.items():
                names[f"{hf}.mlp.experts.{expert}.{hf_name}.weight"] = _Target(f"{ours}.moe.experts.{name}", expert)
        if architecture != "Qwen2MoeForCausalLM":
            continue
        if moe.shared_expert_gate:
            names[f"{hf}.mlp.shared_expert_gate.weight"] = _Target(f"{ours}.moe.shared_expert_gate.weight")
        else:  # gonogo's own export: a zero gate (x 0.5) and a doubled down projection
            names[f"{hf}.mlp.shared_expert_gate.weight"] = _Target(None, kind="zero")
        for name, hf_name in _MLP.items():
            key = f"{hf}.mlp.shared_expert.{hf_name}.weight"
            if not moe.n_shared_experts:
                names[key] = _Target(None, kind="zero")
            elif own_export and name == "w2":
                names[key] = _Target(f"{ours}.moe.shared_expert.w2.weight", kind="half")
            else:
                names[key] = _Target(f"{ours}.moe.shared_expert.{name}.weight")
    return names


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors file(s) of a single-file or sharded (model.safetensors.index.json) checkpoint."""
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = directory / f"{WEIGHTS_NAME}.index.json"
    if not index.is_file():
        raise UserError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                        "(pickled .bin weights are never loaded)")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{index}: not a valid safetensors index ({error})") from None
    files = []
    for shard in shards:
        path = directory / shard
        if Path(shard).name != shard or not path.is_file():
            raise UserError(f"{index}: shard {shard!r} is missing from {directory}")
        files.append(path)
    return files


_DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


def _checkpoint_dtype(hf: dict, source: str):
    import torch

    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in _DTYPE_NAMES:
        raise UserError(f"{source}: dtype {name!r} is not supported (float32, bfloat16 or float16)")
    return getattr(torch, _DTYPE_NAMES[name])


def _tokenizer_name(directory: Path) -> Optional[str]:
    """'byte-v1' when the directory's tokenizer.json is gonogo's byte tokenizer, 'hf' for another one."""
    from gonogo.data.tokenizer import ByteTokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = ByteTokenizer()
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    return tokenizer.name if content == tokenizer.hf_tokenizer_json() else "hf"


def _read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json; not a Hugging Face model directory")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{config_path}: not a JSON object")
    return hf


def hf_model_config(path: str | Path):
    """The ModelConfig of a Hugging Face directory from its config.json alone (UserError if it does not map)."""
    directory = Path(path)
    return _model_config_from_hf(_read_config(directory), str(directory / "config.json"))[1]


def check_hf_weights(path: str | Path) -> None:
    """UserError unless every safetensors file of a Hugging Face directory has a readable header whose
    tensors lie inside the file (a truncated download): reads the headers only, so a parent process
    can refuse a damaged model in one line before its workers start."""
    for weights in _weight_files(Path(path)):
        with _SafetensorsFile(weights):
            pass


def load_hf_dir(path: str | Path, *, device: Any = "cpu", dtype: Any = None):
    """-> (Decoder in eval mode, ModelConfig, meta) from a Hugging Face directory.

    The model is built empty on ``device`` in ``dtype`` (None: the checkpoint's own dtype from
    config.json), then filled one tensor at a time from each safetensors shard in turn, so the
    peak memory is the model plus one shard's mapped pages, never a second full copy.
    """
    import torch

    from gonogo.model.decoder import Decoder

    directory = Path(path)
    config_path = directory / "config.json"
    hf = _read_config(directory)
    architecture, config, own_export = _model_config_from_hf(hf, str(config_path))
    files = _weight_files(directory)
    target_dtype = dtype if dtype is not None else _checkpoint_dtype(hf, str(config_path))

    with torch.device("meta"):
        model = Decoder(config)
    model = model.to(dtype=target_dtype).to_empty(device=device)
    parameters = dict(model.named_parameters())
    names = _import_names(config, architecture, own_export)
    filled: set[str] = set()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.expert_bias.zero_()  # to_empty left it uninitialised; imported routers have no bias
            moe.reset_state()
        for file in files:
            with _SafetensorsFile(file) as reader:
                for key in reader.names():
                    target = names.get(key)
                    if target is None:
                        if key.endswith(_IGNORED_SUFFIXES) or (key == "lm_head.weight" and config.tie_embeddings):
                            continue
                        raise UserError(f"{file}: tensor {key} has no place in a {architecture} of this config "
                                        "(gonogo would compute a different model without it)")
                    _place(reader, target, key, parameters, str(directory))
                    filled.add(key)
    missing = [key for key in names if key not in filled]
    if missing:
        raise UserError(f"{directory}: weight {missing[0]} is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    # no tokenizer.json: gonogo's own export still names its byte tokenizer; anyone else's has none
    tokenizer = _tokenizer_name(directory) or (hf.get("gonogo") or {}).get("tokenizer")
    meta = {"step": (hf.get("gonogo") or {}).get("step"), "model": config.model_dump(mode="json"),
            "tokenizer": tokenizer, "tokenizer_dir": str(directory) if tokenizer == "hf" else None,
            "world_size": 1, "train": {},
            "source": {"format": "huggingface", "architecture": architecture, "path": str(directory),
                       "dtype": str(target_dtype).removeprefix("torch.")}}
    log.info("imported %s (%s) from %s", architecture, meta["source"]["dtype"], directory)
    return model.eval(), config, meta


def _place(reader: "_SafetensorsFile", target: _Target, key: str, parameters: dict, source: str) -> None:
    if target.kind == "zero":
        if bool(reader.read(key).ne(0).any()):
            raise UserError(f"{source}: {key} is not zero; gonogo's export wrote it as a zero placeholder "
                            "and nothing in the model computes it")
        return
    parameter = parameters[target.name]
    destination = parameter[target.expert] if target.expert is not None else parameter
    shape = reader.shape(key)
    if shape != tuple(destination.shape):
        raise UserError(f"{source}: {key} has shape {list(shape)}, the config says {list(destination.shape)}")
    if target.kind == "copy" and reader.read_into(key, destination):
        return  # read straight into the parameter's memory: no copy of the tensor at all
    tensor = reader.read(key)
    destination.copy_(tensor / 2 if target.kind == "half" else tensor)


class _SafetensorsFile:
    """A safetensors file read tensor by tensor with plain reads (no mmap): a tensor of the model's
    dtype goes straight into its parameter, so loading holds the model and nothing more; another
    dtype passes through one temporary tensor. The header is checked against the file's size."""

    DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "_SafetensorsFile":
        import struct

        self.handle = open(self.path, "rb")
        size = self.path.stat().st_size
        try:
            raw = self.handle.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(self.handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            header.pop("__metadata__", None)
            self.entries = {}
            for name, entry in header.items():
                start, end = entry["data_offsets"]
                shape = tuple(int(n) for n in entry["shape"])
                dtype = self.DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name} has dtype {entry['dtype']} (supported: F32, F16, BF16)")
                if not 0 <= start <= end <= size - 8 - length:
                    raise ValueError(f"tensor {name} lies beyond the end of the file")
                self.entries[name] = (shape, dtype, 8 + length + start, end - start)
        except (ValueError, KeyError, TypeError) as error:
            self.handle.close()
            raise UserError(f"{self.path}: cannot read safetensors ({error})") from None
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple:
        return self.entries[name][0]

    def _read_exactly(self, name: str, view: memoryview) -> None:
        shape, dtype, offset, nbytes = self.entries[name]
        if view.nbytes != nbytes:
            raise UserError(f"{self.path}: tensor {name} holds {nbytes} bytes, not the {view.nbytes} its "
                            f"shape {list(shape)} and dtype {dtype} need")
        self.handle.seek(offset)
        if self.handle.readinto(view) != nbytes:
            raise UserError(f"{self.path}: tensor {name} is cut short (the file is truncated)")

    def read_into(self, name: str, destination) -> bool:
        """Read ``name`` into ``destination`` (a CPU tensor of the same dtype); False if it cannot."""
        import torch

        if (destination.device.type != "cpu" or not destination.is_contiguous()
                or destination.dtype != getattr(torch, self.entries[name][1]) or not destination.numel()):
            return False
        self._read_exactly(name, memoryview(destination.view(-1).view(torch.uint8).numpy()))
        return True

    def read(self, name: str):
        import torch

        shape, dtype, _offset, _nbytes = self.entries[name]
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        if tensor.numel():
            self._read_exactly(name, memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        return tensor


# -- the command -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint, run, quantized or Hugging Face directory")
    parser.add_argument("--to", choices=["hf"], default="hf", help="the target format (Hugging Face)")
    parser.add_argument("--out", type=Path, default=None, help="the new directory (default: runs/export-<time>)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight dtype in model.safetensors (float32 is exact; bfloat16 halves the size)")


def command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gonogo.files import check_output_dir
    from gonogo.rundir import utc_stamp

    out = args.out or Path("runs") / f"export-{utc_stamp()}"
    check_output_dir(out)  # before the checkpoint is read
    directory = export_hf(args.checkpoint, out, args.dtype)
    architecture = json.loads((directory / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    size = (directory / WEIGHTS_NAME).stat().st_size
    Console().print(f"exported [bold]{architecture}[/bold] ({size / 2**20:.1f} MiB, {args.dtype}) to {directory}")
    return 0
