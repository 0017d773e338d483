"""Fixtures: a tiny checkpoint that answers the canary's quality set, and small stand-in SSE backends.

The quality check needs a stable model with a measurable accuracy, and a tiny model cannot learn
arithmetic in a test's time budget. So the fixture model memorises the held-out problems the
canary asks (seed 0, first QUALITY_PROMPTS): a stand-in for "a trained model that is right on
them"; the degraded canary is the same model with its weights rounded to 2 bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

QUALITY_PROMPTS = 4
CHUNK_GAP_S = 0.25


def train_memorising_checkpoint(directory: Path, problems, steps: int = 300, seed: int = 0, config=None,
                                lr: float = 1e-2) -> Path:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from gonogo.data.tokenizer import ByteTokenizer
    from gonogo.model.shape import ModelConfig
    from gonogo.model.decoder import Decoder
    from gonogo.checkpoints import manifest

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: other tests share the machine, and tiny matmuls gain nothing from two
    tokenizer = ByteTokenizer()
    config = config or ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
    model = Decoder(config)
    model.init_weights(seed)
    sequences = [tokenizer.encode(p.text, eos=True) for p in problems]
    length = max(map(len, sequences))
    tokens = torch.full((len(sequences), length), tokenizer.pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, :len(ids)] = torch.tensor(ids)
    targets = tokens[:, 1:].clone()
    targets[targets == tokenizer.pad_id] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.set_num_threads(threads)
    directory.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    meta = {"step": steps, "model": config.model_dump(), "tokenizer": "byte-v1", "world_size": 1, "train": {}}
    (directory / "meta.json").write_text(json.dumps(meta))
    manifest.commit(directory)
    return directory


@pytest.fixture(scope="session")
def quality_checkpoint(tmp_path_factory) -> Path:
    from gonogo.data.synthetic import generate

    problems = generate("heldout", 0, QUALITY_PROMPTS)
    return train_memorising_checkpoint(tmp_path_factory.mktemp("canary") / "step-00000300", problems)


def sse_backend(name: str):
    """A small in-process stand-in server: three SSE chat chunks CHUNK_GAP_S apart, then [DONE]."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def chat(_request):
        async def chunks():
            for index in range(3):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"{name}{index} "}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(CHUNK_GAP_S)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def health(_request):
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])


@pytest.fixture
def backends():
    """URLs of a 'stable' and a 'canary' stand-in backend on loopback, stopped after the test."""
    from gonogo.rollout.router import ThreadedServer

    servers = [ThreadedServer(sse_backend(name)).start() for name in ("stable", "canary")]
    yield [server.url for server in servers]
    for server in servers:
        server.stop()
