"""The byte-level tokenizer: 256 byte ids, then a handful of special tokens.

Byte-level means every string (any language, any code) round-trips exactly with no training step
and no vocabulary file, which is what a laptop-scale run of a tiny model needs. Ids 0..255 are
the UTF-8 bytes themselves; the special tokens follow. The same tokenizer is exported as a real
Hugging Face ``tokenizer.json`` (GPT-2-style byte-level BPE with no merges, so every byte is one
token with the same id) plus ``tokenizer_config.json`` carrying the chat template as Jinja, so
``transformers`` and vLLM tokenise and format chats exactly as gonogo does.

Chat format (one line per turn, shown with the special tokens spelled out)::

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

With ``add_generation_prompt`` a trailing ``<|assistant|>`` asks the model to answer. The SFT
loss covers an assistant turn's content and its closing ``<|end|>`` (so the model learns to stop),
never the role token or the other turns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

NAME = "byte-v1"
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLES = ("system", "user", "assistant")

# The same template for transformers (tokenizer_config.json). Role tokens are spelled
# '<|' + role + '|>', which is exactly SPECIAL_TOKENS for the three roles.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel BPE expects)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, special tokens from 256 on (see ``SPECIAL_TOKENS``)."""

    name = NAME

    def __init__(self) -> None:
        self.special_ids = {token: 256 + index for index, token in enumerate(SPECIAL_TOKENS)}
        self.special_tokens = {index: token for token, index in self.special_ids.items()}
        self.bos_id = self.special_ids["<|bos|>"]
        self.eos_id = self.special_ids["<|eos|>"]
        self.pad_id = self.special_ids["<|pad|>"]
        self.end_id = self.special_ids["<|end|>"]
        self.role_ids = {role: self.special_ids[f"<|{role}|>"] for role in ROLES}

    @property
    def vocab_size(self) -> int:
        """Ids in use (263); a model's vocab_size (384 by default) must be at least this."""
        return 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The UTF-8 bytes of ``text``. Special-token spellings inside ``text`` stay plain bytes,
        so user text can never inject a role token."""
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD, and
        ids beyond the vocabulary (a model's unused embedding rows) decode to nothing."""
        pieces: list[str] = []
        run = bytearray()
        for token in ids:
            token = int(token)
            if token < 256:
                run.append(token)
                continue
            if token not in self.special_tokens:
                # an unused id of a model's larger embedding (263..383) has no text; Hugging Face
                # tokenizers skip unknown ids the same way
                continue
            if not skip_special_tokens:
                pieces.append(run.decode("utf-8", errors="replace"))
                run.clear()
                pieces.append(self.special_tokens[token])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def is_special(self, token: int) -> bool:
        return token >= 256

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Ids of a chat and, per id, whether it is an assistant token the SFT loss should cover."""
        ids = [self.bos_id]
        mask = [False]
        for number, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in self.role_ids:
                raise ValueError(f"message {number}: role {role!r} is not one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"message {number}: content must be a string, got {type(content).__name__}")
            body = self.encode(content) + [self.end_id]
            ids.append(self.role_ids[role])
            mask.append(False)
            ids.extend(body)
            mask.extend([role == "assistant"] * len(body))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(False)
        return ids, mask

    def chat_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The chat as text with the special tokens spelled out (what transformers' template renders)."""
        ids, _ = self.apply_chat_template(messages, add_generation_prompt)
        return self.decode(ids, skip_special_tokens=False)

    # --- Hugging Face export -------------------------------------------------------------------

    def hf_tokenizer_json(self) -> dict:
        """A ``tokenizers`` library file: byte-level BPE, no merges, ids equal to the byte values."""
        byte_chars = _bytes_to_unicode()
        vocab = {byte_chars[byte]: byte for byte in range(256)}
        added = [
            {"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for token, index in self.special_ids.items()
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                "ignore_merges": False, "vocab": vocab, "merges": [],
            },
        }

    def hf_tokenizer_config(self) -> dict:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|bos|>",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "unk_token": None,
            "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template": CHAT_TEMPLATE,
        }

    def save_hf(self, directory: str | Path) -> list[Path]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.hf_tokenizer_config()
        files = {
            "tokenizer.json": self.hf_tokenizer_json(),
            "tokenizer_config.json": config,
            "special_tokens_map.json": {key: config[key] for key in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")},
        }
        written = []
        for name, content in files.items():
            path = directory / name
            path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
        return written
