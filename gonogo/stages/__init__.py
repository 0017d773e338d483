"""The registry of stage kinds: the one list both plans and the command line read.

Each kind is a module defining ``STAGE`` (a StageKind). A kind with a one-line help is also a
command, ``gonogo <kind>``, whose flags come from its settings (gonogo.stage_cli); a kind
without one runs only inside a plan. Modules are imported lazily so the CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Optional

from gonogo.errors import UserError

if TYPE_CHECKING:  # the registry itself imports nothing heavy: `gonogo --help` stays instant
    from gonogo.stages.base import StageKind

# kind -> (module defining STAGE, the help of `gonogo <kind>` or None when it has no command)
KINDS: dict[str, tuple[str, Optional[str]]] = {
    "command": ("gonogo.stages.command.stage", None),
    "doctor": ("gonogo.stages.doctor.stage", "inventory and health: devices, versions, GPU health, storage speed"),
    "collectives": ("gonogo.stages.collectives.stage",
                    "nccl-tests-style bandwidth and correctness table via torch.distributed"),
    "train": ("gonogo.stages.train.stage",
              "distributed pretraining (FSDP2 / DDP / expert parallel) with torchrun, metrics, MFU, MLPerf log"),
    "drill": ("gonogo.stages.drill.stage",
              "fault drills (kill, hang, straggler, nan, torn/corrupt checkpoint, canary) beside a fault-free twin"),
    "memory": ("gonogo.stages.memory.stage", None),
    "scale": ("gonogo.stages.scale.stage",
              "the same training job at several process counts: strong and weak scaling efficiency"),
    "finetune": ("gonogo.stages.finetune.stage",
                 "supervised finetuning (SFT) of a pretrained checkpoint on chats; loss on the assistant's tokens"),
    "eval": ("gonogo.stages.eval.stage",
             "reasoning eval on held-out tasks: accuracy, maj@k, pass@k, best-of-N, per task family"),
    "capacity": ("gonogo.stages.capacity.stage",
                 "estimate memory, step time, time-to-train, GPU-hours and cost at large scale"),
    "serve": ("gonogo.stages.serve.stage",
              "OpenAI-compatible server (completions, chat, streaming) for a checkpoint"),
    "loadtest": ("gonogo.stages.loadtest.stage",
                 "load test an OpenAI-compatible server: TTFT/TPOT/ITL/E2EL percentiles, goodput"),
    "quantize": ("gonogo.stages.quantize.stage",
                 "FP8 / NVFP4 weight quantization of a checkpoint: bytes, val loss and accuracy against bf16"),
    "canary": ("gonogo.stages.canary.stage",
               "staged canary rollout with metric and quality checks and automatic rollback"),
    "soak": ("gonogo.stages.soak.stage",
             "training held for a wall-clock window: checkpoint drift, utilisation per window, loss probes, "
             "memory, retention"),
    "autoscale": ("gonogo.stages.autoscale.stage", None),
}

_loaded: dict[str, "StageKind"] = {}


def kind_names() -> list[str]:
    return sorted(KINDS)


def command_help() -> dict[str, str]:
    """The kinds that are commands, with their one-line help (no module imported)."""
    return {name: help_text for name, (_, help_text) in KINDS.items() if help_text is not None}


def get_kind(name: str) -> "StageKind":
    if name not in KINDS:
        raise UserError(f"unknown stage kind {name!r}; known kinds: {', '.join(kind_names())}")
    if name not in _loaded:
        stage = importlib.import_module(KINDS[name][0]).STAGE
        assert stage.name == name, f"{KINDS[name][0]} defines kind {stage.name!r}, registered as {name!r}"
        _loaded[name] = stage
    return _loaded[name]
