"""FP8 E4M3 and NVFP4 numerics against hand-computed cases, packing, byte counts, error bounds."""

from __future__ import annotations

import pytest
import torch

from gonogo.errors import UserError
from gonogo.checkpoints.quantized import (
    E2M1_GRID, QuantizedModel, QuantizedTensor, e2m1_decode, e2m1_encode, is_quantized_weight,
    load_quantized, pack_nibbles, quantize_fp8, quantize_nvfp4, to_e4m3, unpack_nibbles)


def e2m1_round(values: list[float]) -> list[float]:
    return e2m1_decode(e2m1_encode(torch.tensor(values))).tolist()


# -- E2M1 -------------------------------------------------------------------------------------------

def test_e2m1_represents_exactly_its_grid_with_sign():
    grid = list(E2M1_GRID)
    assert e2m1_round(grid) == grid
    assert e2m1_round([-v for v in grid[1:]]) == [-v for v in grid[1:]]
    # codes 0..7 are the magnitudes in order, bit 3 is the sign
    assert e2m1_encode(torch.tensor(grid)).tolist() == list(range(8))
    assert e2m1_encode(torch.tensor([-0.5, -6.0])).tolist() == [9, 15]


def test_e2m1_rounds_to_nearest_with_ties_to_even_code():
    # ties go to the code with mantissa bit 0: 0 (code 0), 1 (2), 2 (4), 4 (6)
    assert e2m1_round([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_round([-2.5, -5.0]) == [-2.0, -4.0]
    # off the ties: plain nearest
    assert e2m1_round([0.26, 0.74, 2.51, 4.9, 5.1]) == [0.5, 0.5, 3.0, 4.0, 6.0]


def test_e2m1_saturates_at_six():
    assert e2m1_round([6.4, 100.0, -7.0]) == [6.0, 6.0, -6.0]


# -- E4M3 -------------------------------------------------------------------------------------------

def test_e4m3_max_is_448_and_it_saturates():
    assert to_e4m3(torch.tensor([448.0, 500.0, -1e6, 464.0])).float().tolist() == [448.0, 448.0, -448.0, 448.0]
    # the largest finite float8_e4m3fn is 448: its next step (480) does not exist
    assert torch.finfo(torch.float8_e4m3fn).max == 448.0


def test_e4m3_rounds_to_nearest_even():
    # in [1, 2) the step is 1/8: 1.0625 is a tie between 1.0 (even) and 1.125 (odd)
    assert to_e4m3(torch.tensor([1.0625, 1.1875, 1.07])).float().tolist() == [1.0, 1.25, 1.125]


# -- packing -------------------------------------------------------------------------------------

def test_pack_puts_the_even_element_in_the_low_nibble_and_round_trips():
    codes = torch.tensor([[0x1, 0xF, 0x8, 0x7]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0xF1, 0x78]]
    assert torch.equal(unpack_nibbles(packed), codes)
    every = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_nibbles(pack_nibbles(every)), every)


# -- NVFP4 scale selection ----------------------------------------------------------------------

def test_nvfp4_scales_follow_the_two_level_scheme():
    # two rows of one block each: row 0 has the matrix max (12), row 1 a max of 3
    weight = torch.zeros(2, 16)
    weight[0, :4] = torch.tensor([12.0, -6.0, 1.0, 3.0])
    weight[1, :3] = torch.tensor([3.0, 1.5, -0.75])
    q = quantize_nvfp4(weight)
    tensor_scale = 12.0 / (448 * 6)
    assert q.tensor_scale.item() == pytest.approx(tensor_scale, rel=1e-7)
    # block scales: 12/(6·ts) = 448 exactly; 3/(6·ts) = 112 (representable in E4M3)
    assert q.scale.float().flatten().tolist() == [448.0, 112.0]
    values = e2m1_decode(unpack_nibbles(q.data))
    # each block's max maps to the grid's end, 6 · scale
    assert values[0, 0].item() == 6.0 and values[1, 0].item() == 6.0
    assert values[0, :4].tolist() == [6.0, -3.0, 0.5, 1.5]
    assert values[1, :3].tolist() == [6.0, 3.0, -1.5]
    assert torch.allclose(q.dequantize(), weight, rtol=1e-6, atol=0)  # all on the grid here


def test_nvfp4_block_scale_is_rounded_to_e4m3():
    weight = torch.zeros(2, 16)
    weight[0, 0] = 6.0 * 448  # matrix amax 2688 → tensor scale 1.0
    weight[1, 0] = 6.0 * 13.3  # wants block scale 13.3 → E4M3 13.0 (step 1 in [8, 16))
    q = quantize_nvfp4(weight)
    assert q.tensor_scale.item() == pytest.approx(1.0)
    assert q.scale.float().flatten().tolist() == [448.0, 13.0]
    # 79.8 / 13 = 6.14: the rounded-down scale pushes the max past 6, and E2M1 saturates
    assert q.dequantize()[1, 0].item() == pytest.approx(78.0)


def test_nvfp4_zero_blocks_and_zero_matrix():
    assert torch.equal(quantize_nvfp4(torch.zeros(4, 32)).dequantize(), torch.zeros(4, 32))
    weight = torch.zeros(1, 32)
    weight[0, 20] = -1.0
    assert torch.equal(quantize_nvfp4(weight).dequantize(), weight)


def test_nvfp4_needs_input_dim_multiple_of_16():
    with pytest.raises(UserError, match="multiple of 16"):
        quantize_nvfp4(torch.ones(4, 24), "layers.0.attention.wq.weight")


def test_stacked_experts_get_one_tensor_scale_each():
    weight = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(1))
    weight[1] *= 100
    q = quantize_nvfp4(weight)
    assert q.tensor_scale.shape == (3,)
    expected = weight.abs().amax(dim=(1, 2)) / (448 * 6)
    assert torch.allclose(q.tensor_scale, expected)
    assert q.dequantize().shape == weight.shape


# -- byte counts -----------------------------------------------------------------------------------

def test_byte_counts_of_a_4096_square_weight():
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(2))
    nvfp4 = quantize_nvfp4(weight)
    MiB = 1 << 20
    assert nvfp4.data.numel() * nvfp4.data.element_size() == 8 * MiB
    assert nvfp4.scale.numel() * nvfp4.scale.element_size() == 1 * MiB
    assert nvfp4.nbytes == 9 * MiB + 4
    fp8 = quantize_fp8(weight)
    assert fp8.nbytes == 16 * MiB + 4096 * 4
    assert nvfp4.bf16_nbytes == 32 * MiB


# -- error bounds ---------------------------------------------------------------------------------

def test_nvfp4_dequantized_error_bound():
    """Per element, the error is at most half the grid step at that magnitude, times the block's
    scale; the largest half-step is 1 (between 4 and 6). Saturation after an E4M3 rounding of the
    scale (at most 1/16 relative) stays within that too."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    q = quantize_nvfp4(weight)
    effective = (q.scale.float() * q.tensor_scale).repeat_interleave(16, dim=-1)
    error = (q.dequantize() - weight).abs()
    scaled = weight.abs() / effective
    half_step = torch.where(scaled <= 2, 0.25, torch.where(scaled <= 4, 0.5, 1.0))
    assert (error <= half_step * effective * (1 + 1e-6)).all()
    relative = error.norm() / weight.norm()
    assert 0.02 < relative < 0.15  # 4 bits: a few percent, not zero, not garbage


def test_fp8_dequantized_error_bound_and_row_scales():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    weight[5] *= 1000  # one large row must not hurt the others: scales are per row
    q = quantize_fp8(weight)
    assert torch.allclose(q.scale, weight.abs().amax(dim=1) / 448)
    # each row's max maps to 448 exactly
    assert (q.data.float().abs().amax(dim=1) == 448).all()
    error = (q.dequantize() - weight).abs()
    # 3 mantissa bits: relative error ≤ 2^-4 for normal values; subnormals: ≤ 2^-10 · scale
    bound = torch.maximum(weight.abs() * 2**-4, q.scale[:, None] * 2**-10)
    assert (error <= bound * (1 + 1e-6)).all()
    assert (error.norm(dim=1) / weight.norm(dim=1)).max() < 0.04


def test_stored_parts_are_checked_on_load():
    q = quantize_fp8(torch.ones(4, 16))
    stored = q.stored("w")
    stored["w_scale"] = stored["w_scale"].double()
    with pytest.raises(UserError, match="expected torch.float32"):
        QuantizedTensor.from_stored("w", "fp8", [4, 16], stored)


# -- which weights -----------------------------------------------------------------------------------

def test_linear_weights_are_quantized_and_the_rest_kept():
    for name in ("layers.0.attention.wq.weight", "layers.3.feed_forward.w2.weight",
                 "layers.1.moe.experts.w1", "layers.1.moe.shared_expert.w3.weight"):
        assert is_quantized_weight(name), name
    for name in ("tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.attention_norm.weight",
                 "layers.1.moe.router.weight", "layers.1.moe.expert_bias"):
        assert not is_quantized_weight(name), name


@pytest.mark.parametrize("format", ["fp8", "nvfp4"])
@pytest.mark.parametrize("moe", [False, True])
def test_save_load_round_trip_gives_the_same_decoder(tmp_path, format, moe):
    from tests.infer.conftest import tiny_model

    model = tiny_model(moe=moe)
    quantized = QuantizedModel.from_model(model, format, meta={"step": 10, "tokenizer": "byte-v1"})
    directory = quantized.save(tmp_path / "q")
    loaded, config, meta = load_quantized(directory)
    assert config == model.config and meta["quantization"]["format"] == format
    expected = quantized.to_decoder()
    for (name, a), (_, b) in zip(expected.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, emulated = model(tokens), loaded(tokens)
    # close to the original, but not equal: the weights really went through the format
    assert not torch.equal(reference, emulated)
    # this test model's weights are scaled up (peaked logits), which amplifies weight errors
    relative = ((emulated - reference).norm() / reference.norm()).item()
    assert relative < (0.2 if format == "fp8" else 0.6)
    # the bytes on disk are the format's: quantized part ≈ 1/2 (fp8) or ≈ 0.28 (nvfp4) of bf16
    counts = quantized.byte_counts()
    ratio = counts["quantized_bf16_bytes"] / counts["quantized_bytes"]
    assert (1.8 < ratio < 2.0) if format == "fp8" else (3.4 < ratio < 3.6)  # scales cost a little
    size = (directory / "model.quantized.safetensors").stat().st_size
    assert counts["total_bytes"] < size < counts["total_bytes"] + 16_384  # + the safetensors header


def test_save_refuses_a_non_empty_directory(tmp_path):
    from tests.infer.conftest import tiny_model

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        QuantizedModel.from_model(tiny_model(), "fp8").save(tmp_path / "q")
