"""The KV cache: one preallocated buffer per layer, a row per sequence, a length per row.

Layout: ``keys[layer]`` and ``values[layer]`` are ``[max_batch, n_kv_heads, max_len, head_dim]``.
The running sequences always occupy rows ``0 .. active-1`` (a finished sequence's row is filled
by moving the last row into it), so the attention of a decode step reads a plain slice
``[:active, :, :longest]`` of the buffer: no gather, no copy, no padding tensors per step.

The model calls ``update(layer_index, k, v)`` from every attention layer (the cache protocol of
``gonogo.model.decoder.Decoder``). Before a forward the engine says which rows the batch covers
(``begin``); after it, ``commit`` advances those rows' lengths by the tokens just written.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    def __init__(
        self,
        *,
        n_layers: int,
        max_batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (max_batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(max_batch, dtype=torch.long)
        self.max_batch = max_batch
        self.max_len = max_len
        self.device = torch.device(device)
        # the rows and length of the forward in progress (set by begin, cleared by commit)
        self._rows: Optional[slice] = None
        self._new_tokens = 0
        self._lengths: list[int] = []
        self._end = 0
        self._uniform = True
        self._mask: Optional[torch.Tensor] = None
        # rows of different lengths: where each new token goes ([B, 1] rows, [B, T] positions)
        self._row_index: Optional[torch.Tensor] = None
        self._positions: Optional[torch.Tensor] = None

    # -- the engine's side ------------------------------------------------------------------
    def begin(self, first_row: int, batch: int, new_tokens: int) -> None:
        """The next forward writes ``new_tokens`` positions into rows ``first_row .. +batch``."""
        assert self._rows is None, "begin() twice without commit()"
        assert 0 <= first_row and first_row + batch <= self.max_batch
        rows = slice(first_row, first_row + batch)
        lengths = self.lengths[rows]
        # python ints once per forward, not per layer: decoding a small model is overhead-bound
        self._lengths = lengths.tolist()
        self._end = max(self._lengths) + new_tokens
        assert self._end <= self.max_len, "sequence longer than the cache"
        self._rows = rows
        self._new_tokens = new_tokens
        # rows of equal length need no mask (plain causal: the model's fast path); else an exact one
        self._uniform = min(self._lengths) == self._end - new_tokens
        if self._uniform:
            self._mask = self._row_index = self._positions = None
        else:
            self._mask = self._build_mask(lengths, new_tokens).to(self.device)
            self._row_index = torch.arange(first_row, first_row + batch, device=self.device)[:, None]
            self._positions = (lengths[:, None] + torch.arange(new_tokens)[None, :]).to(self.device)

    def commit(self, lengths: Optional[list[int]] = None) -> None:
        """The rows' lengths grow by the tokens just written; or, for a right-padded prefill of
        prompts of different lengths, by each row's own ``lengths`` (the padding beyond is garbage
        that the next tokens overwrite: nothing attends to a position at or past a row's length)."""
        assert self._rows is not None, "commit() without begin()"
        if lengths is None:
            self.lengths[self._rows] += self._new_tokens
        else:
            assert len(lengths) == self._rows.stop - self._rows.start
            assert all(0 < length <= self._new_tokens for length in lengths)
            self.lengths[self._rows] += torch.tensor(lengths, dtype=self.lengths.dtype)
        self._rows = None
        self._mask = self._row_index = self._positions = None

    def advance(self, batch: int) -> None:
        """Rows 0 .. batch-1 grew by one token that a forward wrote into the buffers itself, without
        begin/commit (the compiled decode step: gonogo/infer/fast_decode.py ``decode_step``)."""
        assert self._rows is None, "advance() inside a begin() ... commit()"
        self.lengths[:batch] += 1

    def abandon(self) -> None:
        """Forget a begin() whose forward raised (nothing was committed)."""
        self._rows = None
        self._mask = self._row_index = self._positions = None

    def reset_row(self, row: int) -> None:
        self.lengths[row] = 0

    def move_row(self, source: int, target: int) -> None:
        """Copy ``source``'s cached keys and values into ``target`` (to keep rows contiguous)."""
        if source == target:
            return
        length = int(self.lengths[source])
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]
        self.lengths[target] = length
        self.lengths[source] = 0

    def copy_row(self, source: int, targets: list[int]) -> None:
        """Share a prefilled prompt with other rows (the n > 1 choices of one request)."""
        length = int(self.lengths[source])
        for keys, values in zip(self.keys, self.values):
            for target in targets:
                keys[target, :, :length] = keys[source, :, :length]
                values[target, :, :length] = values[source, :, :length]
        for target in targets:
            self.lengths[target] = length

    # -- the model's side (the cache protocol) ----------------------------------------------
    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys and values; return everything the rows may attend to.

        The mask is None when every row has the same length: the new queries are then the last
        positions of all keys and plain causal attention is exact.
        """
        rows = self._rows
        assert rows is not None, "the engine must call begin() before the forward"
        batch, _, new_tokens, _ = k.shape
        assert batch == rows.stop - rows.start and new_tokens == self._new_tokens
        keys, values = self.keys[layer_index], self.values[layer_index]
        if self._uniform:
            # the usual case (a decode step of equal rows, or a prefill): one slice assignment
            start = self._lengths[0]
            keys[rows, :, start:start + new_tokens] = k
            values[rows, :, start:start + new_tokens] = v
        else:
            # rows of different lengths (decoding after a join): one scattered write for all rows,
            # [B, T] (row, position) pairs each taking a [kv_heads, head_dim] vector
            keys[self._row_index, :, self._positions] = k.transpose(1, 2)
            values[self._row_index, :, self._positions] = v.transpose(1, 2)
        return keys[rows, :, :self._end], values[rows, :, :self._end], self._mask

    @staticmethod
    def _build_mask(lengths: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """[B, 1, T_new, T_all] bool: row b's new token i sees keys 0 .. lengths[b] + i."""
        end = int(lengths.max()) + new_tokens
        key_positions = torch.arange(end)
        query_positions = lengths[:, None] + torch.arange(new_tokens)[None, :]   # [B, T_new]
        mask = key_positions[None, None, :] <= query_positions[:, :, None]       # [B, T_new, T_all]
        return mask[:, None]
