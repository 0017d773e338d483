"""LoRA finetuning through ``peft``: low-rank adapters on the decoder's linear layers, base frozen.

``train.lora_rank > 0`` injects peft's LoRA layers into the named linear modules (default: every
attention and dense MLP projection the model has, of ``wq wk wv wo w1 w2 w3``; the stacked MoE
experts are not ``nn.Linear`` and stay frozen) after the initial weights are loaded, and freezes everything else,
so the optimizer holds (and FSDP2 reduces gradients for) the adapters only. The adapters start at
zero (peft initialises B to 0): step 0 computes exactly the base model.

A checkpoint keeps the adapters in its sharded state (resume continues them), and its consolidated
``model.safetensors`` holds the merged weights W + (alpha / r) · B·A under gonogo's own names, so
serve, eval, quantize and export read it like any checkpoint (export = merged adapters). The
adapters alone are written beside it as ``lora_adapters.safetensors`` (gonogo.checkpoints.adapters merges them).
"""

from __future__ import annotations

from typing import Optional


PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def add_lora(model, rank: int, alpha: float, targets: Optional[list[str]]):
    """Inject LoRA adapters into ``model`` (in place) and freeze every other parameter.

    ``targets`` None: every projection in PROJECTIONS that the model has; a Mixtral or Qwen3-MoE
    has no dense MLP, so its w1 w2 w3 exist only as stacked experts (not adapted)."""
    from peft import LoraConfig, inject_adapter_in_model

    from gonogo.errors import UserError

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if targets is None:
        targets = [name for name in PROJECTIONS if name in names]
    missing = sorted(set(targets) - names)
    if missing:
        raise UserError(f"train.lora_targets: no module named {missing[0]!r} in the model "
                        "(the decoder's linear layers are wq wk wv wo w1 w2 w3)")
    # peft annotates lora_alpha as int, but scales by alpha / r in float: a float alpha is kept as given
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",  # type: ignore[arg-type]
                        target_modules=list(targets))
    model = inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".lora_" in name
    return model
