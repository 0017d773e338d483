"""FP8 and NVFP4 weight quantization: the number formats, their packing, and a quantized model.

Two formats for the weights of the linear layers (attention wq/wk/wv/wo, the dense MLP's and
every expert's w1/w2/w3, the shared expert's):

- ``fp8``: FP8 E4M3 (max 448) with one fp32 scale per output row: ``scale = row_amax / 448``.
- ``nvfp4``: NVIDIA's two-level 4-bit format. Values are E2M1 (sign + the grid
  {0, 0.5, 1, 1.5, 2, 3, 4, 6}) in blocks of 16 along the input dimension; each block has an
  E4M3 scale and each weight matrix one fp32 scale: ``tensor_scale = amax / (448 · 6)``,
  ``block_scale = E4M3(block_amax / (6 · tensor_scale))``, ``value = E2M1(w / (block_scale ·
  tensor_scale))``, rounded to nearest, ties to even (the even code: the one whose mantissa bit
  is 0). So a block's largest weight maps to 6 · scale, the grid's end.

Everything else stays bf16: the embeddings and the output head (the most sensitive tensors, and
the embedding is a lookup, not a matmul), the norms, and the MoE router (tiny, and a rounding
there changes which expert a token goes to). This is the split that NVIDIA ModelOpt and vLLM's
FP8/NVFP4 checkpoints use. A stacked expert tensor [E, out, in] gets one tensor scale per expert:
each expert is its own linear layer.

This machine has no FP8/FP4 matmul, so the math is emulated: the weights are quantized, stored
packed (the bytes on disk are the real format's bytes: ``torch.float8_e4m3fn`` for FP8, two E2M1
codes per uint8 for NVFP4 with element 2j in the low nibble), and dequantized into an ordinary
``Decoder`` for inference. What this measures is the accuracy cost of the formats and their
size, not their speed.

A quantized checkpoint directory holds ``model.quantized.safetensors``, ``quantization.json``
(the format, and per tensor its shape and stored names), ``meta.json`` (the source checkpoint's,
with a ``quantization`` entry) and the usual ``manifest.json`` + ``COMMITTED``, so it verifies
like any checkpoint; ``load_quantized`` turns it back into a Decoder.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from gonogo.errors import UserError

if TYPE_CHECKING:
    from gonogo.checkpoints.reference import CheckpointRef

log = logging.getLogger(__name__)

FORMATS = ("fp8", "nvfp4")
E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7; bit 3 is the sign
NVFP4_BLOCK = 16
WEIGHTS_NAME = "model.quantized.safetensors"
FORMAT_NAME = "quantization.json"
KEPT_DTYPE = torch.bfloat16

# midpoints between neighbouring grid values: code i rounds up past boundary i
_E2M1_BOUNDARIES = tuple((low + high) / 2 for low, high in zip(E2M1_GRID, E2M1_GRID[1:]))

# the weights that get quantized (contract names of gonogo.model.decoder)
_QUANTIZED = re.compile(
    r"^layers\.\d+\.(attention\.w[qkvo]\.weight|feed_forward\.w[123]\.weight"
    r"|moe\.experts\.w[123]|moe\.shared_expert\.w[123]\.weight)$")


def is_quantized_weight(name: str) -> bool:
    return _QUANTIZED.match(name) is not None


# -- the number formats ----------------------------------------------------------------------------

def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 (``float8_e4m3fn``), saturating: beyond ±448 becomes ±448, not NaN.

    PyTorch's cast rounds to nearest even; it is the clamp that makes it saturate.
    """
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8 0..15, bit 3 = sign) of x, round to nearest, ties to even.

    Saturating: magnitudes beyond 6 become 6. "Even" is the code with mantissa bit 0, so 0.25 → 0,
    0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4.
    """
    assert torch.isfinite(x).all(), "E2M1 has no encoding for inf or NaN"
    magnitude = x.float().abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for lower_code, boundary in enumerate(_E2M1_BOUNDARIES):
        # a tie goes up only when the code above is even
        goes_up = (magnitude > boundary) | ((magnitude == boundary) & (lower_code % 2 == 1))
        code += goes_up.to(torch.uint8)
    sign = (x < 0).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of E2M1 codes (uint8 0..15)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    magnitude = grid[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: element 2j in the low nibble, 2j+1 in the high."""
    assert codes.dtype == torch.uint8 and codes.shape[-1] % 2 == 0, (codes.dtype, codes.shape)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: last dim doubles."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


# -- a quantized tensor ------------------------------------------------------------------------------

@dataclass
class QuantizedTensor:
    """A weight [..., out, in] in one of the formats, as stored.

    fp8:   data float8_e4m3fn [..., out, in];   scale fp32 [..., out];  tensor_scale None
    nvfp4: data uint8 [..., out, in/2] (packed); scale float8_e4m3fn [..., out, in/16];
           tensor_scale fp32 [...] (a 0-dim tensor for a plain matrix, one per expert when stacked)
    """

    format: str
    shape: tuple[int, ...]
    data: torch.Tensor
    scale: torch.Tensor
    tensor_scale: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """fp32 weights of the original shape: what the emulated matmul uses."""
        if self.format == "fp8":
            return self.data.float() * self.scale.float().unsqueeze(-1)
        assert self.tensor_scale is not None  # nvfp4 always has one (quantize_nvfp4, from_stored)
        values = e2m1_decode(unpack_nibbles(self.data))  # [..., out, in]
        block_scale = self.scale.float() * self.tensor_scale.float()[..., None, None]
        blocks = values.unflatten(-1, (-1, NVFP4_BLOCK)) * block_scale.unsqueeze(-1)
        return blocks.flatten(-2)

    def stored(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors written to safetensors for the weight ``name`` (ModelOpt-like suffixes)."""
        tensors = {name: self.data, f"{name}_scale": self.scale}
        if self.tensor_scale is not None:
            tensors[f"{name}_scale_2"] = self.tensor_scale
        return tensors

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values and scales."""
        return sum(t.numel() * t.element_size() for t in self.stored("w").values())

    @property
    def bf16_nbytes(self) -> int:
        return _numel(self.shape) * 2

    @classmethod
    def from_stored(cls, name: str, format: str, shape: list[int], tensors: dict[str, torch.Tensor]) -> "QuantizedTensor":
        tensor_scale = tensors[f"{name}_scale_2"] if format == "nvfp4" else None
        quantized = cls(format, tuple(shape), tensors[name], tensors[f"{name}_scale"], tensor_scale)
        quantized.check()
        return quantized

    def check(self) -> None:
        """The stored tensors have the dtypes and shapes their format needs."""
        *lead, out_features, in_features = self.shape
        if self.format == "fp8":
            expected = [(self.data, torch.float8_e4m3fn, self.shape), (self.scale, torch.float32, (*lead, out_features))]
        else:
            assert self.tensor_scale is not None  # nvfp4 always has one (quantize_nvfp4, from_stored)
            expected = [(self.data, torch.uint8, (*lead, out_features, in_features // 2)),
                        (self.scale, torch.float8_e4m3fn, (*lead, out_features, in_features // NVFP4_BLOCK)),
                        (self.tensor_scale, torch.float32, tuple(lead))]
        for tensor, dtype, shape in expected:
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise UserError(f"quantized weights: a {self.format} tensor of shape {list(self.shape)} has a part "
                                f"of {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}; the file "
                                "was not written by gonogo quantize, or is corrupt")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def quantize_fp8(weight: torch.Tensor) -> QuantizedTensor:
    """E4M3 with one scale per output row: the row's largest magnitude maps to 448."""
    weight = weight.detach().float()
    row_amax = weight.abs().amax(dim=-1)
    scale = torch.where(row_amax > 0, row_amax / E4M3_MAX, torch.ones_like(row_amax))
    data = to_e4m3(weight / scale.unsqueeze(-1))
    return QuantizedTensor("fp8", tuple(weight.shape), data, scale)


def quantize_nvfp4(weight: torch.Tensor, name: str = "weight") -> QuantizedTensor:
    """NVFP4: E2M1 values, an E4M3 scale per 16 inputs, an fp32 scale per matrix (see module doc)."""
    weight = weight.detach().float()
    in_features = weight.shape[-1]
    if in_features % NVFP4_BLOCK:
        raise UserError(f"{name}: NVFP4 needs the input dimension to be a multiple of {NVFP4_BLOCK}, "
                        f"it is {in_features}; use --format fp8 for this model")
    matrix_amax = weight.abs().amax(dim=(-2, -1))
    # an all-zero matrix gets scale 1 (every block scale is then 0 and every value 0)
    tensor_scale = torch.where(matrix_amax > 0, matrix_amax / (E4M3_MAX * E2M1_MAX), torch.ones_like(matrix_amax))
    blocks = weight.unflatten(-1, (-1, NVFP4_BLOCK))  # [..., out, in/16, 16]
    block_amax = blocks.abs().amax(dim=-1)
    per_tensor = tensor_scale[..., None, None]
    block_scale = to_e4m3(block_amax / (E2M1_MAX * per_tensor))
    effective = block_scale.float() * per_tensor
    # a block whose scale rounds to 0 (far below the matrix's max) is all zeros in this format
    scaled = torch.where(effective.unsqueeze(-1) > 0, blocks / effective.unsqueeze(-1), torch.zeros_like(blocks))
    codes = e2m1_encode(scaled.flatten(-2))
    return QuantizedTensor("nvfp4", tuple(weight.shape), pack_nibbles(codes), block_scale, tensor_scale.float())


def quantize_tensor(weight: torch.Tensor, format: str, name: str = "weight") -> QuantizedTensor:
    if format == "fp8":
        return quantize_fp8(weight)
    if format == "nvfp4":
        return quantize_nvfp4(weight, name)
    raise UserError(f"unknown quantization format {format!r}; choose one of {', '.join(FORMATS)}")


# -- a quantized model ----------------------------------------------------------------------------

@dataclass
class QuantizedModel:
    """A Decoder's weights with the linear layers quantized and the rest kept in bf16."""

    config: Any                                  # ModelConfig
    format: str
    quantized: dict[str, QuantizedTensor]
    kept: dict[str, torch.Tensor]                # embeddings, norms, head, router (bf16), buffers
    meta: dict[str, Any]

    @classmethod
    def from_model(cls, model: torch.nn.Module, format: str, meta: Optional[dict] = None) -> "QuantizedModel":
        if format not in FORMATS:
            raise UserError(f"unknown quantization format {format!r}; choose one of {', '.join(FORMATS)}")
        quantized, kept = {}, {}
        for name, tensor in model.state_dict().items():
            if is_quantized_weight(name):
                quantized[name] = quantize_tensor(tensor, format, name)
            elif tensor.is_floating_point() and not name.endswith("expert_bias"):
                kept[name] = tensor.detach().to(KEPT_DTYPE).contiguous()
            else:  # the router's selection bias steers routing; it is kept exactly
                kept[name] = tensor.detach().clone().contiguous()
        assert quantized, "a Decoder always has linear layers to quantize"
        return cls(model.config, format, quantized, kept, dict(meta or {}))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights for a Decoder: dequantized linear layers, bf16-rounded others."""
        weights = {name: q.dequantize() for name, q in self.quantized.items()}
        weights.update({name: t.float() if t.is_floating_point() else t for name, t in self.kept.items()})
        return weights

    def to_decoder(self) -> torch.nn.Module:
        """An fp32 Decoder in eval mode on CPU carrying the dequantized weights."""
        from gonogo.model.decoder import Decoder

        model = Decoder(self.config)
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        if missing or unexpected:
            raise UserError(f"quantized weights do not fit the model (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})")
        return model.float().eval()

    def byte_counts(self) -> dict[str, int]:
        """Stored bytes: quantized weights with their scales, the same weights in bf16, the rest."""
        quantized = sum(q.nbytes for q in self.quantized.values())
        kept = sum(t.numel() * t.element_size() for t in self.kept.values())
        return {"quantized_bytes": quantized,
                "quantized_bf16_bytes": sum(q.bf16_nbytes for q in self.quantized.values()),
                "kept_bytes": kept, "total_bytes": quantized + kept}

    def describe(self) -> dict[str, Any]:
        """The content of quantization.json."""
        return {
            "format": self.format,
            "version": 1,
            "weights_file": WEIGHTS_NAME,
            "block_size": NVFP4_BLOCK if self.format == "nvfp4" else None,
            "scheme": ("E4M3 values, fp32 scale per output row (name_scale)" if self.format == "fp8" else
                       "E2M1 values packed two per uint8 (element 2j in the low nibble), E4M3 scale per "
                       "16 inputs (name_scale), fp32 scale per matrix (name_scale_2)"),
            "kept_dtype": "bfloat16",
            "quantized": {name: {"shape": list(q.shape)} for name, q in sorted(self.quantized.items())},
            "kept": sorted(self.kept),
            "bytes": self.byte_counts(),
        }

    def save(self, directory: str | Path) -> Path:
        """Write a committed, verifiable quantized checkpoint directory (temporary dir, then rename)."""
        from safetensors.torch import save_file

        from gonogo.checkpoints import manifest
        from gonogo.files import new_directory

        directory = Path(directory)
        with new_directory(directory) as temporary:  # an interrupted save leaves no .tmp- directory
            tensors: dict[str, torch.Tensor] = {}
            for name, q in self.quantized.items():
                tensors.update({key: value.contiguous() for key, value in q.stored(name).items()})
            for name, tensor in self.kept.items():
                assert name not in tensors, name
                # a tied head shares storage with the embedding in a state dict; store each on its own
                tensors[name] = tensor.clone()
            save_file(tensors, str(temporary / WEIGHTS_NAME), metadata={"producer": "gonogo", "format": self.format})
            (temporary / FORMAT_NAME).write_text(json.dumps(self.describe(), indent=2) + "\n", encoding="utf-8")
            meta = dict(self.meta)
            meta["model"] = self.config.model_dump(mode="json")
            meta.setdefault("tokenizer", "byte-v1")
            meta["quantization"] = {"format": self.format, "file": FORMAT_NAME}
            (temporary / manifest.META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            manifest.commit(temporary)
        log.info("wrote %s weights to %s (%d bytes of tensors)", self.format, directory, self.byte_counts()["total_bytes"])
        return directory

    @classmethod
    def load(cls, directory: "str | Path | CheckpointRef") -> "QuantizedModel":
        """Read a directory written by ``save`` (safetensors and JSON only: no code runs from files);
        a ``CheckpointRef`` was verified when it was resolved, a path is verified here (once per
        process: gonogo.checkpoints.reference)."""
        from safetensors.torch import load_file

        from gonogo.checkpoints import manifest
        from gonogo.checkpoints.reference import CheckpointRef, verify
        from gonogo.typed_config import validate
        from gonogo.model.shape import ModelConfig

        if not isinstance(directory, CheckpointRef):
            ok, reason, _ = verify(Path(directory))
            if not ok:
                raise UserError(f"{directory}: quantized checkpoint cannot be used: {reason}")
        directory = Path(directory)
        description = json.loads((directory / FORMAT_NAME).read_text(encoding="utf-8"))
        meta = json.loads((directory / manifest.META_NAME).read_text(encoding="utf-8"))
        config = validate(ModelConfig, meta["model"], source=str(directory / manifest.META_NAME))
        format = description.get("format")
        if format not in FORMATS:
            raise UserError(f"{directory / FORMAT_NAME}: unknown format {format!r} (known: {', '.join(FORMATS)})")
        tensors = load_file(str(directory / WEIGHTS_NAME), device="cpu")
        quantized = {name: QuantizedTensor.from_stored(name, format, entry["shape"], tensors)
                     for name, entry in description["quantized"].items()}
        kept = {name: tensors[name] for name in description["kept"]}
        return cls(config, format, quantized, kept, meta)


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / FORMAT_NAME).is_file()


def load_quantized(path: "str | Path | CheckpointRef"):
    """-> (Decoder in eval mode on CPU in fp32 with dequantized weights, ModelConfig, meta)."""
    quantized = QuantizedModel.load(path)
    return quantized.to_decoder(), quantized.config, quantized.meta
