"""`gonogo serve` on imported Hugging Face models: their chat template and stop ids, through the real openai client."""

from __future__ import annotations

import openai
import pytest

from gonogo.data.hf_tokenizer import HFTokenizer
from tests.infer.conftest import API_KEY, start_server

PROMPTS = ["Q: 614*2= A: say it 🙂🎉 in 中文，日本語"]


@pytest.mark.parametrize("name", ["llama"])  # sharded, Llama 3 RoPE, a list of eos ids
def test_streamed_chat_equals_plain_chat_with_the_models_template(tiny_hf_models, tmp_path, name):
    server = start_server(tiny_hf_models[name], tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        tokenizer = HFTokenizer(tiny_hf_models[name])
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            plain = client.chat.completions.create(model="gonogo", messages=messages, max_tokens=24, temperature=0)
            # the prompt is the model's own template, tokenized by its own tokenizer
            assert plain.usage.prompt_tokens == len(tokenizer.apply_chat_template(messages, True)[0])
            chunks = list(client.chat.completions.create(model="gonogo", messages=messages, max_tokens=24,
                                                         temperature=0, stream=True))
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            # (a random model emits stray UTF-8 bytes too: U+FFFD in both is still equal text)
            assert streamed == plain.choices[0].message.content
            text = client.completions.create(model="gonogo", prompt=prompt, max_tokens=16, temperature=0)
            streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
                model="gonogo", prompt=prompt, max_tokens=16, temperature=0, stream=True) if chunk.choices)
            assert streamed == text.choices[0].text
    finally:
        server.stop()
