"""``gonogo tokenizer train``: a byte-level BPE tokenizer trained on the user's text with ``tokenizers``.

    gonogo tokenizer train --source corpus.jsonl --vocab-size 8192 --out tokenizers/mine

The result is a Hugging Face tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``
with a ChatML chat template, ``generation_config.json`` with the end-of-sequence id) that
``[data] tokenizer = "tokenizers/mine"`` uses for pretraining and finetuning; set
``model.vocab_size`` to at least the vocabulary size. Byte-level means every string still
encodes (no unknown token); the special tokens come first, so their ids are 0, 1, 2, ...
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from gonogo.errors import UserError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def _documents(source: str, text_field: str, max_documents: int):
    from gonogo.data.sources import make_source

    corpus = make_source(source, "train", text_field=text_field)
    for index in range(min(len(corpus), max_documents)):
        document = corpus.document(index, 0)
        yield document if isinstance(document, str) else bytes(document).decode("utf-8", errors="replace")


def train_tokenizer(source: str, out: Path, vocab_size: int, *, text_field: str = "text",
                    max_documents: int = 20_000) -> Path:
    """Train and write the tokenizer directory ``out`` (new or empty); UserError for bad input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {vocab_size}: at least {MIN_VOCAB} (256 bytes and {len(SPECIAL_TOKENS)} special tokens)")
    if max_documents < 1:
        raise UserError("--max-documents must be at least 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose another --out")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_documents(source, text_field, max_documents), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "add_bos_token": False, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"eos_token_id": [tokenizer.token_to_id("<|im_end|>"), eos], "pad_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    log.info("trained a %d-id tokenizer on %s into %s", tokenizer.get_vocab_size(), source, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train a byte-level BPE on a corpus")
    train.add_argument("--source", required=True,
                       help="'synthetic', 'stdlib', or a text/JSONL/Parquet file or directory (as [data] source)")
    train.add_argument("--out", type=Path, required=True, help="the new tokenizer directory")
    train.add_argument("--vocab-size", type=int, default=8192, help="ids in the vocabulary (default 8192)")
    train.add_argument("--text-field", default="text", help="the JSONL field / Parquet column with the text")
    train.add_argument("--max-documents", type=int, default=20_000, help="documents read from the source at most")


def command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gonogo.data.hf_tokenizer import HFTokenizer

    out = train_tokenizer(args.source, args.out, args.vocab_size, text_field=args.text_field,
                          max_documents=args.max_documents)
    size = HFTokenizer(out).vocab_size
    Console().print(f"trained a {size}-id tokenizer into {out}; use it with [data] tokenizer = \"{out}\" "
                    f"and model.vocab_size >= {size}")
    return 0
