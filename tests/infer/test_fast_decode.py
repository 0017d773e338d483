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
