"""Serving speed: our engine vs Hugging Face transformers' generate, and the server's batching.

    python bench/serve.py            # writes bench/results/serve.md

1. Decode tokens/s at batch 1 and batch 8 for the same weights (a 4-layer, d=256 model), loaded
   into ours and into transformers' LlamaForCausalLM by renaming parameters, measured side by
   side in one process (same threads, greedy, fixed token counts, best of a few repeats).
2. Aggregate tokens/s of 8 concurrent streams through `gonogo serve` vs the same 8 sent one after
   another.
3. Engines side by side on one `gonogo export` of that model: the gonogo engine and vLLM (when
   `gonogo engine install vllm` has been run) as OpenAI servers, transformers' generate in
   process — decode tokens/s at 1 stream, aggregate tokens/s at 8 concurrent streams, and TTFT
   p50/p95 under a fixed Poisson arrival rate.
Ratios only: absolute numbers depend on the machine.

    python bench/serve.py --only engines --quick --out /tmp/serve.md   # a smoke run of part 3
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "infer"))

from bench.quiet import RULE, LoadWatch, machine, verdict  # noqa: E402
from gonogo.data.tokenizer import ByteTokenizer  # noqa: E402
from gonogo.infer.engine import Engine, EngineSettings, Request  # noqa: E402
from gonogo.infer.sampling import SamplingParams  # noqa: E402
from gonogo.model.config import ModelConfig  # noqa: E402
from gonogo.model.decoder import Decoder  # noqa: E402

PROMPT_TOKENS = 16
NEW_TOKENS = 128
REPEATS = 5


def bench_model() -> Decoder:
    config = ModelConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=1024, max_seq_len=512)
    model = Decoder(config)
    model.init_weights(0)
    return model.eval()


def to_transformers(model: Decoder):
    """The same weights in a transformers LlamaForCausalLM (Llama's RoPE layout and RMSNorm)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model.config
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len, rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    parts = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
    state = {}
    for name, tensor in model.state_dict().items():
        if name in names:
            state[names[name]] = tensor
            continue
        _, index, rest = name.split(".", 2)
        module = rest.rsplit(".", 1)[0]
        state[f"model.layers.{index}.{parts[module]}.weight"] = tensor
    hf = LlamaForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in name for name in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def prompts(batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))


def run_transformers(hf, batch: int, new_tokens: int = NEW_TOKENS) -> None:
    tokens = prompts(batch)
    with torch.inference_mode():
        out = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)
    assert out.shape == (batch, PROMPT_TOKENS + new_tokens)


def run_engine(engine: Engine, batch: int) -> None:
    """All requests submitted at once with callbacks (the engine's API; no waiting client threads)."""
    tokens = prompts(batch).tolist()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    counts = [0] * batch
    finished = threading.Semaphore(0)

    def emit(event, index):
        counts[index] += len(event.token_ids)
        if event.done:
            finished.release()

    for index in range(batch):
        engine.submit(Request(tokens[index], params, lambda event, index=index: emit(event, index)))
    for _ in range(batch):
        assert finished.acquire(timeout=600)
    assert counts == [NEW_TOKENS] * batch


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is what other jobs on the cores don't steal."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(hf, engines: dict, batch: int) -> dict[str, tuple[float, float]]:
    """Interleaved rounds (each contender in turn, so load changes hit all alike); best of the rounds."""
    contenders = {"transformers": lambda: run_transformers(hf, batch)}
    contenders.update({dtype: (lambda engine=engine: run_engine(engine, batch)) for dtype, engine in engines.items()})
    best = {name: (float("inf"), float("inf")) for name in contenders}
    for _ in range(REPEATS):
        for name, run in contenders.items():
            wall, cpu = timed(run)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    tokens = batch * NEW_TOKENS
    return {name: (tokens / wall, tokens / cpu) for name, (wall, cpu) in best.items()}


def check_same_greedy(model: Decoder, hf, engine: Engine) -> bool:
    tokens = prompts(1)
    with torch.inference_mode():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-4, atol=1e-4)
        theirs = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False)[0, PROMPT_TOKENS:].tolist()
    ours = engine.generate(tokens[0].tolist(), SamplingParams(max_tokens=32, temperature=0.0))[0].token_ids
    return theirs == ours


def server_aggregate(model: Decoder, workdir: Path, dtype: str) -> tuple[float, float]:
    import httpx

    from conftest import API_KEY, start_server, write_checkpoint

    checkpoint = workdir / "step-00000001"
    if not checkpoint.exists():
        write_checkpoint(checkpoint, model)
    server = start_server(checkpoint, workdir, threads=torch.get_num_threads(), dtype=dtype)
    body = {"model": "gonogo", "max_tokens": NEW_TOKENS, "temperature": 0.0, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def one(client, index: int) -> int:
        payload = {**body, "prompt": prompts(8)[index].tolist()}
        chunks = 0
        async with client.stream("POST", f"{server.url}/v1/completions", json=payload, headers=headers) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
        return chunks

    async def run(concurrent: bool) -> float:
        async with httpx.AsyncClient(timeout=300) as client:
            await one(client, 0)  # warm-up
            started = time.perf_counter()
            if concurrent:
                await asyncio.gather(*(one(client, i) for i in range(8)))
            else:
                for i in range(8):
                    await one(client, i)
            return time.perf_counter() - started

    sequential = concurrent = float("inf")
    try:
        for _ in range(3):  # interleaved, so a change in the machine's load hits both alike
            sequential = min(sequential, asyncio.run(run(False)))
            concurrent = min(concurrent, asyncio.run(run(True)))
    finally:
        server.stop()
    tokens = 8 * NEW_TOKENS
    return tokens / sequential, tokens / concurrent


ENGINE_RATE = 2.0          # requests/s of the fixed-rate TTFT run
ENGINE_REQUESTS = 20


def engines_side_by_side(workdir: Path, new_tokens: int, requests: int) -> dict:
    """Each engine on the same export: {engine: {decode_1, aggregate_8, ttft_p50_ms, ttft_p95_ms, startup_s}}."""
    from conftest import write_checkpoint

    from gonogo.export.hf import export_hf
    from gonogo.infer.engines.install import engine_status
    from gonogo.infer.engines.start import EngineSettings, start_engine
    from gonogo.infer.loadgen import LoadSettings, run_load

    checkpoint = workdir / "step-00000001"
    write_checkpoint(checkpoint, bench_model())
    export = export_hf(checkpoint, workdir / "export")
    results: dict = {}
    engines = ["gonogo"] + (["vllm"] if engine_status("vllm")["ready"] else [])
    if "vllm" not in engines:
        print("vLLM is not installed (gonogo engine install vllm): left out", flush=True)
    for name in engines:
        server = start_engine(EngineSettings(name=name), str(export), workdir / name, name="server",
                              model_name="bench", dtype="bfloat16")
        try:
            url = server.wait_healthy(900.0)
            base = dict(url=url, endpoint="completions", model="bench", max_tokens=new_tokens, ignore_eos=True,
                        warmup=1)
            one = run_load(LoadSettings(**base, max_concurrency=1, num_requests=3))
            eight = run_load(LoadSettings(**base, max_concurrency=8, num_requests=16))
            paced = run_load(LoadSettings(**base, rate=ENGINE_RATE, num_requests=requests))
            results[name] = {"startup_s": server.startup_seconds,
                             "decode_1": 1000.0 / one["median_tpot_ms"] if one["median_tpot_ms"] else None,
                             "aggregate_8": eight["output_throughput"],
                             "ttft_p50_ms": paced["median_ttft_ms"], "ttft_p95_ms": paced["p95_ttft_ms"],
                             "failed": one["failed"] + eight["failed"] + paced["failed"]}
        finally:
            server.stop()
        print(f"engine {name}: {results[name]}", flush=True)
    model = bench_model()
    hf = to_transformers(model)
    for batch, key in ((1, "decode_1"), (8, "aggregate_8")):
        wall = min(timed(lambda batch=batch: run_transformers(hf, batch, new_tokens))[0] for _ in range(2))
        results.setdefault("transformers", {})[key] = batch * new_tokens / wall
    print(f"engine transformers: {results['transformers']}", flush=True)
    return results


def engines_table(results: dict, new_tokens: int, requests: int) -> list[str]:
    def cell(value, digits=0):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "## Engines side by side on one export", "",
        f"The same weights exported with `gonogo export` (bf16 servers), streaming /v1/completions of "
        f"{new_tokens} tokens (ignore_eos), client in this process. Decode = 1000 / median TPOT of one "
        f"stream; aggregate = output tokens/s with 8 requests in flight; TTFT under {ENGINE_RATE:g} "
        f"requests/s Poisson arrivals, {requests} requests. transformers is generate() in process "
        f"(batch 1 and 8, prefill included): no server, so no TTFT.", "",
        "| engine | start (s) | decode tok/s, 1 stream | aggregate tok/s, 8 streams | TTFT p50 ms | TTFT p95 ms | "
        "failed requests |", "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {cell(row.get('startup_s'), 1)} | {cell(row.get('decode_1'))} | "
                     f"{cell(row.get('aggregate_8'))} | {cell(row.get('ttft_p50_ms'))} | "
                     f"{cell(row.get('ttft_p95_ms'))} | {row.get('failed', '-')} |")
    return lines + [""]


def measure(threads: int, workdir: Path) -> dict:
    torch.set_num_threads(threads)
    model = bench_model()
    hf = to_transformers(model)
    tokenizer = ByteTokenizer()
    engines = {dtype: Engine(bench_model(), tokenizer, EngineSettings(max_batch=8, dtype=dtype),
                             stop_token_ids=set()).start() for dtype in ("float32", "bfloat16")}
    rows = []
    try:
        same = check_same_greedy(model, hf, engines["float32"])
        for batch in (1, 8):
            speeds = compare(hf, engines, batch)
            rows.append((batch, speeds))
            print(f"threads {threads} batch {batch}: " + ", ".join(
                f"{name} {wall:.0f} tok/s ({cpu:.0f} tok/CPU-s)" for name, (wall, cpu) in speeds.items()), flush=True)
    finally:
        for engine in engines.values():
            engine.stop()
    served = {}
    for dtype in ("float32", "bfloat16"):
        served[dtype] = server_aggregate(bench_model(), workdir, dtype)
        print(f"threads {threads} server {dtype}: sequential {served[dtype][0]:.0f} tok/s, 8 concurrent "
              f"{served[dtype][1]:.0f} tok/s", flush=True)
    return {"threads": threads, "same": same, "rows": rows, "served": served}


def main() -> None:
    import argparse

    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="torch intra-op thread counts to measure, e.g. 1,2")
    parser.add_argument("--only", choices=["engines"], help="only the engines side by side (part 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few tokens and requests")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    runs = []
    if args.only is None:
        for threads in [int(part) for part in args.threads.split(",")]:
            with tempfile.TemporaryDirectory() as workdir, LoadWatch() as watch:
                runs.append(measure(threads, Path(workdir)))
            runs[-1]["watch"] = watch
    new_tokens, requests = (16, 4) if args.quick else (NEW_TOKENS, ENGINE_REQUESTS)
    with tempfile.TemporaryDirectory() as workdir, LoadWatch() as engines_watch:
        side_by_side = engines_side_by_side(Path(workdir), new_tokens, requests)
    lines = [
        "# Serving speed (bench/serve.py)", "",
        f"Machine: {machine()}, transformers {transformers.__version__}. "
        f"Model: 4 layers, d=256, 4 heads, SwiGLU 1024, vocab 384, random weights. Prompt {PROMPT_TOKENS} "
        f"tokens, {NEW_TOKENS} new tokens per sequence, greedy, best of {REPEATS} interleaved rounds; tokens/s "
        "include the prefill.",
        "",
        RULE,
        "",
    ]
    for run in runs:
        lines += [
            f"## {run['threads']} torch thread{'s' if run['threads'] > 1 else ''}", "",
            f"Machine during these measurements: {run['watch'].describe()}.", "",
            f"Same greedy tokens as transformers on the same weights (32 tokens): {'yes' if run['same'] else 'NO'}.",
            "",
            "Tokens per wall-clock second, and in brackets per CPU-second of the process (robust to other "
            "jobs taking the cores); ratios are against transformers.", "",
            "| batch | transformers generate | gonogo engine fp32 | ratio | gonogo engine bf16 | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for batch, speeds in run["rows"]:
            hf_wall, hf_cpu = speeds["transformers"]
            cells = [f"{hf_wall:.0f} ({hf_cpu:.0f})"]
            for dtype in ("float32", "bfloat16"):
                wall, cpu = speeds[dtype]
                cells += [f"{wall:.0f} ({cpu:.0f})", f"{wall / hf_wall:.2f}x ({cpu / hf_cpu:.2f}x)"]
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        served = run["served"]
        lines += [
            "", f"Through `gonogo serve` (streaming /v1/completions, 8 requests of {NEW_TOKENS} tokens, "
            "client in another process on the same cores):", "",
            "| server dtype | 8 one after another (tok/s) | 8 concurrent streams (tok/s) | ratio |", "|---|---|---|---|",
        ]
        for dtype, (sequential, concurrent) in served.items():
            lines.append(f"| {dtype} | {sequential:.0f} | {concurrent:.0f} | {concurrent / sequential:.2f}x |")
        speeds = dict(run["rows"])
        best = {batch: max(speeds[batch][dtype][0] for dtype in ("float32", "bfloat16"))
                / speeds[batch]["transformers"][0] for batch in speeds}
        streams = max(concurrent / sequential for sequential, concurrent in served.values())
        watch = run["watch"]
        lines += ["", f"Targets at {run['threads']} thread(s): >= 2x transformers at batch 1: "
                  f"{verdict(best.get(1, 0) >= 2, watch)} ({best.get(1, 0):.2f}x); >= 1.5x at batch 8: "
                  f"{verdict(best.get(8, 0) >= 1.5, watch)} ({best.get(8, 0):.2f}x); >= 4x aggregate with 8 "
                  f"concurrent streams vs sequential: {verdict(streams >= 4, watch)} ({streams:.2f}x).", ""]
    lines += [f"Machine during the engines side by side: {engines_watch.describe()}.", ""]
    lines += engines_table(side_by_side, new_tokens, requests)
    lines += [
        "Targets: >= 2x transformers at batch 1 (aim 3x), >= 1.5x at batch 8, >= 4x aggregate with 8 "
        "concurrent streams vs sequential.", "",
        "Where the time goes (cProfile with thread CPU time, py-spy on the server): at batch 1 about 63% of a "
        "decode step is the 17 matmuls, which read all 17 MB of fp32 weights per token (memory-bound on one "
        "core); the fused path (gonogo/infer/fast_decode.py) already removed most of the other per-operation "
        "overhead, so the remaining gap to the targets is the weight-read floor plus transformers' own, "
        "smaller than expected, generate overhead. bf16 halves the bytes read and wins at batch 8. In the "
        "server, waking the event loop from the engine thread per token cost 18% of the engine thread (GIL "
        "hand-off); the loop now collects events every 2 ms instead.", "",
    ]
    out = args.out
    out.write_text("\n".join(lines))
    print(json.dumps({"written": str(out)}))


if __name__ == "__main__":
    main()
