"""The Hugging Face checkpoint format, read side: a Hugging Face directory (``config.json`` +
safetensors, single file or sharded) imported into gonogo's Decoder.

``load_hf_dir`` accepts any Llama, Mistral, Qwen2/3, Mixtral or Qwen2/3-MoE directory whose
features map onto our decoder, and gonogo's own exports (``gonogo.export.hf`` writes them, with a
``gonogo`` entry in config.json that restores the training-only settings). Safetensors only: no
pickle is ever loaded. The weight-name maps shared with the export live here, so the export
imports this module and never the other way round.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from gonogo.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
ATTENTION_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
MLP_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


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
    from gonogo.typed_config import validate
    from gonogo.model.shape import ModelConfig

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
        for our_name, hf_name in ATTENTION_NAMES.items():
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
            for our_name, hf_name in MLP_NAMES.items():
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
            for name, hf_name in MLP_NAMES.items():
                names[f"{hf}.mlp.experts.{expert}.{hf_name}.weight"] = _Target(f"{ours}.moe.experts.{name}", expert)
        if architecture != "Qwen2MoeForCausalLM":
            continue
        if moe.shared_expert_gate:
            names[f"{hf}.mlp.shared_expert_gate.weight"] = _Target(f"{ours}.moe.shared_expert_gate.weight")
        else:  # gonogo's own export: a zero gate (x 0.5) and a doubled down projection
            names[f"{hf}.mlp.shared_expert_gate.weight"] = _Target(None, kind="zero")
        for name, hf_name in MLP_NAMES.items():
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


def tokenizer_name(directory: Path) -> Optional[str]:
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
    tensors lie inside the file (a truncated download) and have the shapes config.json gives them:
    reads the headers only, so a parent process can refuse a damaged model in one line before its
    workers start (or before a command creates its run directory)."""
    import torch

    from gonogo.model.decoder import Decoder

    directory = Path(path)
    architecture, config, own_export = _model_config_from_hf(_read_config(directory), str(directory / "config.json"))
    with torch.device("meta"):  # the shapes, without memory
        parameters = dict(Decoder(config).named_parameters())
    names = _import_names(config, architecture, own_export)
    for weights in _weight_files(directory):
        with _SafetensorsFile(weights) as reader:
            for key in reader.names():
                target = names.get(key)
                if target is not None and target.kind != "zero":
                    _check_shape(reader, target, key, parameters, str(directory))


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
    tokenizer = tokenizer_name(directory) or (hf.get("gonogo") or {}).get("tokenizer")
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
    destination = _check_shape(reader, target, key, parameters, source)
    if target.kind == "copy" and reader.read_into(key, destination):
        return  # read straight into the parameter's memory: no copy of the tensor at all
    tensor = reader.read(key)
    destination.copy_(tensor / 2 if target.kind == "half" else tensor)


def _check_shape(reader: "_SafetensorsFile", target: _Target, key: str, parameters: dict, source: str):
    """The parameter (or expert's slice) ``key`` goes into; UserError when the shapes differ."""
    parameter = parameters[target.name]
    destination = parameter[target.expert] if target.expert is not None else parameter
    shape = reader.shape(key)
    if shape != tuple(destination.shape):
        raise UserError(f"{source}: {key} has shape {list(shape)}, the config says {list(destination.shape)}")
    return destination


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
            self._read_exactly(name, tensor.view(-1).view(torch.uint8).numpy().data)
        return tensor


# -- the command -------------------------------------------------------------------------------------
