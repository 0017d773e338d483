"""Hugging Face export: ``gonogo export --checkpoint DIR --to hf --out DIR``.

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
architecture fields remain the source of truth for the shapes. Reading a Hugging Face directory
back (``load_hf_dir``) is the HF checkpoint format of ``gonogo.checkpoints.hf_import``; this module only
writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from gonogo.checkpoints.hf_import import ATTENTION_NAMES, MLP_NAMES, WEIGHTS_NAME
from gonogo.errors import UserError

if TYPE_CHECKING:
    from gonogo.checkpoints.reference import CheckpointRef

log = logging.getLogger(__name__)

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
        for our_name, hf_name in ATTENTION_NAMES.items():
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
            for our_name, hf_name in MLP_NAMES.items():
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
                out[f"{hf}.mlp.experts.{expert}.{MLP_NAMES[name]}.weight"] = stacked[expert]
        if architecture == "Qwen3MoeForCausalLM":
            continue
        dtype = router.dtype
        if config.moe.shared_expert_gate:
            out[f"{hf}.mlp.shared_expert_gate.weight"] = weights[f"{ours}.moe.shared_expert_gate.weight"]
            for name, hf_name in MLP_NAMES.items():
                out[f"{hf}.mlp.shared_expert.{hf_name}.weight"] = weights[f"{ours}.moe.shared_expert.{name}.weight"]
            continue
        out[f"{hf}.mlp.shared_expert_gate.weight"] = torch.zeros(1, config.d_model, dtype=dtype)
        if config.moe.n_shared_experts:
            for name, hf_name in MLP_NAMES.items():
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

def _load_source(checkpoint: "str | Path | CheckpointRef"):
    """(Decoder, ModelConfig, meta) from a gonogo, quantized (dequantized) or Hugging Face checkpoint."""
    from gonogo.checkpoints.loaders import load_on_cpu

    return load_on_cpu(checkpoint)  # resolved (verified once) unless a reference is given; damaged files: one line


def export_hf(checkpoint: "str | Path | CheckpointRef", out: str | Path, dtype: str = "float32") -> Path:
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
