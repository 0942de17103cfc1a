"""Expert fetching: on-demand misses and asynchronous prefetches over one link.

`ExpertFetcher` is the target model's `raysys.models.mixtral.ExpertSource`. A
background thread carries out every transfer, one at a time, as a host-to-
accelerator copy engine does:

1. requests wait in two queues: *demand* (a layer being computed needs the
   expert now) before *prefetch* (the predictor expects the coming
   verification pass to need it), prefetches ordered by layer;
2. the thread takes a demand request if there is one, else the first prefetch
   that can get a cache slot without evicting anything pinned or protected
   (a prefetch that cannot waits until the pass frees slots);
3. it gets the expert from its host (`raysys.moe.host.ExpertHostPool.fetch`)
   and holds the link for ``bytes / bandwidth`` seconds from the start of the
   transfer (`TransferLink`); the expert is ready when both are done;
4. it stores the weights in the cache and wakes the compute thread.

The compute thread never waits for anything already there: ``get_experts``
pins the layer's experts, queues only the missing ones as demand requests and
waits (bounded) for those still in flight. Prefetches for a layer the pass has
already computed are dropped, and every queued prefetch is dropped when the
pass ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from raysys.models.mixtral import ExpertWeights
from raysys.moe.cache import CacheStats, EntryState, ExpertCache, ExpertKey
from raysys.moe.host import ExpertFetchError, FetchResult

logger = logging.getLogger(__name__)


class TransferLink:
    """A modelled host-to-accelerator link of ``bandwidth_bytes_per_s``.

    All "remote" experts of a single machine arrive in well under a millisecond
    through Ray's shared memory, which would make offloading free. The link
    restores the cost of the copy the real system pays (PCIe between host
    memory and the accelerator, or the network between machines): a transfer
    of ``n`` bytes occupies the link ``n / bandwidth`` seconds, counted from
    the start of the real fetch, so a transfer takes the longer of the real and
    the modelled time. None or 0 models no link (real time only).
    """

    def __init__(self, bandwidth_bytes_per_s: float | None) -> None:
        if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s < 0:
            raise ValueError(
                f"link bandwidth must be >= 0 bytes/s, got {bandwidth_bytes_per_s}"
            )
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s or None

    def transfer_s(self, nbytes: int) -> float:
        """Seconds the link needs for ``nbytes``."""
        if self.bandwidth_bytes_per_s is None:
            return 0.0
        return nbytes / self.bandwidth_bytes_per_s


@dataclass
class FetchStats:
    """Transfer counters since the last reset."""

    num_demand: int = 0
    num_prefetch: int = 0
    num_prefetch_dropped: int = 0
    bytes_fetched: int = 0
    fetch_s: list[float] = field(default_factory=list)  # effective, per expert
    real_s: list[float] = field(default_factory=list)  # the Ray get alone
    stall_s: float = 0.0  # compute thread waiting for experts
    prefetched: set[ExpertKey] = field(default_factory=set)
    demand_by_layer: Counter[int] = field(default_factory=Counter)

    @property
    def num_fetches(self) -> int:
        return self.num_demand + self.num_prefetch


# Fetches one expert: (layer, expert) -> FetchResult; raises on failure.
FetchFn = Callable[[ExpertKey], FetchResult]


class ExpertFetcher:
    """Bounded expert cache in front of the expert hosts, with a fetch thread.

    Args:
        fetch: gets one expert from its host (blocking, bounded).
        cache: the bounded cache (capacity in experts).
        expert_nbytes: bytes one fetch moves over the link.
        link: the modelled link.
        timeout_s: longest the compute thread waits for one layer's experts.
        device: where fetched weights are placed (the compute device).
    """

    def __init__(
        self,
        fetch: FetchFn,
        cache: ExpertCache,
        expert_nbytes: int,
        link: TransferLink,
        *,
        timeout_s: float = 60.0,
        device: torch.device | str = "cpu",
    ) -> None:
        self._fetch = fetch
        self.cache = cache
        self.expert_nbytes = expert_nbytes
        self.link = link
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self.stats = FetchStats()
        self._cond = threading.Condition()
        self._demand: deque[ExpertKey] = deque()
        self._prefetch: list[tuple[int, int, ExpertKey]] = []  # (layer, seq, key)
        self._queued: set[ExpertKey] = set()
        self._seq = 0
        self._errors: dict[ExpertKey, BaseException] = {}
        self._pinned: list[ExpertKey] = []
        self._layer = -1  # layer the current pass computes, -1 between passes
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="expert-fetcher", daemon=True
        )
        self._thread.start()

    # ----------------------------------------------------------- compute thread

    def get_experts(
        self, layer_idx: int, expert_ids: Sequence[int]
    ) -> Mapping[int, ExpertWeights]:
        """The weights of ``expert_ids`` of ``layer_idx``; waits only for misses.

        Raises:
            ExpertFetchError: a fetch failed or did not finish within the bound.
        """
        keys = [(layer_idx, e) for e in expert_ids]
        with self._cond:
            self._advance_to(layer_idx)
            # Pin what is there before making room for what is not.
            missing = [key for key in keys if self.cache.lookup(key) is None]
            self.cache.pin([key for key in keys if key not in missing])
            for key in missing:
                self._demand_fetch(key)
            self._pinned = keys
            self._cond.notify_all()
            start = time.perf_counter()
            deadline = time.monotonic() + self.timeout_s
            while True:
                failed = [k for k in keys if k in self._errors]
                if failed:
                    error = self._errors.pop(failed[0])
                    raise ExpertFetchError(
                        f"fetching expert {failed[0]} failed: "
                        f"{type(error).__name__}: {error}"
                    ) from error
                for key in keys:
                    if self.cache.get(key) is None:  # a prefetch of it failed
                        self._demand_fetch(key)
                if all(self.cache.get(k).state is EntryState.READY for k in keys):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExpertFetchError(
                        f"layer {layer_idx} experts {list(expert_ids)} not fetched "
                        f"within {self.timeout_s:g} s"
                    )
                self._cond.wait(left)
            self.stats.stall_s += time.perf_counter() - start
            return {
                e: self.cache.get(k).weights
                for e, k in zip(expert_ids, keys, strict=True)
            }

    def _demand_fetch(self, key: ExpertKey) -> None:
        # Under the lock: reserve a (possibly overflowing) pinned slot, queue it.
        self._errors.pop(key, None)
        self._remove_queued_prefetch(key)
        self.cache.reserve(key, may_overflow=True)
        self.cache.pin([key])
        self._demand.append(key)
        self._queued.add(key)
        self.stats.demand_by_layer[key[0]] += 1
        self._cond.notify_all()

    def prefetch(self, layer_idx: int, expert_ids: Sequence[int]) -> int:
        """Ask for experts the coming pass is predicted to need; returns how many queued.

        Experts already cached (or in flight) are protected instead of fetched.
        """
        num_queued = 0
        with self._cond:
            for e in expert_ids:
                key = (layer_idx, int(e))
                entry = self.cache.get(key)
                if entry is not None:
                    self.cache.protect(key)
                    continue
                if key in self._queued:
                    continue
                self._prefetch.append((layer_idx, self._seq, key))
                self._seq += 1
                self._queued.add(key)
                num_queued += 1
            if num_queued:
                self._prefetch.sort()
                self._cond.notify_all()
        return num_queued

    def end_pass(self) -> None:
        """The target's forward finished: release pins, protections, stale prefetches."""
        with self._cond:
            self.cache.unpin(self._pinned)
            self._pinned = []
            self._drop_prefetches(lambda layer: True)
            self.cache.unprotect()
            self.cache.position = self.cache.num_layers - 1
            self.cache.trim()
            self._layer = -1
            self._cond.notify_all()

    def _advance_to(self, layer_idx: int) -> None:
        # Called under the lock when a pass starts computing ``layer_idx``.
        self.cache.position = layer_idx
        if self._pinned:
            self.cache.unpin(self._pinned)
            self._pinned = []
        self._layer = layer_idx
        consumed = [k for k in self.cache.entries if k[0] < layer_idx]
        self.cache.unprotect(consumed)
        self._drop_prefetches(lambda layer: layer <= layer_idx)

    def _drop_prefetches(self, stale: Callable[[int], bool]) -> None:
        kept = []
        for item in self._prefetch:
            if stale(item[0]):
                self._queued.discard(item[2])
                self.stats.num_prefetch_dropped += 1
            else:
                kept.append(item)
        self._prefetch = kept

    def _remove_queued_prefetch(self, key: ExpertKey) -> None:
        for i, item in enumerate(self._prefetch):
            if item[2] == key:
                del self._prefetch[i]
                self._queued.discard(key)
                return

    # ------------------------------------------------------------ fetch thread

    def _next_request(self) -> tuple[ExpertKey, bool] | None:
        # Under the lock: the next transfer, demand first; None if nothing can go.
        if self._demand:
            key = self._demand.popleft()
            return key, False
        for i, (_, _, key) in enumerate(self._prefetch):
            if self.cache.reserve(key, may_overflow=False, protected=True):
                del self._prefetch[i]
                return key, True
            break  # deeper layers wait behind the shallowest prefetch
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                request = self._next_request()
                while request is None and not self._closed:
                    self._cond.wait()
                    request = self._next_request()
                if self._closed:
                    return
            key, is_prefetch = request
            start = time.perf_counter()
            link_s = self.link.transfer_s(self.expert_nbytes)
            try:
                result = self._fetch(key)
                weights = result.weights.to(self.device)
            except BaseException as e:  # noqa: BLE001 (handed to the waiting thread)
                logger.warning("fetch of expert %s failed: %s", key, e)
                with self._cond:
                    self._queued.discard(key)
                    self.cache.drop(key)
                    if not is_prefetch:  # a failed prefetch is only a lost hint
                        self._errors[key] = e
                    self._cond.notify_all()
                continue
            left = link_s - (time.perf_counter() - start)
            if left > 0:
                time.sleep(left)
            with self._cond:
                self._queued.discard(key)
                # An error left from an earlier failed fetch of this key (a pass
                # that was abandoned) is stale now that it arrived.
                self._errors.pop(key, None)
                if key in self.cache:
                    self.cache.fill(key, weights)
                s = self.stats
                s.bytes_fetched += self.expert_nbytes
                s.fetch_s.append(time.perf_counter() - start)
                s.real_s.append(result.real_s)
                if is_prefetch:
                    s.num_prefetch += 1
                    s.prefetched.add(key)
                else:
                    s.num_demand += 1
                self._cond.notify_all()

    # ---------------------------------------------------------------- control

    @property
    def lock(self) -> threading.Condition:
        """The lock guarding the cache and the queues."""
        return self._cond

    def take_stats(self) -> tuple[FetchStats, CacheStats]:
        """The counters since the last call (or reset), zeroed for the next."""
        with self._cond:
            stats, cache_stats = self.stats, self.cache.stats
            self.stats, self.cache.stats = FetchStats(), CacheStats()
        return stats, cache_stats

    def reset(self) -> None:
        """Empty the cache (in-flight transfers finish) and zero the counters.

        Pins of a pass that never ended (it failed) are released first.
        """
        with self._cond:
            self.cache.unpin(self._pinned)
            self._pinned = []
            self._layer = -1
            self._drop_prefetches(lambda layer: True)
            self.cache.clear()
            self.stats = FetchStats()
            self._errors.clear()

    def close(self) -> None:
        """Stop the fetch thread (after the transfer in flight)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self.timeout_s)
