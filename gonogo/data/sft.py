"""Supervised finetuning data: chats, tokenised with the chat template and a loss mask.

Two kinds of examples:

- built in: the synthetic reasoning problems as chats (user = the question, assistant = the
  worked solution ending in ``#### answer``), so finetuning teaches the model to answer a chat
  turn in the corpus's format;
- the user's JSONL: one example per line, either ``{"messages": [{"role", "content"}, ...]}`` or
  ``{"prompt": ..., "completion": ...}``. Every line is validated; bad lines are reported with
  their line number and what is wrong, skipped and counted, and the file is refused (UserError)
  when the good fraction is below ``min_good_fraction``.

A chat source's documents are ``(ids, loss_mask)`` pairs, so the ordinary ``PackedLoader`` packs
them and turns every non-assistant target into -100.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from gonogo.data import synthetic
from gonogo.data.loader import PackedLoader
from gonogo.data.tokenizer import ROLES, ByteTokenizer
from gonogo.errors import UserError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
REPORTED_LINES = 20  # bad lines logged one by one; the rest only counted


class ChatSource:
    """Chats held in memory, tokenised when the loader asks for one."""

    def __init__(self, examples: Sequence[Messages], name: str, tokenizer=None) -> None:
        if not examples:
            raise UserError(f"{name}: no chat examples")
        self.examples = list(examples)
        self.name = name
        self.tokenizer = tokenizer or ByteTokenizer()

    def __len__(self) -> int:
        return len(self.examples)

    def document(self, index: int, epoch: int) -> tuple[list[int], list[bool]]:
        return self.tokenizer.apply_chat_template(self.examples[index])


# --- the user's JSONL ---------------------------------------------------------------------------


@dataclass
class SFTFile:
    """What reading a JSONL file gave: the good examples and the bad lines (number, problem)."""

    path: Path
    examples: list[Messages]
    bad_lines: list[tuple[int, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad_lines)

    @property
    def good_fraction(self) -> float:
        total = len(self.examples) + self.skipped
        return len(self.examples) / total if total else 0.0


def _check_messages(messages) -> Optional[str]:
    """What is wrong with a ``messages`` list, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{number}] is not an object"
        if message.get("role") not in ROLES:
            return f"messages[{number}].role is {message.get('role')!r}, not one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"messages[{number}].content is missing or not a string"
    if not any(message["role"] == "assistant" and message["content"] for message in messages):
        return "no non-empty assistant message (nothing to train on)"
    return None


def parse_example(line: str) -> tuple[Optional[Messages], Optional[str]]:
    """One JSONL line as chat messages, or the reason it is unusable."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        problem = _check_messages(record["messages"])
        if problem:
            return None, problem
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]], None
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return None, "'prompt' and 'completion' must both be strings"
        if not completion:
            return None, "'completion' is empty (nothing to train on)"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], None
    return None, "needs a 'messages' list or 'prompt' and 'completion' strings"


def read_sft_jsonl(path: str | Path, min_good_fraction: float = 0.9) -> SFTFile:
    """Read and validate a chat JSONL file; UserError when too few lines are usable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file (give a JSONL file of {{\"messages\": [...]}} or {{\"prompt\", \"completion\"}} lines)")
    result = SFTFile(path=path, examples=[])
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            messages, problem = parse_example(line)
            if problem:
                result.bad_lines.append((number, problem))
                if len(result.bad_lines) <= REPORTED_LINES:
                    log.warning("%s:%d: skipped: %s", path, number, problem)
            else:
                assert messages is not None  # no problem: the line parsed
                result.examples.append(messages)
    if result.skipped:
        log.warning("%s: skipped %d of %d lines (%.1f%% usable)", path, result.skipped,
                    result.skipped + len(result.examples), 100 * result.good_fraction)
    if not result.examples and not result.bad_lines:
        raise UserError(f"{path}: the file has no examples")
    if result.good_fraction < min_good_fraction:
        number, problem = result.bad_lines[0]
        raise UserError(f"{path}: only {len(result.examples)} of {len(result.examples) + result.skipped} lines are usable "
                        f"({100 * result.good_fraction:.0f}% < the minimum {100 * min_good_fraction:.0f}%); "
                        f"first bad line {number}: {problem}")
    return result


def _in_val(messages: Messages, val_percent: float) -> bool:
    key = json.dumps(messages, sort_keys=True).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 10_000 / 100.0 < val_percent


def make_sft_source(spec: str | Path = "synthetic", split: str = "train", *, seed: int = 0,
                    min_good_fraction: float = 0.9, val_percent: float = 5.0,
                    families: Optional[Sequence[str]] = None, tokenizer=None):
    """``synthetic`` (the reasoning chats) or a JSONL path; ``split`` is ``train`` or ``val``
    (a user file is split by a hash of each example)."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use train or val")
    if str(spec) == "synthetic":
        try:
            return synthetic.SyntheticSource(split, seed=seed, families=families, chat=True, tokenizer=tokenizer)
        except ValueError as error:
            raise UserError(str(error)) from None
    data = read_sft_jsonl(spec, min_good_fraction)
    examples = [messages for messages in data.examples if _in_val(messages, val_percent) == (split == "val")]
    if not examples:
        raise UserError(f"{data.path}: no examples in the {split!r} split ({val_percent:g}% go to validation); "
                        f"add more examples or change the validation percentage")
    return ChatSource(examples, name=f"{data.path}:{split}", tokenizer=tokenizer)


def sft_loader(source, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> PackedLoader:
    """Packed chat rows; targets are -100 outside assistant turns (see PackedLoader)."""
    return PackedLoader(source, seq_len, batch_size, rank, world_size, seed)
