"""The built-in byo-model plan on a tiny random Qwen3 made by the test fixture (real torchrun, servers, clients)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_gonogo


def _chats(path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"double {n} 🙂"},
                                      {"role": "assistant", "content": f"2 × {n} = {2 * n}\n#### {2 * n}"}]})
             for n in range(60)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _answers_in_text(source, directory):
    """A copy of the random model that never starts a reply with a special token, as a trained one would not.

    Random weights put every token, end-of-turn included, first now and then; the load generator counts
    an empty reply as a failed request. Hidden dimension 0 is made a constant of the residual stream and
    the special tokens' output rows read it with a negative weight, so their logits are far below the rest.
    """
    from safetensors.torch import load_file, save_file

    from gonogo.data.hf_tokenizer import HFTokenizer

    shutil.copytree(source, directory)
    weights = load_file(str(directory / "model.safetensors"))
    weights["model.embed_tokens.weight"][:, 0] = 30.0
    special = sorted(HFTokenizer(directory).special_ids)
    weights["lm_head.weight"][:, 0] = 0.0
    weights["lm_head.weight"][special, 0] = -5.0
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.mark.slow
def test_byo_model_plan_is_go_on_a_tiny_qwen3(tmp_path, tiny_hf_models):
    model = _answers_in_text(tiny_hf_models["qwen3"], tmp_path / "qwen3")
    out = tmp_path / "run"
    result = run_gonogo("run", "byo-model", f"model={model}", f"data={_chats(tmp_path / 'chats.jsonl')}",
                        "--out", out, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "GO"
    assert [stage["name"] for stage in summary["stages"]] == ["finetune", "eval", "quantize", "serve", "loadtest", "canary"]
    assert all(stage["status"] == "passed" for stage in summary["stages"])
    meta = json.loads(next((out / "checkpoints" / "finetune").glob("step-*/meta.json")).read_text())
    assert meta["model"]["hf_architecture"] == "Qwen3ForCausalLM" and meta["tokenizer"] == "hf"


def test_byo_model_plan_names_the_field_it_cannot_honour(tmp_path, tiny_hf_models):
    model = tmp_path / "windowed"
    shutil.copytree(tiny_hf_models["qwen3"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=32, max_window_layers=0, layer_types=["sliding_attention"] * 2)
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    result = run_gonogo("run", "byo-model", f"model={model}", f"data={_chats(tmp_path / 'chats.jsonl')}",
                        "--out", out, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "ERROR" and summary["stages"][0]["status"] != "passed"  # a user error: not a verdict on the model
    assert summary["reasons"][0].startswith("stage 'finetune' error: ")
    assert "use_sliding_window / layer_types: sliding-window attention (window 32" in summary["reasons"][0]
    assert "use_sliding_window" in result.stdout
