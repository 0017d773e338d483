"""LoRA adapters in a checkpoint's weights: detecting them and merging them into the base weights.

A LoRA run's sharded state holds peft's names (``<module>.base_layer.weight``, ``.lora_A`` /
``.lora_B``); the consolidated ``model.safetensors`` holds the merged weights W + (alpha / r) · B·A
under the decoder's own names, and ``lora_adapters.safetensors`` the adapters alone. Injecting the
adapters for training is ``gonogo.train.lora``; this is the part the checkpoint format needs.
"""

from __future__ import annotations

from typing import Any

ADAPTERS_NAME = "lora_adapters.safetensors"
_BASE = ".base_layer."
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"


def is_lora_state(weights: dict) -> bool:
    return any(_BASE in name for name in weights)


def merge(weights: dict[str, Any], rank: int, alpha: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(merged weights under the decoder's own names, the adapters alone) of a LoRA state dict."""
    scale = alpha / rank
    merged, adapters = {}, {}
    for name, tensor in weights.items():
        if ".lora_" in name:
            adapters[name] = tensor
        elif _BASE in name:
            prefix, suffix = name.split(_BASE)
            own = f"{prefix}.{suffix}"
            if suffix == "weight" and f"{prefix}{_A}" in weights:
                down, up = weights[f"{prefix}{_A}"].float(), weights[f"{prefix}{_B}"].float()
                merged[own] = (tensor.float() + scale * (up @ down)).to(tensor.dtype)
            else:
                merged[own] = tensor
        else:
            merged[name] = tensor
    return merged, adapters
