"""The bounded expert cache: LRU order, pins, overflow, prefetch protection."""

from __future__ import annotations

import pytest
import torch

from raysys.models.mixtral import ExpertWeights
from raysys.moe.cache import EntryState, ExpertCache


def weights(value: float) -> ExpertWeights:
    return ExpertWeights(*(torch.full((2, 2), value) for _ in range(3)))


def filled(cache: ExpertCache, *keys) -> None:
    for key in keys:
        assert cache.reserve(key, may_overflow=False)
        cache.fill(key, weights(key[1]))


def test_least_recently_used_is_evicted_first():
    cache = ExpertCache(3)
    filled(cache, (0, 0), (0, 1), (0, 2))
    cache.lookup((0, 0))  # now (0, 1) is the oldest
    filled(cache, (1, 0))
    assert list(cache.entries) == [(0, 2), (0, 0), (1, 0)]
    assert cache.stats.evicted == [(0, 1)]
    assert cache.stats.num_hits == 1 and cache.stats.num_lookups == 1


def test_pinned_experts_overflow_then_trim_back():
    cache = ExpertCache(2)
    needed = [(0, e) for e in range(5)]
    for key in needed:  # one layer needs more experts than the capacity
        assert cache.reserve(key, may_overflow=True)
        cache.pin([key])
        cache.fill(key, weights(key[1]))
    assert len(cache) == 5 and cache.stats.max_overflow == 3
    assert all(cache.get(k).state is EntryState.READY for k in needed)
    cache.unpin(needed)
    assert len(cache) == 2
    assert list(cache.entries) == needed[-2:]


def test_pending_entries_hold_their_slot_and_are_not_evicted():
    cache = ExpertCache(1)
    assert cache.reserve((0, 0), may_overflow=False)  # in flight
    assert not cache.reserve((0, 1), may_overflow=False)
    assert cache.reserve((0, 1), may_overflow=True)
    assert set(cache.entries) == {(0, 0), (0, 1)}


def test_protected_prefetches_are_not_evicted_by_other_prefetches():
    cache = ExpertCache(2)
    for key in [(0, 0), (0, 1)]:
        assert cache.reserve(key, may_overflow=False, protected=True)
        cache.fill(key, weights(0))
    assert not cache.reserve((1, 0), may_overflow=False, protected=True)
    cache.unprotect([(0, 0)])
    assert cache.reserve((1, 0), may_overflow=False, protected=True)
    assert set(cache.entries) == {(0, 1), (1, 0)}


def test_clear_keeps_in_flight_entries_and_resets_counts():
    cache = ExpertCache(4)
    filled(cache, (0, 0))
    cache.reserve((0, 1), may_overflow=False)
    cache.lookup((0, 0))
    cache.clear()
    assert list(cache.entries) == [(0, 1)]
    assert cache.stats.num_lookups == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ExpertCache(0)


def test_layer_lru_splits_the_capacity_and_evicts_within_the_layer():
    cache = ExpertCache(6, "layer-lru", num_layers=4)
    assert cache.layer_capacity == [2, 2, 1, 1]
    filled(cache, (0, 0), (0, 1), (3, 0), (1, 0))
    # Layer 3 is full: a new layer-3 expert evicts (3, 0), though (0, 0) is older.
    filled(cache, (3, 5))
    assert cache.stats.evicted == [(3, 0)]
    # Layer 0 is full and its only entries are pinned: a prefetch is refused, a
    # needed expert overflows and is trimmed back within layer 0 when unpinned.
    cache.pin([(0, 0), (0, 1)])
    assert not cache.reserve((0, 2), may_overflow=False)
    assert cache.reserve((0, 2), may_overflow=True)
    cache.fill((0, 2), weights(2))
    cache.pin([(0, 2)])
    cache.unpin([(0, 0), (0, 1), (0, 2)])
    assert sorted(cache.entries) == [(0, 1), (0, 2), (1, 0), (3, 5)]
    # Layer 2 has a free slot whatever the other layers hold.
    filled(cache, (2, 4))
    assert (2, 4) in cache.entries


def test_layer_lru_needs_a_slot_per_layer():
    with pytest.raises(ValueError, match="capacity 3 < 4 layers"):
        ExpertCache(3, "layer-lru", num_layers=4)


def test_resize_recomputes_the_layer_lru_slots_and_trims():
    cache = ExpertCache(4, "layer-lru", num_layers=4)
    filled(cache, (0, 0), (1, 0), (2, 0), (3, 0))
    cache.resize(6)
    assert cache.layer_capacity == [2, 2, 1, 1]
    filled(cache, (0, 1))  # a second slot in layer 0, nothing evicted
    assert len(cache) == 5 and cache.stats.num_evictions == 0
    cache.resize(4)
    assert cache.layer_capacity == [1, 1, 1, 1] and len(cache) == 4
    with pytest.raises(ValueError, match="capacity 3 < 4 layers"):
        cache.resize(3)
