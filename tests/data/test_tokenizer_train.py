"""`gonogo tokenizer train` and a trained tokenizer in [data] for pretraining."""

from __future__ import annotations

import json

import pytest

from gonogo.cli import main


def test_train_a_tokenizer_and_pretrain_with_it(tmp_path, capsys):
    from gonogo.data.hf_tokenizer import HFTokenizer
    from gonogo.data.loader import PackedLoader
    from gonogo.train.config import TrainConfig

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"line {n}: the cat sat on the mat 你好 🙂"}) for n in range(200)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--source", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "300-id tokenizer" in capsys.readouterr().out
    tokenizer = HFTokenizer(out)
    text = "the cat sat 你好 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text and len(tokenizer.encode(text)) < len(text.encode())
    assert tokenizer.chat_text([{"role": "user", "content": "hi"}], True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    config = TrainConfig.model_validate({"model": {"vocab_size": 320}, "data": {"source": str(corpus), "tokenizer": str(out)}})
    inputs, targets = next(iter(PackedLoader(config.data.open_source("train"), 32, 2)))
    assert int(inputs.max()) < 300 and tokenizer.eos_id in inputs.flatten().tolist() + targets.flatten().tolist()
    too_small = {"model": {"vocab_size": 256}, "data": {"source": str(corpus), "tokenizer": str(out)}}
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        TrainConfig.model_validate(too_small)


def test_a_used_output_directory_or_tiny_vocab_is_refused(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    assert main(["tokenizer", "train", "--source", "synthetic", "--out", str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "used" / "x").read_text() == "keep me"
    assert main(["tokenizer", "train", "--source", "synthetic", "--vocab-size", "100", "--out", str(tmp_path / "n")]) == 2
    assert "at least 259" in capsys.readouterr().err
