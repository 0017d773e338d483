"""The KV cache gives the model exactly what a full forward would see."""

import torch

from gonogo.infer.cache import KVCache

from .conftest import tiny_model


def _cache(model, max_batch=4):
    config = model.config
    return KVCache(n_layers=config.n_layers, max_batch=max_batch, n_kv_heads=config.n_kv_heads,
                   max_len=config.max_seq_len, head_dim=config.head_dim)


def _step(model, cache, tokens, first_row=0):
    B, T = tokens.shape
    positions = cache.lengths[first_row:first_row + B, None] + torch.arange(T)[None]
    cache.begin(first_row, B, T)
    logits = model(tokens, positions=positions, cache=cache)
    cache.commit()
    return logits


def _incremental_matches_full(moe: bool) -> None:
    model = tiny_model(moe=moe)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = _cache(model)
        pieces = [_step(model, cache, tokens[:, :5])]
        for t in range(5, 12):
            pieces.append(_step(model, cache, tokens[:, t:t + 1]))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_incremental_decoding_equals_full_forward_dense():
    _incremental_matches_full(moe=False)


def test_incremental_decoding_equals_full_forward_moe():
    _incremental_matches_full(moe=True)


def test_rows_of_different_lengths_decode_together_as_they_would_alone():
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, length), generator=generator) for length in (3, 9, 6)]
    nexts = torch.randint(0, 256, (3, 1), generator=generator)
    with torch.no_grad():
        alone = [model(torch.cat([p, nexts[i:i + 1]], dim=1))[0, -1] for i, p in enumerate(prompts)]
        cache = _cache(model)
        for row, prompt in enumerate(prompts):
            _step(model, cache, prompt, first_row=row)
        batched = _step(model, cache, nexts)[:, -1]
    for row in range(3):
        torch.testing.assert_close(batched[row], alone[row], rtol=1e-4, atol=1e-4)
    assert cache.lengths[:3].tolist() == [4, 10, 7]


def test_move_row_keeps_a_sequence_decodable_in_its_new_row():
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)[0, -1]
        cache = _cache(model)
        _step(model, cache, tokens[:, :6], first_row=2)
        cache.move_row(2, 0)
        assert cache.lengths[:3].tolist() == [6, 0, 0]
        got = _step(model, cache, tokens[:, 6:7], first_row=0)[0, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
