"""The fetch thread: demand and prefetch queues, the link model, failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from raysys.models.mixtral import ExpertWeights
from raysys.moe.cache import ExpertCache
from raysys.moe.fetcher import ExpertFetcher, TransferLink
from raysys.moe.host import ExpertFetchError, FetchResult

NBYTES = 1000


def expert(key) -> ExpertWeights:
    layer, e = key
    return ExpertWeights(*(torch.full((2, 3), 10.0 * layer + e) for _ in range(3)))


class FakeHosts:
    """Serves experts after ``delay_s``; records the order of fetches."""

    def __init__(self, delay_s: float = 0.0, fail: set | None = None) -> None:
        self.delay_s = delay_s
        self.fail = fail or set()
        self.order: list[tuple[int, int]] = []
        self.entered = threading.Event()  # a fetch has begun (before the gate)
        self.gate = threading.Event()
        self.gate.set()

    def fetch(self, key):
        self.entered.set()
        self.gate.wait(5)
        self.order.append(key)
        time.sleep(self.delay_s)
        if key in self.fail:
            raise RuntimeError(f"host lost {key}")
        return FetchResult(expert(key), self.delay_s)


def wait_until(condition, fetcher=None, timeout_s: float = 5.0) -> None:
    """Poll ``condition`` (under the fetcher's lock if given) until it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        if fetcher is None:
            if condition():
                return
        else:
            with fetcher.lock:
                if condition():
                    return
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        time.sleep(0.005)


@pytest.fixture
def make():
    made = []

    def build(capacity=4, bandwidth=None, hosts=None, timeout_s=5.0):
        hosts = hosts or FakeHosts()
        fetcher = ExpertFetcher(
            hosts.fetch,
            ExpertCache(capacity),
            NBYTES,
            TransferLink(bandwidth),
            timeout_s=timeout_s,
        )
        made.append(fetcher)
        return fetcher, hosts

    yield build
    for fetcher in made:
        fetcher.close()


def test_demand_fetch_returns_the_right_weights(make):
    fetcher, hosts = make()
    got = fetcher.get_experts(1, [0, 3])
    assert torch.equal(got[3].w1, expert((1, 3)).w1)
    assert torch.equal(got[0].w2, expert((1, 0)).w2)
    fetcher.end_pass()
    fetcher.get_experts(1, [3])  # now a hit
    stats, cache_stats = fetcher.take_stats()
    assert stats.num_demand == 2 and stats.bytes_fetched == 2 * NBYTES
    assert cache_stats.num_hits == 1 and cache_stats.num_lookups == 3


def test_link_takes_bytes_over_bandwidth_per_transfer(make):
    fetcher, _ = make(bandwidth=NBYTES / 0.05)  # 50 ms per expert
    start = time.perf_counter()
    fetcher.get_experts(0, [0, 1, 2])
    elapsed = time.perf_counter() - start
    assert elapsed >= 3 * 0.05  # one link: transfers are serial
    stats, _ = fetcher.take_stats()
    assert all(s >= 0.05 for s in stats.fetch_s)


def test_prefetched_expert_needs_no_demand_fetch(make):
    fetcher, hosts = make()
    assert fetcher.prefetch(2, [5, 6]) == 2
    deadline = time.monotonic() + 5
    while len(hosts.order) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    fetcher.get_experts(2, [5])
    stats, cache_stats = fetcher.take_stats()
    assert stats.num_prefetch == 2 and stats.num_demand == 0
    assert cache_stats.num_hits + cache_stats.num_inflight_hits == 1


def test_demand_goes_before_queued_prefetches(make):
    hosts = FakeHosts()
    hosts.gate.clear()  # hold the fetch thread
    fetcher, _ = make(capacity=8, hosts=hosts)
    fetcher.prefetch(3, [0, 1, 2])
    assert hosts.entered.wait(5)  # the first prefetch is taken, held at the gate
    waiter = threading.Thread(target=fetcher.get_experts, args=(0, [7]))
    waiter.start()
    wait_until(lambda: fetcher.stats.demand_by_layer[0] == 1, fetcher)
    hosts.gate.set()
    waiter.join(5)
    assert not waiter.is_alive()
    wait_until(lambda: len(hosts.order) == 4)  # the other prefetches follow
    # The first prefetch was already taken when the demand arrived; the demand
    # overtakes the rest.
    assert hosts.order == [(3, 0), (0, 7), (3, 1), (3, 2)]


def test_prefetch_waits_for_room_and_stale_prefetches_are_dropped(make):
    fetcher, hosts = make(capacity=2)
    fetcher.get_experts(0, [0, 1])  # two pinned experts fill the cache
    fetcher.prefetch(1, [0])
    # A negative can only be watched for a while: a slow fetch thread makes
    # this check weaker, never failing.
    time.sleep(0.1)
    assert (1, 0) not in hosts.order  # no room: nothing evictable
    fetcher.get_experts(1, [0])  # the pass reaches layer 1: demand instead
    # Holding the lock, the fetch thread cannot take the prefetch before the
    # pass ends (room is free now that layer 0 is unpinned).
    with fetcher.lock:
        fetcher.prefetch(3, [4])
        fetcher.end_pass()  # queued prefetches of the finished pass are dropped
    stats, _ = fetcher.take_stats()
    assert stats.num_prefetch_dropped == 2  # (1, 0) at layer 1, (3, 4) at the end
    assert (stats.num_prefetch, stats.num_demand) == (0, 3)
    assert hosts.order == [(0, 0), (0, 1), (1, 0)]  # nothing queued is left


def test_layer_needing_more_than_capacity_gets_all_its_experts(make):
    fetcher, _ = make(capacity=1)
    got = fetcher.get_experts(0, [0, 1, 2, 3])
    assert [float(got[e].w1[0, 0]) for e in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert fetcher.cache.stats.max_overflow == 3
    fetcher.end_pass()
    assert len(fetcher.cache) == 1


def test_failed_demand_fetch_raises_and_failed_prefetch_is_refetched(make):
    hosts = FakeHosts(fail={(0, 1)})
    fetcher, _ = make(hosts=hosts)
    with pytest.raises(ExpertFetchError, match=r"\(0, 1\)"):
        fetcher.get_experts(0, [1])
    fetcher.end_pass()
    fetcher.take_stats()
    hosts.fail = {(2, 2)}
    fetcher.prefetch(2, [2])
    # The prefetch ran and failed: its reserved slot is given up.
    wait_until(
        lambda: (2, 2) in hosts.order and fetcher.cache.get((2, 2)) is None, fetcher
    )
    hosts.fail = set()
    got = fetcher.get_experts(2, [2])  # the failed prefetch is fetched on demand
    assert float(got[2].w1[0, 0]) == 22.0
    assert hosts.order == [(0, 1), (2, 2), (2, 2)]
    stats, _ = fetcher.take_stats()
    # A failed prefetch moved nothing and is no error: one demand fetch.
    assert (stats.num_prefetch, stats.num_demand, stats.bytes_fetched) == (0, 1, NBYTES)


def test_wait_is_bounded(make):
    fetcher, _ = make(hosts=FakeHosts(delay_s=1.0), timeout_s=0.2)
    with pytest.raises(ExpertFetchError, match="not fetched within 0.2 s"):
        fetcher.get_experts(0, [0])


def test_negative_bandwidth_is_refused():
    with pytest.raises(ValueError, match="bandwidth must be >= 0"):
        TransferLink(-1.0)


def test_making_room_never_evicts_an_expert_of_the_same_layer(make):
    fetcher, hosts = make(capacity=2)
    fetcher.get_experts(0, [0, 1])
    fetcher.end_pass()
    # (0, 1) is cached and least recently used; fetching (0, 5) must evict (0, 0)
    # only after (0, 1) is pinned for this layer, never (0, 1) itself.
    fetcher.get_experts(0, [5, 1])
    fetcher.end_pass()
    assert hosts.order.count((0, 1)) == 1


@pytest.mark.parametrize(
    ("policy", "hits"), [("lru", 0), ("layer-cyclic", 4), ("layer-lru", 4)]
)
def test_layer_cyclic_eviction_hits_where_lru_thrashes(policy, hits):
    """Two passes over 4 layers x 2 experts through a 4-expert cache.

    LRU evicts each expert just before the next pass needs it again; evicting
    the expert whose layer comes round last keeps layers 0 and 3 (a hit each
    for both their experts); one slot per layer keeps each layer's most
    recent expert (one hit per layer).
    """
    from raysys.moe.cache import ExpertCache

    cache = ExpertCache(4, policy, num_layers=4)
    for _ in range(2):
        cache.stats.num_hits = 0
        for layer in range(4):
            cache.position = layer
            keys = [(layer, 0), (layer, 1)]
            missing = [k for k in keys if cache.lookup(k) is None]
            cache.pin([k for k in keys if k not in missing])
            for key in missing:
                cache.reserve(key, may_overflow=True)
                cache.pin([key])
                cache.fill(key, expert(key))
            cache.unpin(keys)
        cache.position = 3
    assert cache.stats.num_hits == hits


def test_prefetch_does_not_evict_what_is_needed_sooner():
    from raysys.moe.cache import ExpertCache

    cache = ExpertCache(2, "layer-cyclic", num_layers=4)
    for key in [(0, 0), (1, 0)]:
        cache.reserve(key, may_overflow=False)
        cache.fill(key, expert(key))
    cache.position = 3  # between passes: layers 0, 1 are needed first
    assert not cache.reserve((3, 7), may_overflow=False)
    assert cache.reserve((0, 1), may_overflow=False)  # evicts layer 1, needed later
    assert sorted(cache.entries) == [(0, 0), (0, 1)]
    assert cache.distance(0) == 0 and cache.distance(3) == 3


def test_an_error_left_by_an_abandoned_pass_does_not_fail_a_later_fetch(make):
    hosts = FakeHosts(fail={(0, 0), (0, 1)})
    fetcher, _ = make(hosts=hosts)
    with pytest.raises(ExpertFetchError, match=r"expert \(0, 0\) failed"):
        fetcher.get_experts(0, [0, 1])  # (0, 1)'s error is left behind
    fetcher.end_pass()
    deadline = time.monotonic() + 5
    while len(hosts.order) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    hosts.fail.clear()
    fetcher.prefetch(0, [1])
    while (0, 1) not in fetcher.stats.prefetched and time.monotonic() < deadline:
        time.sleep(0.01)
    got = fetcher.get_experts(0, [1])
    assert torch.equal(got[1].w1, expert((0, 1)).w1)
