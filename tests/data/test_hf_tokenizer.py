"""A model's own tokenizer: transformers' chat rendering and ids, stop ids, streaming of multi-byte text."""

from __future__ import annotations

import json

import pytest

from gonogo.data.hf_tokenizer import HFTokenizer
from gonogo.errors import UserError
from gonogo.infer.sampling import TextTracker

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3? 你好 🙂"},
        {"role": "assistant", "content": "  5, héllo 🎉  "},
        {"role": "user", "content": "and 7*6? 世界"}]
MISTRAL_CHAT = CHAT[1:]  # its template allows no system turn
TEXT = "emoji 🙂🎉👍🏽 CJK 你好世界，日本語 ünïcödé"


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral"])  # one per template family
def test_chat_renders_and_tokenizes_as_transformers_does(tiny_hf_models, name):
    from transformers import AutoTokenizer

    directory = tiny_hf_models[name]
    ours, theirs = HFTokenizer(directory), AutoTokenizer.from_pretrained(directory)
    chat = MISTRAL_CHAT if name == "mistral" else CHAT
    for generation_prompt in (False, True):
        text = ours.chat_text(chat, add_generation_prompt=generation_prompt)
        assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        ids, mask = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt)
        assert ids == list(theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, return_dict=False))
        assert len(mask) == len(ids)
    # the loss covers the assistant's reply and the template's end of turn, nothing of the other turns
    answer = ours.decode([token for token, masked in zip(ids, mask) if masked], skip_special_tokens=False)
    assert answer.strip().startswith("5, héllo 🎉") and "What is" not in answer and "7*6" not in answer
    assert answer.rstrip().endswith(theirs.eos_token if name != "llama" else "<|eot_id|>")
    assert ours.encode(TEXT) == theirs.encode(TEXT, add_special_tokens=False)
    assert ours.decode(ours.encode(TEXT)) == TEXT


def test_stop_ids_are_every_eos_of_the_generation_config(tiny_hf_models):
    tokenizer = HFTokenizer(tiny_hf_models["llama"])
    generation = json.loads((tiny_hf_models["llama"] / "generation_config.json").read_text())
    assert isinstance(generation["eos_token_id"], list) and len(generation["eos_token_id"]) == 2
    assert tokenizer.stop_ids == set(generation["eos_token_id"])  # <|eot_id|> (the eos_token) is among them
    assert tokenizer.is_special(tokenizer.eos_id) and not tokenizer.is_special(tokenizer.encode("a")[0])


def test_a_template_error_is_a_value_error_and_no_template_a_user_error(tmp_path, tiny_hf_models):
    import shutil

    mistral = HFTokenizer(tiny_hf_models["mistral"])
    with pytest.raises(ValueError, match="roles must alternate"):
        mistral.chat_text([{"role": "assistant", "content": "hi"}])
    bare = tmp_path / "bare"
    shutil.copytree(tiny_hf_models["qwen3"], bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no chat_template"):
        HFTokenizer(bare).chat_text(CHAT)


def _streamed(tokenizer, ids) -> str:
    tracker = TextTracker(tokenizer.decode, [])
    pieces = [tracker.add(token) for token in ids] + [tracker.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    return "".join(pieces)


def test_streaming_detokenization_keeps_multibyte_characters_whole(tiny_hf_models):
    tokenizer = HFTokenizer(tiny_hf_models["qwen3"])
    ids = tokenizer.encode(TEXT)
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)  # characters do span several tokens
    assert _streamed(tokenizer, ids) == TEXT


def test_streaming_keeps_sentencepiece_word_spaces(tmp_path):
    """A Metaspace ("▁word") tokenizer drops the leading space when a text starts with the token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["</s>"], show_progress=False)
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    ours = HFTokenizer(tmp_path)
    text = "the lazy fox jumps over the dog"
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids[1:2]) == ours.decode(ids[1:2]).lstrip()  # a word alone loses its space
    assert _streamed(ours, ids) == text


def test_a_model_without_its_tokenizer_is_refused_not_given_the_byte_tokenizer(tmp_path, tiny_hf_models):
    import shutil

    from gonogo.data.hf_tokenizer import load_tokenizer
    from gonogo.checkpoints.hf_import import load_hf_dir

    bare = tmp_path / "bare"
    shutil.copytree(tiny_hf_models["qwen2"], bare)
    (bare / "tokenizer.json").unlink()
    _model, _config, meta = load_hf_dir(bare)  # the weights alone still load (finetune, export)
    with pytest.raises(UserError, match="has no tokenizer.json"):
        load_tokenizer(meta)
