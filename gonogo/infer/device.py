"""Where inference runs: the device and dtype, chosen once, and whether the model fits there.

Every command that decodes (serve, eval, quantize, the canary's servers) takes ``--device``:
``auto`` (the default) is the first CUDA GPU when torch sees one, else the CPU. On a GPU the
weights and the KV cache live in GPU memory in bf16 (the precision the models were trained in,
and what the tensor cores run); on the CPU nothing changes: fp32, as before. Attention is
PyTorch's scaled_dot_product_attention either way (the decoder calls it), which on CUDA picks
the flash / memory-efficient kernels.

A model that does not fit is refused before anything is copied: the weights plus the KV cache
against the GPU's free memory, one line that names both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import torch

from gonogo.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    from gonogo.checkpoints.reference import CheckpointRef

log = logging.getLogger(__name__)

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GiB = 2 ** 30

_ModuleT = TypeVar("_ModuleT", bound=torch.nn.Module)


def choose_device(requested: Optional[str] = None) -> torch.device:
    """``auto``/None: cuda when available, else cpu. ``cuda``/``cuda:N``/``cpu`` as given."""
    if requested in (None, "", AUTO):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {requested!r}: not a device; give auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested}: inference runs on cpu or cuda; give auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                            "use --device cpu or auto")
        count = torch.cuda.device_count()
        index = 0 if device.index is None else device.index
        if index >= count:
            raise UserError(f"--device {requested}: this machine shows {count} CUDA device(s) (0..{count - 1})")
        device = torch.device("cuda", index)
    return device


def inference_dtype(device: torch.device, requested: Optional[str] = None) -> torch.dtype:
    """The dtype given, else bf16 on a GPU and fp32 on the CPU (the CPU's behaviour so far)."""
    if requested:
        if requested not in DTYPES:
            raise UserError(f"dtype {requested!r}: give one of {', '.join(DTYPES)}")
        return DTYPES[requested]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def tensor_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's floating tensors in ``dtype`` plus the others as they are."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        size = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def check_fits(needed_bytes: int, device: torch.device, what: str) -> None:
    """UserError when ``needed_bytes`` exceed the free memory of a CUDA ``device``."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if needed_bytes > free:
        raise UserError(f"{what} needs {_size(needed_bytes)} on {device} but {_size(free)} of its "
                        f"{_size(total)} are free: use a GPU with more memory, a quantized checkpoint, "
                        "a smaller --max-batch, or --device cpu")


def _size(count: int) -> str:
    return f"{count / GiB:.2f} GiB" if count >= GiB else f"{count / 2**20:.1f} MiB"


def place(model: _ModuleT, device: torch.device, dtype: torch.dtype, *, extra_bytes: int = 0,
          what: str = "the model") -> _ModuleT:
    """``model`` in eval mode on ``device`` in ``dtype``, after checking that it fits there."""
    needed = tensor_bytes(model, dtype) + extra_bytes
    check_fits(needed, device, what)
    if device.type == "cuda":
        log.info("placing %s on %s in %s (%.2f GiB with the cache)", what, device, dtype, needed / GiB)
    return model.to(device=device, dtype=dtype).eval()


def load_for_inference(checkpoint: "CheckpointRef | str | Path", *, device: Any = "cpu", dtype: Any = None):
    """-> (Decoder in eval mode, ModelConfig, meta dict).

    On ``device`` ("cpu" by default; "auto", "cuda", "cuda:N" or a torch.device) in ``dtype``
    (default: fp32 on the CPU, bf16 on a GPU), after checking that it fits there
    (``place``). Safetensors and verified files only: no code runs from the files.
    """
    from gonogo.checkpoints.loaders import LOADERS
    from gonogo.checkpoints.reference import resolve

    target = device if isinstance(device, torch.device) else choose_device(device)
    if dtype is None or isinstance(dtype, str):
        dtype = inference_dtype(target, dtype)
    ref = resolve(checkpoint)
    model, config, meta = LOADERS[ref.format](ref)
    return place(model, target, dtype, what=f"the model of {ref.path}"), config, meta


def engine_threads_on_cpu() -> int:
    """The engine's torch threads on a CPU when ``--threads`` is not given: every core this process
    may run on but one, which is left to the HTTP loop and the clients (as vLLM's CPU backend
    reserves one). With every core, each client or loop wake-up stalls a parallel region until its
    preempted thread runs again: on 2 cores, 1 thread served 1 stream at 310-406 tokens/s and 2
    threads at 225-268 (bench/results/serve.md)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS: no affinity API
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - 1))
