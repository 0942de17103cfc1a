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
