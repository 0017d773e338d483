"""Loading a checkpoint's model, one loader per checkpoint format, registered here.

``load_on_cpu(ref_or_path)`` takes a ``CheckpointRef`` (already verified by ``resolve``:
nothing is hashed again) or a path (resolved, and so verified, first) and returns
``(Decoder in eval mode on the CPU in fp32, ModelConfig, meta dict)``; inference places it on
its device with ``gonogo.infer.device.load_for_inference``. The format decides the loader
(``LOADERS``):

- ``gonogo``: meta.json + model.safetensors, or, for a checkpoint saved without consolidated
  weights (an intermediate training save), the model part of its DCP shards (their ``.metadata``
  pickle is read only because the manifest that lists it was verified);
- ``quantized``: ``gonogo.checkpoints.quantized`` (dequantized to fp32 on the CPU);
- ``hf``: ``gonogo.checkpoints.hf_import.load_hf_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from gonogo.checkpoints import manifest
from gonogo.checkpoints.reference import CheckpointRef, resolve
from gonogo.errors import UserError


def read_dcp_model_weights(directory: Path) -> dict:
    """The model's full weights read back from a finished DCP checkpoint (``<step>/dcp``), in
    this process only (no process group). Keys as saved, without the ``model.`` prefix."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from gonogo.checkpoints.dcp_filesystem import DirectReader

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        metadata = dcp.FileSystemReader(str(directory)).read_metadata()
        weights = {key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
                   for key, item in metadata.state_dict_metadata.items()
                   if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
        state = {"model": weights}
        dcp.load(state, checkpoint_id=str(directory), storage_reader=DirectReader(directory), no_dist=True)
    return state["model"]


def model_weights(ref: CheckpointRef) -> dict:
    """A gonogo checkpoint's full model weights under the decoder's names (LoRA adapters merged)."""
    from safetensors.torch import load_file

    if ref.has_consolidated_weights:
        return load_file(str(ref.path / manifest.WEIGHTS_NAME), device="cpu")
    if not (ref.path / "dcp").is_dir():
        raise UserError(f"{ref.path}: has neither {manifest.WEIGHTS_NAME} nor dcp/ "
                        "(a quantized checkpoint is read by gonogo.checkpoints.quantized)")
    from gonogo.checkpoints import adapters

    weights = read_dcp_model_weights(ref.path / "dcp")
    if adapters.is_lora_state(weights):
        train = ref.meta.get("train") or {}
        weights, _ = adapters.merge(weights, train["lora_rank"], train["lora_alpha"])
    return weights


def _load_gonogo(ref: CheckpointRef):
    import torch

    from gonogo.typed_config import validate
    from gonogo.model.shape import ModelConfig
    from gonogo.model.decoder import Decoder

    config = validate(ModelConfig, ref.meta["model"], source=str(ref.path / manifest.META_NAME))
    model = Decoder(config)
    weights = {name: tensor.float() if tensor.is_floating_point() else tensor
               for name, tensor in model_weights(ref).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"{ref.path}: weights do not fit the model in meta.json "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device="cpu", dtype=torch.float32).eval(), config, dict(ref.meta)


def _load_quantized(ref: CheckpointRef):
    from gonogo.checkpoints.quantized import load_quantized

    return load_quantized(ref)


def _load_hf(ref: CheckpointRef):
    import torch

    from gonogo.checkpoints.hf_import import load_hf_dir
    from gonogo.files import unreadable_input

    with unreadable_input(ref.path):  # no manifest vouches for it: a damaged export is one line
        return load_hf_dir(ref.path, device="cpu", dtype=torch.float32)


# format -> loader of (Decoder in eval mode on the CPU in fp32, ModelConfig, meta dict)
LOADERS: dict[str, Callable[[CheckpointRef], tuple]] = {
    "gonogo": _load_gonogo,
    "quantized": _load_quantized,
    "hf": _load_hf,
}


def load_on_cpu(checkpoint: "CheckpointRef | str | Path"):
    """(Decoder in eval mode on CPU in fp32, ModelConfig, meta dict)."""
    ref = resolve(checkpoint)
    return LOADERS[ref.format](ref)


__all__ = ["LOADERS", "load_on_cpu", "model_weights", "read_dcp_model_weights"]
