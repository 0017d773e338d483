"""Helpers of the eval tests (imported as tests.eval.eval_helpers)."""

from __future__ import annotations

import json
from pathlib import Path



def write_checkpoint(directory: Path, seed: int = 1, chat: bool = False) -> Path:
    import torch
    from safetensors.torch import save_file

    from gonogo.model.shape import ModelConfig
    from gonogo.model.decoder import Decoder
    from gonogo.checkpoints import manifest

    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=160)
    model = Decoder(config)
    model.init_weights(seed)
    with torch.no_grad():  # larger weights: varied tokens instead of one repeated token
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.mul_(8.0)
    directory.mkdir(parents=True)
    save_file({name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()},
              str(directory / "model.safetensors"))
    meta = {"step": 10, "model": config.model_dump(), "tokenizer": "byte-v1", "world_size": 1, "train": {},
            "data": {"format": "chat" if chat else "text"}}
    (directory / "meta.json").write_text(json.dumps(meta))
    manifest.commit(directory)
    return directory
