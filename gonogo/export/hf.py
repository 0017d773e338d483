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
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}
DTYPES = ("float32", "bfloat16")


# -- choosing the architecture -------------------------------------------------------------

def choose_architecture(config, weights: dict[str, Any]) -> str:
    """The transformers architecture that computes exactly what our model does (or UserError)."""
    moe = config.moe
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


# -- config.json ---------------------------------------------------------------------------

def hf_config(config, architecture: str, dtype: str) -> dict[str, Any]:
    from gonogo.data.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
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
        # transformers 5 reads rope_parameters, 4.x and vLLM read rope_theta
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": dtype,
        "gonogo": {"model": config.model_dump(mode="json"), "tokenizer": tokenizer.name},
    }
    moe = config.moe
    if architecture == "LlamaForCausalLM":
        return {**common, "intermediate_size": config.ffn_dim, "attention_bias": False, "mlp_bias": False}
    if architecture == "MixtralForCausalLM":
        return {**common, "intermediate_size": moe.expert_ffn_dim, "num_local_experts": moe.n_experts,
                "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
                "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None}
    dense_layers = [layer for layer in range(config.n_layers) if not config.is_moe_layer(layer)]
    return {**common, "intermediate_size": config.ffn_dim, "moe_intermediate_size": moe.expert_ffn_dim,
            "shared_expert_intermediate_size": _shared_width(config),
            "num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.route_norm,
            "decoder_sparse_step": 1, "mlp_only_layers": dense_layers, "qkv_bias": True,
            "router_aux_loss_coef": moe.aux_loss_coef, "output_router_logits": False,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layers}


def _shared_width(config) -> int:
    """Qwen2-MoE always has a shared expert: ours, or a width-1 placeholder of zeros."""
    return config.moe.n_shared_experts * config.moe.expert_ffn_dim or 1


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
            if architecture == "Qwen2MoeForCausalLM" and our_name != "wo":
                rows = weights[f"{ours}.attention.{our_name}.weight"].shape[0]
                out[f"{hf}.self_attn.{hf_name}.bias"] = torch.zeros(rows, dtype=weights["norm.weight"].dtype)
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
        dtype = router.dtype
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


def from_hf_weights(tensors: dict, config, architecture: str, source: str) -> dict:
    """The exported tensors -> our state dict (UserError when something does not map exactly)."""
    import torch

    def take(name: str):
        if name not in tensors:
            raise UserError(f"{source}: weight {name} is missing")
        return tensors[name]

    weights = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not config.tie_embeddings:
        weights["output.weight"] = take("lm_head.weight")
    for layer in range(config.n_layers):
        ours, hf = f"layers.{layer}", f"model.layers.{layer}"
        weights[f"{ours}.attention_norm.weight"] = take(f"{hf}.input_layernorm.weight")
        weights[f"{ours}.ffn_norm.weight"] = take(f"{hf}.post_attention_layernorm.weight")
        for our_name, hf_name in _ATTENTION.items():
            weights[f"{ours}.attention.{our_name}.weight"] = take(f"{hf}.self_attn.{hf_name}.weight")
            bias = tensors.get(f"{hf}.self_attn.{hf_name}.bias")
            if bias is not None and bool(bias.ne(0).any()):
                raise UserError(f"{source}: {hf}.self_attn.{hf_name}.bias is not zero; gonogo's attention has no biases")
        if not config.is_moe_layer(layer):
            for our_name, hf_name in _MLP.items():
                weights[f"{ours}.feed_forward.{our_name}.weight"] = take(f"{hf}.mlp.{hf_name}.weight")
            continue
        n_experts = config.moe.n_experts
        if architecture == "MixtralForCausalLM":
            weights[f"{ours}.moe.router.weight"] = take(f"{hf}.block_sparse_moe.gate.weight")
            for name in ("w1", "w2", "w3"):
                weights[f"{ours}.moe.experts.{name}"] = torch.stack(
                    [take(f"{hf}.block_sparse_moe.experts.{e}.{name}.weight") for e in range(n_experts)])
        else:
            weights[f"{ours}.moe.router.weight"] = take(f"{hf}.mlp.gate.weight")
            for name, hf_name in _MLP.items():
                weights[f"{ours}.moe.experts.{name}"] = torch.stack(
                    [take(f"{hf}.mlp.experts.{e}.{hf_name}.weight") for e in range(n_experts)])
            if bool(take(f"{hf}.mlp.shared_expert_gate.weight").ne(0).any()):
                raise UserError(f"{source}: {hf}.mlp.shared_expert_gate.weight is not zero: an input-dependent "
                                "shared-expert gate has no counterpart in gonogo's MoE")
            if config.moe.n_shared_experts:
                for name, hf_name in _MLP.items():
                    tensor = take(f"{hf}.mlp.shared_expert.{hf_name}.weight")
                    weights[f"{ours}.moe.shared_expert.{name}.weight"] = tensor / 2 if name == "w2" else tensor
        weights[f"{ours}.moe.expert_bias"] = torch.zeros(n_experts, dtype=torch.float32)
    return weights


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
    if meta.get("tokenizer", "byte-v1") != "byte-v1":
        raise UserError(f"{checkpoint}: tokenizer {meta.get('tokenizer')!r} cannot be exported (only byte-v1)")
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    architecture = choose_architecture(config, weights)
    torch_dtype = getattr(torch, dtype)
    tensors = {name: tensor.to(torch_dtype).contiguous().clone()
               for name, tensor in to_hf_weights(weights, config, architecture).items()}

    temporary = out.with_name(f".tmp-{out.name}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    save_file(tensors, str(temporary / WEIGHTS_NAME), metadata={"format": "pt"})
    config_json = hf_config(config, architecture, dtype)
    if meta.get("step") is not None:
        config_json["gonogo"]["step"] = meta["step"]
    _write_json(temporary / "config.json", config_json)
    tokenizer = ByteTokenizer()
    _write_json(temporary / "generation_config.json", {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": [tokenizer.eos_id, tokenizer.end_id],  # <|end|> closes a chat turn
        "pad_token_id": tokenizer.pad_id,
    })
    tokenizer.save_hf(temporary)
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary.rename(out)
    log.info("exported %s as %s to %s", checkpoint, architecture, out)
    return out


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


# -- import --------------------------------------------------------------------------------------

def _model_config_from_hf(hf: dict, source: str):
    """Our ModelConfig from a Llama / Mixtral / Qwen2-MoE config.json (UserError when it does not map)."""
    from gonogo.config import validate
    from gonogo.model.config import ModelConfig

    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in ARCHITECTURES:
        raise UserError(f"{source}: architecture {architecture!r} cannot be imported; "
                        f"supported: {', '.join(ARCHITECTURES)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"{source}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise UserError(f"{source}: head_dim {head_dim} × {hf['num_attention_heads']} heads != hidden_size "
                        f"{hf['hidden_size']}; gonogo's decoder needs them equal")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{source}: attention or MLP biases are not supported by gonogo's decoder")
    saved = (hf.get("gonogo") or {}).get("model") or {}
    fields = {
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"],
        "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_dim": hf["intermediate_size"], "max_seq_len": hf["max_position_embeddings"],
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "norm_eps": hf["rms_norm_eps"], "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    saved_moe = saved.get("moe") or {}
    training_only = {key: saved_moe[key] for key in ("aux_loss_coef", "bias_update_rate") if key in saved_moe}
    if architecture == "MixtralForCausalLM":
        fields["ffn_dim"] = saved.get("ffn_dim", hf["intermediate_size"])  # unused: every layer is MoE
        fields["moe"] = {"n_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"],
                         "expert_ffn_dim": hf["intermediate_size"], "route_norm": True, **training_only}
    elif architecture == "Qwen2MoeForCausalLM":
        fields["moe"] = _qwen2_moe_fields(hf, source, training_only)
    return architecture, validate(ModelConfig, fields, source=source)


def _qwen2_moe_fields(hf: dict, source: str, training_only: dict) -> dict:
    n_layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    moe_layers = [layer for layer in range(n_layers) if layer not in dense and (layer + 1) % step == 0]
    if not moe_layers:
        raise UserError(f"{source}: no layer is MoE; export it as a Llama model instead")
    # gonogo's pattern: every `every` layers from `first`
    first = moe_layers[0]
    every = moe_layers[1] - moe_layers[0] if len(moe_layers) > 1 else n_layers
    if moe_layers != list(range(first, n_layers, every)):
        raise UserError(f"{source}: MoE layers {moe_layers} do not follow gonogo's pattern "
                        "(the first k layers dense, then every n-th layer MoE)")
    expert_width = hf["moe_intermediate_size"]
    shared_width = hf.get("shared_expert_intermediate_size", 0)
    if shared_width > 1 and shared_width % expert_width:
        raise UserError(f"{source}: shared_expert_intermediate_size {shared_width} is not a whole number of "
                        f"experts of moe_intermediate_size {expert_width}")
    return {"n_experts": hf["num_experts"], "top_k": hf["num_experts_per_tok"], "expert_ffn_dim": expert_width,
            "route_norm": bool(hf.get("norm_topk_prob", False)), "first_dense_layers": first,
            "every_n_layers": every, "n_shared_experts": shared_width // expert_width if shared_width > 1 else 0,
            **training_only}


def _read_safetensors(directory: Path) -> dict:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint."""
    from safetensors.torch import load_file

    single = directory / WEIGHTS_NAME
    if single.is_file():
        return load_file(str(single), device="cpu")
    index = directory / f"{WEIGHTS_NAME}.index.json"
    if not index.is_file():
        raise UserError(f"{directory}: no model.safetensors (pickled .bin weights are never loaded)")
    shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    tensors: dict = {}
    for shard in shards:
        tensors.update(load_file(str(directory / shard), device="cpu"))
    return tensors


def _tokenizer_name(directory: Path) -> Optional[str]:
    """'byte-v1' when the directory's tokenizer.json is gonogo's byte tokenizer."""
    from gonogo.data.tokenizer import ByteTokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = ByteTokenizer()
    return tokenizer.name if json.loads(path.read_text(encoding="utf-8")) == tokenizer.hf_tokenizer_json() else "other"


def load_hf_dir(path: str | Path):
    """-> (Decoder in eval mode on CPU in fp32, ModelConfig, meta) from a Hugging Face directory."""
    import torch

    from gonogo.model.decoder import Decoder

    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json; not a Hugging Face model directory")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    architecture, config = _model_config_from_hf(hf, str(config_path))
    tensors = _read_safetensors(directory)
    weights = from_hf_weights(tensors, config, architecture, str(directory))
    if architecture == "Qwen2MoeForCausalLM" and config.moe.n_shared_experts == 0:
        for name, tensor in tensors.items():
            if ".mlp.shared_expert." in name and bool(tensor.ne(0).any()):
                raise UserError(f"{directory}: {name} is not zero, but its width is not a whole number of "
                                f"experts of {config.moe.expert_ffn_dim}")
    model = Decoder(config)
    missing, unexpected = model.load_state_dict({name: tensor.float() for name, tensor in weights.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)  # from_hf_weights names every parameter
    saved = hf.get("gonogo") or {}
    meta = {"step": saved.get("step"), "model": config.model_dump(mode="json"),
            "tokenizer": _tokenizer_name(directory), "world_size": 1, "train": {},
            "source": {"format": "huggingface", "architecture": architecture, "path": str(directory)}}
    return model.to(dtype=torch.float32).eval(), config, meta


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
