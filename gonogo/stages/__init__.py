"""The registry of stage kinds. Each kind lives with the code it drives; this file only lists them."""

from __future__ import annotations

import importlib

from gonogo.errors import UserError
from gonogo.stages.base import StageKind

# module paths, each defining STAGE (a StageKind); imported lazily so the CLI starts fast
_KIND_MODULES = {
    "command": "gonogo.stages.command",
    "doctor": "gonogo.cluster.doctor",
    "collectives": "gonogo.cluster.collectives",
    "train": "gonogo.train.stage",
    "drill": "gonogo.drills.stage",
    "memory": "gonogo.train.memory",
    "scale": "gonogo.train.scale",
    "finetune": "gonogo.train.finetune",
    "eval": "gonogo.eval.stage",
    "capacity": "gonogo.capacity.stage",
    "serve": "gonogo.infer.serve_stage",
    "loadtest": "gonogo.infer.loadgen",
    "quantize": "gonogo.infer.quantize_stage",
    "canary": "gonogo.rollout.stage",
    "soak": "gonogo.train.soak",
    "autoscale": "gonogo.rollout.autoscale",
}

_loaded: dict[str, StageKind] = {}


def kind_names() -> list[str]:
    return sorted(_KIND_MODULES)


def get_kind(name: str) -> StageKind:
    if name not in _KIND_MODULES:
        raise UserError(f"unknown stage kind {name!r}; known kinds: {', '.join(kind_names())}")
    if name not in _loaded:
        module = importlib.import_module(_KIND_MODULES[name])
        _loaded[name] = module.STAGE
    return _loaded[name]
