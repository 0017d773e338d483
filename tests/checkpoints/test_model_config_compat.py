"""Checkpoints written before ModelConfig grew the imported-model fields still resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from gonogo.checkpoints.checkpointer import _check_same_model
from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig, MoEConfig


def test_fields_added_later_count_as_their_defaults():
    config = ModelConfig(moe=MoEConfig())
    older = config.model_dump(mode="json")
    for key in ("qkv_bias", "qk_norm", "attention_head_dim", "rope_scaling", "hf_architecture"):
        older.pop(key)
    for key in ("shared_expert_ffn_dim", "shared_expert_gate"):
        older["moe"].pop(key)
    _check_same_model(Path("ckpt"), older, config)  # no difference
    with pytest.raises(UserError, match="d_model: checkpoint 64, now 128"):
        _check_same_model(Path("ckpt"), {**older, "d_model": 64}, config)
    with pytest.raises(UserError, match="qkv_bias: checkpoint True, now False"):
        _check_same_model(Path("ckpt"), {**older, "qkv_bias": True}, config)
