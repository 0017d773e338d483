import random

import pytest

from gonogo.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer
from gonogo.model.shape import ModelConfig

TEXTS = ["", "plain ascii", "Héllo wörld — ünïcode", "你好，世界", "emoji 🎉👩‍👩‍👧 flags 🇫🇷",
         "tabs\tand\nnewlines\r\n  spaces  ", "<|bos|> spelled out stays bytes", "\x00\x7f control"]


def random_unicode(rng: random.Random, length: int) -> str:
    chars = []
    while len(chars) < length:
        code = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0x800), rng.randrange(0x800, 0xD800),
                           rng.randrange(0xE000, 0x10000), rng.randrange(0x10000, 0x110000)])
        chars.append(chr(code))
    return "".join(chars)


def test_round_trip_arbitrary_unicode():
    tokenizer = ByteTokenizer()
    rng = random.Random(0)
    for text in TEXTS + [random_unicode(rng, rng.randrange(1, 80)) for _ in range(300)]:
        ids = tokenizer.encode(text, bos=True, eos=True)
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert all(0 <= token < 256 for token in ids[1:-1])
        assert tokenizer.decode(ids) == text


def test_special_ids_distinct_and_fit_the_model_vocab():
    tokenizer = ByteTokenizer()
    ids = [tokenizer.special_ids[token] for token in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) == 7
    assert all(256 <= token < ModelConfig().vocab_size for token in ids)
    assert tokenizer.vocab_size == 263 <= ModelConfig().vocab_size
    assert len({tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}) == 3


def test_decode_keeps_specials_only_when_asked():
    tokenizer = ByteTokenizer()
    ids = [tokenizer.bos_id] + tokenizer.encode("hi") + [tokenizer.eos_id]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|bos|>hi<|eos|>"
    # ids a 384-row model can sample but the tokenizer does not use decode to nothing
    assert tokenizer.decode(tokenizer.encode("a") + [300, 383] + tokenizer.encode("b")) == "ab"
    # a character cut in half decodes to the replacement character, not an exception
    assert tokenizer.decode(tokenizer.encode("é")[:1]) == "\ufffd"


def test_chat_template_mask_covers_assistant_content_and_end_only():
    tokenizer = ByteTokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="},
                {"role": "assistant", "content": "#### 4"}]
    ids, mask = tokenizer.apply_chat_template(messages)
    assert len(ids) == len(mask)
    trained = [token for token, keep in zip(ids, mask) if keep]
    assert trained == tokenizer.encode("#### 4") + [tokenizer.end_id]
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|bos|><|system|>be brief<|end|><|user|>2+2=<|end|><|assistant|>#### 4<|end|>")
    prompt, prompt_mask = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert prompt[-1] == tokenizer.role_ids["assistant"] and not any(prompt_mask)
    assert ids[:len(prompt)] == prompt  # the generation prompt is a prefix of the full chat
    with pytest.raises(ValueError, match="role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_hugging_face_tokenizer_gives_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer = ByteTokenizer()
    tokenizer.save_hf(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    rng = random.Random(1)
    for text in TEXTS[:-2] + [random_unicode(rng, 40) for _ in range(50)]:
        ids = tokenizer.encode(text)
        assert fast.encode(text) == ids
        assert fast.decode(ids) == text
    special_ids = [tokenizer.special_ids[token] for token in SPECIAL_TOKENS]
    assert fast.convert_ids_to_tokens(special_ids) == list(SPECIAL_TOKENS)
    assert fast.decode([97, 300, 98]) == tokenizer.decode([97, 300, 98]) == "ab"


def test_hugging_face_chat_template_renders_the_same_chat(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer = ByteTokenizer()
    tokenizer.save_hf(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    messages = [{"role": "user", "content": "47+385="}, {"role": "assistant", "content": "7+5=12 c1; #### 432"},
                {"role": "user", "content": "and 1+1= ?"}]
    for generation_prompt in (False, True):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert text == tokenizer.chat_text(messages, generation_prompt)
        ids, _ = tokenizer.apply_chat_template(messages, generation_prompt)
        assert hf.encode(text, add_special_tokens=False) == ids
