"""The packed, sharded, exactly resumable loader.

The global token stream: the documents of epoch 0 in a seeded shuffled order, each followed by
EOS, then epoch 1 in another order, and so on without end. It is cut into rows of
``seq_len + 1`` tokens; global row ``g`` goes to data-parallel rank ``g % world_size``, so rank
``r`` takes rows ``r, r + W, r + 2W, ...``. A batch is a rank's next ``batch_size`` rows, and
``(inputs, targets) = (row[:-1], row[1:])``; a target is -100 (ignored by cross entropy) where
the source marks a token as not trained on (the non-assistant tokens of an SFT chat).

Every rank walks the whole global stream (cheap with byte tokens) and keeps its own rows, so all
ranks agree on the position: the state after a batch — (epoch, document position, token offset,
global rows consumed) — is the same on every rank and names a point in the global stream that
does not depend on the world size, batch size or row length. Hence:

- resuming with the same settings yields exactly the batches the uninterrupted loader would;
- resuming at another world size (2 → 1, 1 → 2, any) or batch size continues the global stream
  from the same token with nothing repeated or skipped (the new ranks split the rows from there);
- only the seed and the source must match (checked: a UserError names both).
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import numpy as np
import torch

from gonogo.data.sources import Source
from gonogo.data.tokenizer import ByteTokenizer
from gonogo.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
STATE_VERSION = 1


class PackedLoader:
    """Infinite iterator of ``(inputs, targets)`` LongTensor[B, seq_len] for one rank."""

    def __init__(self, source: Source, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, tokenizer: Optional[ByteTokenizer] = None) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if len(source) < 1:
            raise ValueError(f"{source.name}: the source has no documents")
        self.source = source
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.tokenizer = tokenizer or ByteTokenizer()
        # position in the global stream: the next token is document `order[position]` of `epoch`,
        # at token `offset` of that document (its EOS included)
        self.epoch = 0
        self.position = 0
        self.offset = 0
        self.rows = 0  # global rows consumed
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._current: Optional[tuple[int, int, np.ndarray, Optional[np.ndarray]]] = None

    # --- the stream -------------------------------------------------------------------------------

    def _order_of(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            generator = np.random.default_rng([self.seed, epoch])
            self._order = generator.permutation(len(self.source))
            self._order_epoch = epoch
        return self._order

    def _tokens(self, document) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """A document's tokens (EOS appended for plain text) and its loss mask (None: all trained)."""
        if isinstance(document, tuple):
            ids, mask = document
            assert len(ids) == len(mask), "an SFT document needs one mask entry per token"
            return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
        data = document.encode("utf-8") if isinstance(document, str) else bytes(document)
        tokens = np.empty(len(data) + 1, dtype=np.int64)
        tokens[:-1] = np.frombuffer(data, dtype=np.uint8)
        tokens[-1] = self.tokenizer.eos_id
        return tokens, None

    def _document(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        key = (self.epoch, self.position)
        if self._current is None or self._current[:2] != key:
            index = int(self._order_of(self.epoch)[self.position])
            tokens, mask = self._tokens(self.source.document(index, self.epoch))
            self._current = (*key, tokens, mask)
        return self._current[2], self._current[3]

    def _advance_document(self) -> None:
        self.offset = 0
        self.position += 1
        if self.position == len(self.source):
            self.position = 0
            self.epoch += 1

    def _take_row(self, keep: bool) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The next row of seq_len + 1 tokens (and its mask), or just skip past it."""
        need = self.seq_len + 1
        token_parts, mask_parts = [], []
        while need:
            tokens, mask = self._document()
            end = min(len(tokens), self.offset + need)
            if keep:
                token_parts.append(tokens[self.offset:end])
                mask_parts.append(mask[self.offset:end] if mask is not None else np.ones(end - self.offset, dtype=bool))
            need -= end - self.offset
            self.offset = end
            if self.offset == len(tokens):
                self._advance_document()
        self.rows += 1
        if not keep:
            return None
        return np.concatenate(token_parts), np.concatenate(mask_parts)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        masks = np.empty((self.batch_size, self.seq_len + 1), dtype=bool)
        for slot in range(self.batch_size):
            for rank in range(self.world_size):
                row = self._take_row(keep=rank == self.rank)
                if row is not None:
                    rows[slot], masks[slot] = row
        inputs = torch.from_numpy(rows[:, :-1].copy())
        targets = torch.from_numpy(np.where(masks[:, 1:], rows[:, 1:], IGNORE_INDEX))
        return inputs, targets

    # --- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The global stream position after the last batch (identical on every rank)."""
        return {
            "version": STATE_VERSION,
            "source": self.source.name,
            "documents_per_epoch": len(self.source),
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "offset": self.offset,
            "rows": self.rows,
            # for information: what produced the rows (a resume may change these)
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (saved by any rank, at any world size or batch size)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}; "
                            f"it was written by another gonogo version (resume with --resume never)")
        mine = (self.source.name, len(self.source), self.seed)
        theirs = (state["source"], state["documents_per_epoch"], state["seed"])
        if mine != theirs:
            raise UserError(f"the checkpoint's data stream is source/documents/seed {theirs}, this run has {mine}; "
                            f"resume with the same data source and seed")
        self.epoch, self.position, self.offset = int(state["epoch"]), int(state["position"]), int(state["offset"])
        self.rows = int(state["rows"])
        self._current = None
        if (state["world_size"], state["batch_size"], state["seq_len"]) != (self.world_size, self.batch_size, self.seq_len):
            log.info("resuming the data stream at global row %d (token position of epoch %d, document %d) with "
                     "world_size/batch_size/seq_len %s instead of %s", self.rows, self.epoch, self.position,
                     (self.world_size, self.batch_size, self.seq_len),
                     (state["world_size"], state["batch_size"], state["seq_len"]))


class ValidationBatches:
    """Fixed validation batches: the first ``num_batches`` of a loader over the held-out source,
    made once, so every call sees the same tokens."""

    def __init__(self, source: Source, seq_len: int, batch_size: int, num_batches: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        loader = PackedLoader(source, seq_len, batch_size, rank, world_size, seed)
        self.batches = [next(loader) for _ in range(num_batches)]
        if loader.epoch > 0:
            log.warning("%s: the validation set is smaller than %d batches of %d x %d tokens per rank; "
                        "it repeats", source.name, num_batches, batch_size, seq_len)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)
