"""Choosing the next token, and deciding when a sequence has finished.

Each sequence carries its own ``torch.Generator`` seeded from the request, so a seeded request
gives the same tokens whether it runs alone or in a batch with others. Temperature 0 is greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 (or -1) = no top-k filter
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    ignore_eos: bool = False            # keep going past end-of-sequence tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def problem(self) -> Optional[str]:
        """Why these parameters cannot be sampled with (a user's mistake), or None.

        The server's request model checks the same ranges; this is the engine's own guard, so a
        caller that builds SamplingParams directly cannot take the engine thread down either.
        """
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            return f"temperature={self.temperature} must be a number in [0, {MAX_TEMPERATURE:g}]"
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            return f"top_p={self.top_p} must be a number in (0, 1]"
        if self.top_k < 0:
            return f"top_k={self.top_k} must be 0 (no limit) or more"
        if self.n < 1 or self.max_tokens < 1:
            return "n and max_tokens must be at least 1"
        if self.seed is not None and not (MIN_SEED <= self.seed and self.seed + self.n - 1 <= MAX_SEED):
            return (f"seed={self.seed} with n={self.n}: the seeds seed .. seed+n-1 must lie in "
                    f"[{MIN_SEED}, {MAX_SEED}] (a torch.Generator takes 64 bits)")
        return None


MAX_TEMPERATURE = 2.0
# what torch.Generator.manual_seed takes: a signed or an unsigned 64-bit integer
MIN_SEED = -(1 << 63)
MAX_SEED = (1 << 64) - 1


def make_generator(seed: Optional[int]) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # a fresh random seed: unseeded requests differ from each other
    elif not MIN_SEED <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed} is outside [{MIN_SEED}, {MAX_SEED}]")
    else:
        generator.manual_seed(seed)
    return generator


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a row of logits [vocab] (fp32 on CPU)."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the model produced non-finite logits (inf or NaN)")
    if params.greedy:
        return int(torch.argmax(logits))
    # float64, and the largest logit subtracted before dividing: any temperature down to the
    # smallest positive double then gives finite values (the top token's is exactly 0), where
    # fp32 would turn 1e-40 into a denormal and the logits into inf - inf = NaN
    logits = logits.double()
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probabilities, descending=True)
        # keep the smallest prefix whose mass reaches top_p; the top token always stays, however
        # small top_p is (a tiny top_p is greedy, never an all-zero distribution)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probabilities, 1, generator=generator))


class TextTracker:
    """Turns generated token ids into text deltas, honouring stop strings while streaming.

    Text that could still become the start of a stop string, or an incomplete UTF-8 character of
    the byte tokenizer (decoded as U+FFFD until its last byte arrives), is held back until it is
    decided, so a streamed response never shows text that the final one would not contain.
    Work per token is constant: only the undecided ids are decoded, only the tail is searched.
    """

    MAX_CHARACTER_TOKENS = 4   # a UTF-8 character is at most 4 bytes
    # A model's own tokenizer may decode a token differently at the start of a text (SentencePiece
    # drops the leading space of "▁word"): for one that says so (``decode_in_context``), pending ids
    # are decoded after a few final ones and only the new text is kept. The byte tokenizer needs not.
    CONTEXT_TOKENS = 4

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode = decode
        self.stop = [text for text in stop if text]
        self.longest_stop = max((len(text) for text in self.stop), default=0)
        self.pending: list[int] = []   # ids whose text is not final yet (a partial character)
        self.context: list[int] = []   # the last final ids, decoded before the pending ones
        self.in_context = bool(getattr(getattr(decode, "__self__", None), "decode_in_context", False))
        self.text = ""
        self.sent = 0                  # characters already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        self.pending.append(token_id)
        piece = self._decode_pending()
        if piece.endswith("\ufffd") and len(self.pending) < self.MAX_CHARACTER_TOKENS:
            return ""  # wait for the rest of the character
        if self.in_context:
            self.context = (self.context + self.pending)[-self.CONTEXT_TOKENS:]
        self.pending = []
        search_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += piece
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self._release(len(self.text))
        hold = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        """At the end of the sequence everything left is final."""
        if self.pending and not self.stopped:
            self.text += self._decode_pending()
            self.pending = []
        return self._release(len(self.text))

    def _decode_pending(self) -> str:
        if not self.context:
            return self.decode(self.pending)
        before = self.decode(self.context)
        both = self.decode(self.context + self.pending)
        return both[len(before):] if both.startswith(before) else self.decode(self.pending)

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta
