"""Inference placement: the engine on the GPU when there is one (faked here), unchanged on the CPU."""

from __future__ import annotations

import pytest
import torch

from gonogo.data.tokenizer import ByteTokenizer
from gonogo.errors import UserError
from gonogo.infer import device as device_module
from gonogo.infer import engine as engine_module
from gonogo.infer.engine import Engine, EngineSettings

from .conftest import tiny_model, write_checkpoint

GiB = 2 ** 30


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports one CUDA GPU with 80 GiB free; moves to it and allocations on it are recorded
    (and made on the CPU, which is all this torch has)."""
    seen = {"moves": [], "cache_devices": [], "free": 80 * GiB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (seen["free"], 80 * GiB))
    real_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        device = kwargs.pop("device", None)
        seen["moves"].append((type(module).__name__, device, kwargs.get("dtype")))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)

    class RecordingCache(engine_module.KVCache):
        def __init__(self, **options):
            seen["cache_devices"].append((torch.device(options["device"]), options["dtype"]))
            super().__init__(**{**options, "device": "cpu"})

    monkeypatch.setattr(engine_module, "KVCache", RecordingCache)
    return seen


def test_the_engine_puts_model_and_cache_on_the_gpu_in_bf16(fake_gpu):
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=4))
    gpu = torch.device("cuda", 0)
    assert engine.device == gpu and engine.dtype == torch.bfloat16
    assert fake_gpu["moves"] == [("Decoder", gpu, torch.bfloat16)]
    assert fake_gpu["cache_devices"] == [(gpu, torch.bfloat16)]


def test_device_cpu_keeps_the_cpu_even_with_a_gpu(fake_gpu):
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=4, device="cpu"))
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert fake_gpu["cache_devices"] == [(torch.device("cpu"), torch.float32)]


def test_a_model_larger_than_the_free_gpu_memory_is_one_clear_error(fake_gpu):
    fake_gpu["free"] = 100 * 1024  # 100 KiB: less than the tiny model's bf16 weights + cache
    with pytest.raises(UserError, match=r"KV cache of 4 x 256 tokens needs 0\.\d MiB on cuda:0 but 0\.1 MiB "
                                        r"of its 80\.00 GiB are free"):
        Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=4))
    assert fake_gpu["moves"] == []  # refused before anything was copied


def test_on_a_cpu_machine_nothing_changes():
    assert not torch.cuda.is_available()
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=2))
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.cache.keys[0].device.type == "cpu" and engine.cache.keys[0].dtype == torch.float32
    assert next(engine.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("requested, words", [("cuda", "torch sees no CUDA GPU"), ("mps", "cpu or cuda"),
                                              ("nonsense:x", "not a device")])
def test_a_device_this_machine_lacks_is_a_user_error(requested, words):
    with pytest.raises(UserError, match=words):
        device_module.choose_device(requested)


def test_load_for_inference_places_the_model_where_it_is_asked(tmp_path, fake_gpu):
    from gonogo.infer.device import load_for_inference

    directory = write_checkpoint(tmp_path / "ckpt", tiny_model())

    fake_gpu["moves"].clear()
    load_for_inference(directory, device="auto")
    assert fake_gpu["moves"][-1] == ("Decoder", torch.device("cuda", 0), torch.bfloat16)
    model, _, _ = load_for_inference(directory)  # callers that do not ask keep CPU fp32
    assert fake_gpu["moves"][-1] == ("Decoder", torch.device("cpu"), torch.float32)
    assert next(model.parameters()).dtype == torch.float32
