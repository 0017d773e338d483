from __future__ import annotations

import math

import pytest

from gonogo.errors import UserError
from gonogo.train.config import TrainSettings, gradient_accumulation, load_train_config, overrides_list
from gonogo.train.loop import lr_factor
from gonogo.typed_config import CONFIGS_DIR


def test_presets_load_and_tiny_moe_splits_experts_over_two_ranks():
    dense, _ = load_train_config("tiny-dense")
    assert (dense.model.n_layers, dense.model.d_model, dense.train.seq_len) == (4, 128, 256)
    assert dense.data.source == "synthetic"
    moe, _ = load_train_config("tiny-moe")
    assert moe.model.moe.n_experts == 8 and moe.model.moe.top_k == 2 and moe.train.expert_parallel == 2
    assert all(moe.model.is_moe_layer(i) for i in range(moe.model.n_layers))
    small, _ = load_train_config("small-dense")
    assert small.model.d_model == 512
    assert (CONFIGS_DIR / "tiny-dense.toml").is_file()


def test_deterministic_means_fp32_and_overrides_apply():
    config, _ = load_train_config("tiny-dense", ["train.steps=7", "train.precision=\"bf16\""], deterministic=True)
    assert config.train.steps == 7
    assert config.train.deterministic and config.train.precision == "fp32"


def test_compile_is_off_by_default_and_for_dense_models_only():
    dense, _ = load_train_config("tiny-dense")
    assert dense.train.compile is False  # the presets train eager: the plan's gates were calibrated on it
    assert load_train_config("tiny-dense", ["train.compile=true"])[0].train.compile is True
    with pytest.raises(UserError) as error:
        load_train_config("tiny-moe", ["train.compile=true"])
    # one line naming the problem and the fix, not the whole config as the "bad value"
    assert str(error.value).endswith("tiny-moe.toml: train.compile=true supports dense models only (an MoE "
                                     "layer's routing has data-dependent shapes that would recompile); set "
                                     "train.compile=false")


def test_plan_overrides_table_becomes_key_value_strings():
    items = overrides_list({"train": {"steps": 5, "parallel": "ddp", "deterministic": True}, "model": {"d_model": 64}})
    assert items == ["train.steps=5", 'train.parallel="ddp"', "train.deterministic=true", "model.d_model=64"]
    config, _ = load_train_config("tiny-dense", items)
    assert config.train.parallel == "ddp" and config.model.d_model == 64 and config.train.steps == 5
    assert overrides_list(["a=1"]) == ["a=1"] and overrides_list(None) == []


def test_gradient_accumulation_fills_the_global_batch():
    settings = TrainSettings(global_batch_size=32, micro_batch_size=4)
    assert gradient_accumulation(settings, 2) == 4
    assert gradient_accumulation(settings, 8) == 1


def test_learning_rate_warms_up_then_decays_to_min_lr():
    settings = TrainSettings(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    factors = [lr_factor(step, settings) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # non-increasing after warmup
    assert lr_factor(100, settings) == pytest.approx(0.1)  # ends at min_lr / lr
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
