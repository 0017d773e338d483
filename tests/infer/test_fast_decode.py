"""The fused inference forward computes the Decoder's logits."""

import pytest
import torch

from gonogo.infer.cache import KVCache
from gonogo.infer.fast_decode import FastDecoder

from .conftest import tiny_model


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fused_prefill_and_decode_match_the_decoder(moe):
    model = tiny_model(moe=moe)
    fast = FastDecoder(model)
    config = model.config
    cache = KVCache(n_layers=config.n_layers, max_batch=2, n_kv_heads=config.n_kv_heads,
                    max_len=config.max_seq_len, head_dim=config.head_dim)
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 256, (1, length), generator=generator) for length in (5, 11)]
    nexts = torch.randint(0, 256, (2, 1), generator=generator)
    with torch.no_grad():
        for row, tokens in enumerate(rows):
            cache.begin(row, 1, tokens.shape[1])
            got = fast(tokens, positions=torch.arange(tokens.shape[1])[None], cache=cache)
            cache.commit()
            torch.testing.assert_close(got[0, -1], model(tokens)[0, -1], rtol=1e-4, atol=1e-4)
        cache.begin(0, 2, 1)  # rows of different lengths: the cache's mask is used
        got = fast(nexts, positions=cache.lengths[:2, None].clone(), cache=cache)
        cache.commit()
        for row, tokens in enumerate(rows):
            expected = model(torch.cat([tokens, nexts[row:row + 1]], dim=1))[0, -1]
            torch.testing.assert_close(got[row, -1], expected, rtol=1e-4, atol=1e-4)


def decode_inputs(model, lengths=(5, 11, 8)):
    """A cache whose rows hold prompts of different lengths (prefilled one by one), and next tokens."""
    config = model.config
    cache = KVCache(n_layers=config.n_layers, max_batch=4, n_kv_heads=config.n_kv_heads,
                    max_len=config.max_seq_len, head_dim=config.head_dim)
    fast = FastDecoder(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for row, length in enumerate(lengths):
            cache.begin(row, 1, length)
            fast(torch.randint(0, 256, (1, length), generator=generator), positions=torch.arange(length)[None],
                 cache=cache)
            cache.commit()
    return fast, cache, torch.randint(0, 256, (len(lengths), 1), generator=generator)


def test_the_compilable_decode_step_computes_the_cached_forward():
    """decode_step (what `serve --compile` compiles) against the forward with the cache's exact mask:
    the same logits for rows of different lengths, and the same keys and values written."""
    model = tiny_model()
    fast, cache, nexts = decode_inputs(model)
    _, reference_cache, _ = decode_inputs(model)
    B = nexts.shape[0]
    with torch.no_grad():
        positions = cache.lengths[:B].clone()
        got = fast.decode_step(nexts, positions, cache.keys, cache.values, 64)
        reference_cache.begin(0, B, 1)
        expected = fast(nexts, positions=positions[:, None], cache=reference_cache)[:, -1]
        reference_cache.commit()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for layer in range(model.config.n_layers):
        for row in range(B):
            end = int(positions[row]) + 1
            torch.testing.assert_close(cache.keys[layer][row, :, :end], reference_cache.keys[layer][row, :, :end])
            torch.testing.assert_close(cache.values[layer][row, :, :end], reference_cache.values[layer][row, :, :end])


def test_the_decode_step_traces_into_one_graph_without_breaks():
    """A graph break would silently run most of the step eagerly again (as a symbolic `H != KV`
    once did): the whole step must be one graph, for any batch size and attended length."""
    fast, cache, nexts = decode_inputs(tiny_model())
    torch._dynamo.reset()
    # every size symbolic, as torch.compile(dynamic=True) in gonogo/infer/engine.py makes them
    with torch.no_grad(), torch._dynamo.config.patch(assume_static_by_default=False):
        explanation = torch._dynamo.explain(fast.decode_step)(
            nexts, cache.lengths[:3].clone(), cache.keys, cache.values, 64)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
