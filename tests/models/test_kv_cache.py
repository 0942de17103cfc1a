"""The per-sequence KV cache on its own: growth, truncation, clones, export/import."""

from __future__ import annotations

import pytest
import torch

from raysys.models.kv_cache import KVCache, KVState


def filled_cache(num_tokens: int, block_size: int = 4) -> KVCache:
    cache = KVCache(2, 3, 8, block_size=block_size)
    cache.reserve(num_tokens)
    keys = torch.arange(3 * num_tokens * 8, dtype=torch.float32).view(3, num_tokens, 8)
    for layer in range(2):
        cache.write(layer, 0, keys + layer, -keys - layer)
    cache.num_tokens = num_tokens
    return cache


@pytest.mark.parametrize("num_tokens", [3, 4, 5, 9])
def test_growth_keeps_what_is_cached(num_tokens):
    cache = filled_cache(num_tokens)
    before = cache.export().kv
    assert cache.capacity % 4 == 0 and cache.capacity >= num_tokens
    cache.reserve(num_tokens + 7)
    assert cache.capacity >= num_tokens + 7 and cache.capacity % 4 == 0
    assert torch.equal(cache.export().kv, before)
    keys, values = cache.keys_values(1, num_tokens)
    assert torch.equal(keys, before[1, 0]) and torch.equal(values, -keys)


def test_truncate_clone_and_export_are_independent():
    cache = filled_cache(6)
    copy = cache.clone()
    state = cache.export()
    cache.truncate(2)
    cache.write(0, 2, torch.zeros(3, 4, 8), torch.zeros(3, 4, 8))
    assert copy.num_tokens == 6 and state.num_tokens == 6
    assert torch.equal(copy.export().kv, state.kv)  # untouched by the writes
    assert cache.export().kv.shape == (2, 2, 3, 2, 8)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=f"to {bad}; pass a length in \\[0, 2\\]"):
            cache.truncate(bad)


def test_state_round_trip_and_sizes():
    cache = filled_cache(5)
    state = cache.export()
    assert isinstance(state, KVState) and state.kv.is_contiguous()
    assert state.nbytes == cache.nbytes == 2 * 2 * 3 * 5 * 8 * 4
    back = KVCache.from_state(state, dtype=torch.float64, block_size=2)
    assert back.num_tokens == 5 and back.kv.dtype == torch.float64
    assert torch.equal(back.export().kv, state.kv.double())
