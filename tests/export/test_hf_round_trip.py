"""The whole round trip for every supported Hugging Face architecture.

import -> full finetune (2 steps) and LoRA finetune (2 steps) on chats with the model's own
template -> export -> transformers reloads each export with gonogo's logits -> `gonogo serve` on
an export answers the real `openai` client, streamed text equal to the plain text, with emoji and
CJK in the prompt. (Import alone against transformers: test_hf_import.py.)

The finetunes run the trainer's worker in this process as the one-rank job it starts without
torchrun (gonogo.parallel.init_distributed); the torchrun launch of the same finetune is
tested in tests/train/test_finetune_hf.py and tests/test_byo_model_plan.py.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import openai
import pytest
import torch

from tests.hf_models import ARCHITECTURE_NAMES
from tests.train.test_finetune import TINY_TRAIN, write_chats

PROMPT = "Q: 614*2= A: say it 🙂🎉 in 中文，日本語"
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl", 24, [])


def _finetune_in_process(source: Path, out: Path, chats: Path, *overrides: str) -> Path:
    """`gonogo finetune` minus torchrun: config, preflight, job file and worker as the command runs
    them; -> the committed checkpoint directory."""
    from gonogo.rundir import RunDir
    from gonogo.stages.finetune.stage import finetune, load_finetune_config
    from gonogo.train.worker import main as worker_main

    config, path, _ = load_finetune_config("sft-tiny", source, [
        f"data.source={chats}", "data.val_percent=20", "train.steps=2", "train.lr=1e-2",
        *TINY_TRAIN, *overrides])
    run_dir = RunDir.create(out, plan_name="finetune")
    stage_dir = run_dir.stage_dir("finetune")

    def run_command(argv, *, timeout, log_name, env=None, on_line=None) -> int:
        return worker_main([argv[-1]])  # the job file: torchrun's last argument to the worker

    handler_was_on = faulthandler.is_enabled()
    try:
        metrics = finetune(config, path, 1, run_dir=run_dir, stage="finetune", stage_dir=stage_dir, resume="never",
                           timeout_s=120, run_command=run_command, on_update=lambda update: None)
    finally:
        if handler_was_on and not faulthandler.is_enabled():  # the worker's triage turned pytest's off
            faulthandler.enable(file=sys.__stderr__, all_threads=True)
    assert metrics["steps_completed"] == 2, metrics
    [step] = list((out / "checkpoints" / "finetune").glob("step-*"))
    return step


def _chat_tokens(directory: Path) -> torch.Tensor:
    from gonogo.data.hf_tokenizer import HFTokenizer

    ids = HFTokenizer(directory).apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)[0]
    return torch.tensor([ids])


def _export_reloads_with_equal_logits(step: Path, out: Path, architecture: str) -> Path:
    from transformers import AutoModelForCausalLM

    from gonogo.export.hf import export_hf
    from gonogo.infer.device import load_for_inference

    tuned, _, _ = load_for_inference(step)
    exported = export_hf(step, out)
    assert json.loads((exported / "config.json").read_text())["architectures"] == [architecture]
    tokens = _chat_tokens(exported)
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, tuned(tokens), atol=1e-4, rtol=0)
    return exported


def _moved(step: Path, original: dict) -> set[str]:
    from gonogo.infer.device import load_for_inference

    tuned = load_for_inference(step)[0].state_dict()
    return {name for name, tensor in tuned.items() if not torch.equal(tensor, original[name])}


def _served_streams_equal_plain(directory: Path, workdir: Path) -> None:
    from gonogo.data.hf_tokenizer import HFTokenizer
    from tests.infer.conftest import API_KEY, start_server

    server = start_server(directory, workdir)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        messages = [{"role": "user", "content": PROMPT}]
        plain = client.chat.completions.create(model="gonogo", messages=messages, max_tokens=12, temperature=0)
        # the prompt is the model's own template, tokenized by its own tokenizer
        assert plain.usage.prompt_tokens == len(HFTokenizer(directory).apply_chat_template(messages, True)[0])
        assert plain.usage.completion_tokens > 0
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="gonogo", messages=messages, max_tokens=12, temperature=0, stream=True) if chunk.choices)
        # (a random model emits stray UTF-8 bytes too: U+FFFD in both is still equal text)
        assert streamed == plain.choices[0].message.content
        text = client.completions.create(model="gonogo", prompt=PROMPT, max_tokens=8, temperature=0)
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model="gonogo", prompt=PROMPT, max_tokens=8, temperature=0, stream=True) if chunk.choices)
        assert streamed == text.choices[0].text
    finally:
        server.stop()


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_finetune_full_and_lora_export_reload_and_serve(tiny_hf_models, chats, tmp_path, monkeypatch, name):
    from gonogo.checkpoints.hf_import import load_hf_dir

    monkeypatch.delenv("MASTER_ADDR", raising=False)  # a one-rank group of its own, not a torchrun job's
    source = tiny_hf_models[name]
    architecture = json.loads((source / "config.json").read_text())["architectures"][0]
    original = load_hf_dir(source)[0].state_dict()

    full = _finetune_in_process(source, tmp_path / "full", chats)
    meta = json.loads((full / "meta.json").read_text())
    assert meta["tokenizer"] == "hf" and meta["model"]["hf_architecture"] == architecture
    moved = _moved(full, original)
    assert any(".wq." in key for key in moved) and any("norm" in key for key in moved), moved
    if any(".moe." in key for key in original):  # the stacked experts and the router train too
        assert any(".experts.w2" in key for key in moved) and any(".router." in key for key in moved), moved
    full_export = _export_reloads_with_equal_logits(full, tmp_path / "full-hf", architecture)

    lora = _finetune_in_process(source, tmp_path / "lora", chats, "train.lora_rank=4")
    moved = _moved(lora, original)
    # the adapters moved the targeted projections (merged into them); norms, embeddings, router stayed
    assert moved and all(key.split(".")[-2] in PROJECTIONS for key in moved), moved
    assert any(".wq." in key for key in moved)
    _export_reloads_with_equal_logits(lora, tmp_path / "lora-hf", architecture)

    _served_streams_equal_plain(full_export, tmp_path)
