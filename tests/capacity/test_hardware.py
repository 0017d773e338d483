"""The hardware table: every entry complete, dense figures, sources cited."""

import pytest

from gonogo.capacity.hardware import get_gpu, gpu_names, load_table, this_machine
from gonogo.errors import UserError


def test_required_kinds_are_in_the_table():
    assert {"h100", "h200", "b200", "gb200", "gb300"} <= set(gpu_names())


def test_entries_are_complete_and_cited():
    for key, spec in load_table().items():
        assert spec.sources, key
        assert spec.peak_tflops["bf16"] > 0 and spec.hbm_GB > 0 and spec.nvlink_domain >= 8, key
        # dense FP8 is twice dense BF16 on every listed part (sparse figures would break this too)
        assert spec.peak_tflops["fp8"] == pytest.approx(2 * spec.peak_tflops["bf16"], rel=0.01), key


def test_dense_figures_not_sparse():
    assert get_gpu("h100").peak_tflops["bf16"] == pytest.approx(989.4)
    assert get_gpu("GB200-NVL72").nvlink_domain == 72     # alias, any case
    assert "nvfp4" not in get_gpu("h200").peak_tflops


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(UserError, match="known: b200, gb200"):
        get_gpu("tpu-v5")


def test_this_machine_uses_measured_links():
    spec = this_machine(peak_flops=2e12, memory_GB=8, busbw_GBps=1.4, devices=2)
    assert spec.measured_links and spec.nvlink_domain == 2 and spec.peak_flops("bf16") == 2e12
