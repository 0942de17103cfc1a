"""The engine's bounded expert cache (pure data structure, no Ray, no threads).

Entries are experts, keyed ``(layer, expert)``, in least-recently-used order.
An entry is PENDING while its fetch is in flight (it holds its slot) and READY
once its weights arrived. Two marks keep needed experts in:

- *pinned*: requested by the layer now being computed; never evicted. When a
  layer needs more experts than the capacity, the cache overflows for the
  duration of that layer and trims back to capacity when they are unpinned, so
  an undersized cache still computes exactly what an all-resident model does.
- *protected*: prefetched for the coming verification pass; not evicted to make
  room for another prefetch until that pass has used (or passed) its layer.

Only READY, unpinned, unprotected entries are evicted. Which one goes is the
eviction policy's choice:

- ``lru``: the least recently used of the whole cache;
- ``layer-lru``: the capacity is split evenly over the layers (the first
  ``capacity mod L`` layers get one slot more) and each layer evicts its own
  least recently used expert, as mixtral-offloading's per-layer eviction
  groups do; a layer never takes another layer's slot;
- ``layer-cyclic``: the one whose layer comes round again last. A decoder
  reads its layers in a fixed cycle (0, 1, .., L-1, then 0 again for the next
  token or pass), so while layer ``c`` is computed, an expert of layer ``l`` is
  next needed ``(l - c - 1) mod L`` layers later; evicting the furthest one is
  Belady's rule for this access order (ties: least recently used). Under LRU a
  pass that needs more experts than the cache holds evicts every expert just
  before it is needed again, and nothing ever hits. With this policy a
  prefetch only evicts an expert needed later than the one it brings.

The caller (`raysys.moe.fetcher.ExpertFetcher`) holds its lock around every
call.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from raysys.models.mixtral import ExpertWeights

logger = logging.getLogger(__name__)

ExpertKey = tuple[int, int]
EvictionPolicy = Literal["lru", "layer-lru", "layer-cyclic"]
EVICTION_POLICIES: tuple[str, ...] = ("lru", "layer-lru", "layer-cyclic")


class EntryState(enum.Enum):
    PENDING = "pending"
    READY = "ready"


@dataclass
class CacheEntry:
    """One cached expert."""

    state: EntryState = EntryState.PENDING
    weights: ExpertWeights | None = None
    pins: int = 0
    protected: bool = False


@dataclass
class CacheStats:
    """Counters of one cache since the last reset."""

    num_lookups: int = 0
    num_hits: int = 0  # READY when looked up
    num_inflight_hits: int = 0  # already being fetched when looked up
    num_evictions: int = 0
    max_overflow: int = 0  # most entries above capacity at once
    evicted: list[ExpertKey] = field(default_factory=list)


class ExpertCache:
    """A bounded LRU cache of experts with pins and prefetch protection.

    Args:
        capacity: experts held at most (temporarily exceeded only by pinned ones).
        policy: which evictable entry goes first (see the module docstring).
        num_layers: layers of the model (the cycle of ``layer-cyclic``).
    """

    def __init__(
        self, capacity: int, policy: EvictionPolicy = "lru", num_layers: int = 1
    ) -> None:
        if policy not in EVICTION_POLICIES:
            raise ValueError(
                f"eviction policy {policy!r} is not one of {', '.join(EVICTION_POLICIES)}"
            )
        self.policy = policy
        self.num_layers = num_layers
        # The layer being computed; between passes the last one, so layer 0 is next.
        self.position = num_layers - 1
        self.entries: OrderedDict[ExpertKey, CacheEntry] = OrderedDict()
        self.stats = CacheStats()
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        """Set the capacity (and layer-lru's slots per layer), then trim to it.

        Raises:
            ValueError: capacity below one, or (layer-lru) below one per layer.
        """
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 expert, got {capacity}")
        if self.policy == "layer-lru" and capacity < self.num_layers:
            raise ValueError(
                f"a layer-lru cache needs at least one slot per layer: capacity "
                f"{capacity} < {self.num_layers} layers"
            )
        self.capacity = capacity
        # layer-lru: slots of each layer.
        self.layer_capacity = [
            capacity // self.num_layers
            + (1 if layer < capacity % self.num_layers else 0)
            for layer in range(self.num_layers)
        ]
        self.trim()

    def distance(self, layer: int) -> int:
        """Layers computed before ``layer`` is next needed (0: it is next)."""
        return (layer - self.position - 1) % self.num_layers

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self.entries

    def get(self, key: ExpertKey) -> CacheEntry | None:
        """The entry, if any (does not count as a use)."""
        return self.entries.get(key)

    def lookup(self, key: ExpertKey) -> CacheEntry | None:
        """A use of ``key``: counts a hit (READY), an in-flight hit (PENDING) or a
        miss, and refreshes its LRU position."""
        self.stats.num_lookups += 1
        entry = self.entries.get(key)
        if entry is not None:
            if entry.state is EntryState.READY:
                self.stats.num_hits += 1
            else:
                self.stats.num_inflight_hits += 1
            self.entries.move_to_end(key)
        return entry

    def _evictable(
        self, needed_before: int | None = None, layer: int | None = None
    ) -> ExpertKey | None:
        # ``needed_before``: only entries needed later than that distance qualify.
        # ``layer``: only entries of that layer (layer-lru).
        candidates = [
            key
            for key, entry in self.entries.items()  # least recently used first
            if entry.state is EntryState.READY
            and not entry.pins
            and not entry.protected
            and (layer is None or key[0] == layer)
        ]
        if self.policy in ("lru", "layer-lru"):
            return candidates[0] if candidates else None
        if needed_before is not None:
            candidates = [k for k in candidates if self.distance(k[0]) > needed_before]
        if not candidates:
            return None
        return max(candidates, key=lambda k: self.distance(k[0]))  # first max: LRU

    def _evict(self, key: ExpertKey) -> None:
        del self.entries[key]
        self.stats.num_evictions += 1
        self.stats.evicted.append(key)

    def reserve(
        self, key: ExpertKey, *, may_overflow: bool, protected: bool = False
    ) -> bool:
        """Add ``key`` as PENDING, evicting LRU entries to stay within capacity.

        Args:
            may_overflow: when nothing can be evicted, add anyway (a needed
                expert) instead of refusing (a prefetch).
            protected: mark the entry as prefetched for the coming pass.

        Returns:
            False when refused (no slot and ``may_overflow`` is False).
        """
        assert key not in self.entries, f"{key} is already cached"
        # A prefetch never evicts what is needed sooner than what it brings.
        needed_before = None if may_overflow else self.distance(key[0])
        layer = key[0] if self.policy == "layer-lru" else None
        while self._full(layer):
            victim = self._evictable(needed_before, layer)
            if victim is None:
                if not may_overflow:
                    return False
                break
            self._evict(victim)
        self.entries[key] = CacheEntry(protected=protected)
        overflow = len(self.entries) - self.capacity
        self.stats.max_overflow = max(self.stats.max_overflow, overflow)
        return True

    def fill(self, key: ExpertKey, weights: ExpertWeights) -> None:
        """The fetch of ``key`` completed."""
        entry = self.entries[key]
        entry.weights = weights
        entry.state = EntryState.READY

    def drop(self, key: ExpertKey) -> None:
        """Forget ``key`` (its fetch failed)."""
        self.entries.pop(key, None)

    def pin(self, keys: Iterable[ExpertKey]) -> None:
        for key in keys:
            self.entries[key].pins += 1

    def unpin(self, keys: Iterable[ExpertKey]) -> None:
        """Release pins, then trim back to capacity."""
        for key in keys:
            entry = self.entries.get(key)
            if entry is not None and entry.pins:
                entry.pins -= 1
        self.trim()

    def protect(self, key: ExpertKey) -> None:
        self.entries[key].protected = True

    def unprotect(self, keys: Iterable[ExpertKey] | None = None) -> None:
        """Lift prefetch protection of ``keys`` (None: of every entry)."""
        targets = (
            self.entries.values()
            if keys is None
            else (self.entries[k] for k in keys if k in self.entries)
        )
        for entry in targets:
            entry.protected = False

    def _held(self, layer: int | None) -> tuple[int, int]:
        # (entries, capacity) of one layer (layer-lru) or of the whole cache.
        if layer is None:
            return len(self.entries), self.capacity
        held = sum(1 for key in self.entries if key[0] == layer)
        return held, self.layer_capacity[layer]

    def _full(self, layer: int | None) -> bool:
        held, capacity = self._held(layer)
        return held >= capacity

    def trim(self) -> None:
        """Evict LRU entries while above capacity (pinned ones stay)."""
        layers = range(self.num_layers) if self.policy == "layer-lru" else [None]
        for layer in layers:
            while self._held(layer)[0] > self._held(layer)[1]:
                victim = self._evictable(layer=layer)
                if victim is None:
                    break
                self._evict(victim)

    def clear(self) -> None:
        """Drop every entry that is not in flight or pinned; reset the counters."""
        for key in [
            k
            for k, e in self.entries.items()
            if e.state is EntryState.READY and not e.pins
        ]:
            del self.entries[key]
        self.stats = CacheStats()
