"""A model's own tokenizer (``tokenizer.json``) and chat template, as transformers applies them.

Tokenization is the ``tokenizers`` library reading the model's ``tokenizer.json`` (the same Rust
code transformers' fast tokenizers run). The chat template is rendered by Jinja with the
environment transformers builds for ``apply_chat_template``: a sandbox with ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension, a ``{% generation %}`` block, and the globals and
filters templates rely on (``raise_exception``, ``strftime_now``, a ``tojson`` that keeps
non-ASCII text, ``namespace``, ``dict``); the special tokens (``bos_token``, ``eos_token``, ...)
are template variables, as in transformers. The rendered text is then tokenized with special
tokens matched and nothing added (transformers' ``add_special_tokens=False``): a special token's
spelling in a message therefore becomes that token, exactly as in transformers.

Stop ids are the union of ``generation_config.json``'s ``eos_token_id`` (an int or a list) and the
tokenizer's ``eos_token``. The SFT mask of a chat covers what each assistant turn adds to the
rendering (its content and the template's end-of-turn text), found by rendering the chat up to
each turn; a template that rewrites earlier turns (so a shorter chat is not a prefix of the
longer one) cannot be masked this way and is refused with a UserError.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

from gonogo.errors import UserError

NAME_PREFIX = "hf:"
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def _token_text(value: Any) -> Optional[str]:
    """A special token as saved: a string, or an AddedToken dict with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The template compiled in transformers' chat-template environment (see the module doc)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers marks assistant spans with it)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a template cannot set {name!r} on a namespace")
            super().__setitem__(name, value)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.globals["dict"] = dict
    environment.globals["namespace"] = Namespace
    return environment.from_string(source)


def _plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as transformers hands them to a template: None values dropped, reasoning aliased."""
    plain = []
    for message in messages:
        message = {key: value for key, value in dict(message).items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        plain.append(message)
    return plain


class HFTokenizer:
    """The tokenizer of a Hugging Face model directory, with ByteTokenizer's interface."""

    decode_in_context = True  # streaming decodes new ids after a few earlier ones (gonogo.infer.sampling)

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        if self.directory.is_file() and self.directory.name == "tokenizer.json":
            self.directory = self.directory.parent
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{self.directory}: no tokenizer.json (gonogo reads a model's tokenizer with the "
                            "`tokenizers` library; convert a slow/sentencepiece tokenizer with transformers first)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library's own exception type
            raise UserError(f"{path}: cannot be read by the tokenizers library ({error})") from None
        raw = path.read_bytes()
        self.name = NAME_PREFIX + hashlib.sha256(raw).hexdigest()[:16]
        config = {**_read_json(self.directory / "special_tokens_map.json"),
                  **_read_json(self.directory / "tokenizer_config.json")}
        self.config = config
        self.special_token_text = {key: _token_text(config.get(key)) for key in TEMPLATE_TOKENS
                                   if _token_text(config.get(key)) is not None}
        self.chat_template = self._find_template(config)
        self.added = {token.content: index for index, token in self.tokenizer.get_added_tokens_decoder().items()}
        self.special_ids = {index for index, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}

        def id_of(key: str) -> Optional[int]:
            text = self.special_token_text.get(key)
            return self.tokenizer.token_to_id(text) if text is not None else None

        self.bos_id, self.pad_id = id_of("bos_token"), id_of("pad_token")
        generation = _read_json(self.directory / "generation_config.json")
        eos = generation.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else [token for token in eos or [] if isinstance(token, int)]
        eos_token = id_of("eos_token")
        if eos_token is not None and eos_token not in eos_ids:
            eos_ids.append(eos_token)
        if not eos_ids:
            raise UserError(f"{self.directory}: no end-of-sequence token (eos_token in tokenizer_config.json or "
                            "eos_token_id in generation_config.json); generation could never stop")
        self.eos_ids = eos_ids
        self.eos_id = eos_ids[0]
        self.end_id = None  # every stop id is in eos_ids
        self.add_bos = bool(config.get("add_bos_token", False))

    def _find_template(self, config: dict) -> Optional[str]:
        jinja_file = self.directory / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template") or _read_json(self.directory / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    # -- the ByteTokenizer interface ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> set[int]:
        return set(self.eos_ids)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text`` with special-token spellings matched and nothing added (unless asked)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; an incomplete UTF-8 character at the end decodes as U+FFFD."""
        return self.tokenizer.decode([int(token) for token in ids], skip_special_tokens=skip_special_tokens)

    def is_special(self, token: int) -> bool:
        return int(token) in self.special_ids

    def chat_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The chat rendered by the model's template, as transformers' ``apply_chat_template(tokenize=False)``."""
        import jinja2

        if self.chat_template is None:
            raise UserError(f"{self.directory}: the tokenizer has no chat_template (tokenizer_config.json or "
                            "chat_template.jinja); chats need one")
        if not messages:
            raise ValueError("a chat needs at least one message")
        try:
            return compile_template(self.chat_template).render(
                messages=_plain_messages(messages), tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_token_text)
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"the chat template refused this chat: {error}") from None

    def apply_chat_template(self, messages: Sequence[dict],
                            add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Ids of a chat and, per id, whether it belongs to an assistant turn (the SFT loss's tokens)."""
        for number, message in enumerate(messages):
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {number}: content must be a string")
        text = self.chat_text(messages, add_generation_prompt)
        spans = []
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.chat_text(messages[:index], add_generation_prompt=True) if index else ""
            through = self.chat_text(messages[:index + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise UserError(f"{self.directory}: the chat template renders earlier turns differently once a "
                                "later turn follows, so the assistant's tokens cannot be told apart")
            spans.append((len(before), len(through)))
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        mask = [any(start < span_end and end > span_start for span_start, span_end in spans)
                for start, end in encoding.offsets]
        return list(encoding.ids), mask

    def save(self, directory: str | Path) -> list[Path]:
        """Copy the tokenizer's files (tokenizer.json, its configs, the chat template) into ``directory``."""
        import shutil

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name in TOKENIZER_FILES:
            source = self.directory / name
            if source.is_file() and name != "generation_config.json":
                shutil.copyfile(source, directory / name)
                written.append(directory / name)
        return written


def load_tokenizer(meta: dict):
    """The tokenizer a loaded model was made with: gonogo's byte tokenizer, or the model's own
    (``meta["tokenizer_dir"]``, the directory holding its tokenizer.json)."""
    from gonogo.data.tokenizer import NAME, ByteTokenizer

    name = meta.get("tokenizer") if isinstance(meta, dict) else None
    directory = meta.get("tokenizer_dir") if isinstance(meta, dict) else None
    if name == NAME and directory is None:
        return ByteTokenizer()
    if name is None and directory is None:
        source = (meta.get("source") or {}).get("path") if isinstance(meta, dict) else None
        raise UserError(f"{source or 'the model'}: has no tokenizer.json; gonogo needs the model's own tokenizer "
                        "(tokenizer.json with tokenizer_config.json) next to its weights to encode text")
    if directory is None:
        raise UserError(f"tokenizer {name!r}: the directory holding its tokenizer.json is unknown")
    return HFTokenizer(directory)


class TokenizedSource:
    """A text source read through a model's own tokenizer: each document is its ids and EOS, all trained.

    The packed loader takes (ids, mask) documents as they are, so the byte tokenizer's path is untouched.
    """

    def __init__(self, source, tokenizer: HFTokenizer):
        self.source = source
        self.tokenizer = tokenizer
        self.name = f"{source.name}+{tokenizer.name}"

    def __len__(self) -> int:
        return len(self.source)

    def document(self, index: int, epoch: int) -> tuple[list[int], list[bool]]:
        document = self.source.document(index, epoch)
        text = document if isinstance(document, str) else bytes(document).decode("utf-8", errors="replace")
        ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        return ids, [True] * len(ids)
