"""Expert hosts: Ray actors that own a shard of the experts and serve them.

Each `ExpertHost` loads its experts from the checkpoint store
(`raysys.moe.store.ExpertCheckpointStore`), packs each as one flat array (w1,
w2, w3 back to back) in the stored dtype and ``ray.put``s it: the host process
owns the object, and the object store of the host's node holds its bytes.
Experts are assigned to hosts round-robin over (layer, expert), so one layer's
experts spread over all hosts.

`ExpertHostPool` is the engine's side: it starts the hosts, takes their object
refs and fetches an expert with a bounded ``ray.get`` of its ref. On the
host's own node that reads the object store's shared memory; from another node
Ray first copies the object into the engine node's object store, which then
serves later gets (the host-memory tier an offloading system keeps its
experts in). The copy into the engine's bounded cache is what the fetcher's
modelled link charges for. A host that dies takes its objects with it: the
get fails (``OwnerDiedError``, or ``RayActorError`` for a call), and the pool
starts a replacement host that reloads the same shard from the checkpoint
store, takes its new refs and retries the fetch, all within the fetch's
deadline.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from raysys.models.mixtral import ExpertWeights, MixtralConfig
from raysys.moe.store import ExpertCheckpointStore
from raysys.runtime.errors import RaysysError, RemoteTimeout, last_line
from raysys.runtime.ray_env import bounded_get

logger = logging.getLogger(__name__)

ExpertKey = tuple[int, int]  # (layer, expert)

# Faults after which a host is replaced: the process died or its reply is lost.
HOST_FAULTS = (
    ray.exceptions.RayActorError,
    ray.exceptions.ObjectLostError,  # OwnerDiedError is one
    ray.exceptions.ActorUnavailableError,
)


class ExpertFetchError(RaysysError):
    """An expert could not be fetched, even after replacing its host."""


def shard_experts(keys: list[ExpertKey], num_hosts: int) -> list[list[ExpertKey]]:
    """Round-robin assignment of experts to hosts (one layer spreads over all)."""
    shards: list[list[ExpertKey]] = [[] for _ in range(num_hosts)]
    for i, key in enumerate(sorted(keys)):
        shards[i % num_hosts].append(key)
    return shards


def pack_expert(weights: ExpertWeights) -> np.ndarray:
    """w1, w2, w3 flattened into one array (stored dtype)."""
    return torch.cat([t.reshape(-1) for t in weights]).numpy()


def unpack_expert(
    flat: torch.Tensor, config: MixtralConfig, dtype: torch.dtype
) -> ExpertWeights:
    """The inverse of `pack_expert`, converted to ``dtype``."""
    d, f = config.hidden_size, config.intermediate_size
    flat = flat.to(dtype)
    return ExpertWeights(
        flat[: f * d].view(f, d),  # (F, D)
        flat[f * d : 2 * f * d].view(d, f),  # (D, F)
        flat[2 * f * d :].view(f, d),  # (F, D)
    )


@ray.remote(num_cpus=0)
class ExpertHost:
    """Owns one shard of the experts and serves them through the object store."""

    def __init__(self, store_uri: str, keys: list[ExpertKey], host_idx: int) -> None:
        self.host_idx = host_idx
        store = ExpertCheckpointStore(store_uri)
        # One expert at a time: the object store holds the bytes, and the
        # refs keep them alive as long as this process lives.
        self.refs: dict[ExpertKey, ray.ObjectRef] = {}
        self.nbytes = 0
        for key in keys:
            flat = pack_expert(store.read_expert(*key))
            self.refs[key] = ray.put(flat)
            self.nbytes += flat.nbytes

    def expert_refs(self) -> dict[ExpertKey, ray.ObjectRef]:
        """The object ref of every expert, packed (see `pack_expert`)."""
        return self.refs

    def info(self) -> dict:
        """Process id, node, experts and bytes held."""
        return {
            "host_idx": self.host_idx,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "num_experts": len(self.refs),
            "nbytes": self.nbytes,
        }


@dataclass
class FetchResult:
    """One fetched expert with the time the Ray get took."""

    weights: ExpertWeights
    real_s: float


class ExpertHostPool:
    """Starts the expert hosts, fetches experts, replaces hosts that die.

    Args:
        store_uri: checkpoint store the hosts load from (path or pyarrow URI).
        config: the target's config (expert shapes).
        num_hosts: number of host actors the experts are sharded over.
        timeout_s: bound on starting a host and on each fetch (retries included).
        max_replacements: replacements per host before a fetch fails for good.
    """

    def __init__(
        self,
        store_uri: str,
        config: MixtralConfig,
        num_hosts: int,
        *,
        timeout_s: float = 60.0,
        max_replacements: int = 5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.store_uri = store_uri
        self.config = config
        self.timeout_s = timeout_s
        self.max_replacements = max_replacements
        self.dtype = dtype
        keys = [
            (layer, e)
            for layer in range(config.num_hidden_layers)
            for e in range(config.num_local_experts)
        ]
        self.shards = shard_experts(keys, num_hosts)
        self.host_of = {key: h for h, shard in enumerate(self.shards) for key in shard}
        self.hosts = [self._start(h) for h in range(num_hosts)]
        # Per host: the handle its refs came from, and the refs.
        self._refs: list[tuple[object, dict[ExpertKey, ray.ObjectRef]]] = [
            (None, {}) for _ in range(num_hosts)
        ]
        self.num_replacements = [0] * num_hosts
        self._lock = threading.Lock()
        deadline = time.monotonic() + timeout_s
        for h in range(num_hosts):
            try:
                self._start_ready(h, deadline)
            except (RemoteTimeout, ExpertFetchError, *HOST_FAULTS) as e:
                self.close()
                raise ExpertFetchError(
                    f"expert host {h} of {num_hosts} did not start (loading its "
                    f"shard from {store_uri}): {type(e).__name__}: {last_line(e)}"
                ) from e
        logger.info(
            "started %d expert hosts over %d experts from %s",
            num_hosts,
            len(keys),
            store_uri,
        )

    def _start_ready(self, host_idx: int, deadline: float) -> None:
        """Wait for a starting host; start it again if its process died.

        A host placed on a node that is going away (a provider just switched
        off, not yet declared dead) dies while starting; its shard is started
        again, as a fetch would, within the start deadline. A host whose own
        constructor failed (the store cannot be read) is not retried.
        """
        while True:
            try:
                self._wait_ready(host_idx, deadline - time.monotonic())
                return
            except HOST_FAULTS as e:
                if getattr(e, "actor_init_failed", False):
                    raise
                if time.monotonic() >= deadline:
                    raise
                self.replace(
                    host_idx,
                    self.hosts[host_idx],
                    reason=f"{type(e).__name__} while starting",
                    wait=False,  # the loop waits, and starts it again if need be
                )

    def _start(self, host_idx: int):
        return ExpertHost.options(scheduling_strategy="SPREAD").remote(
            self.store_uri, self.shards[host_idx], host_idx
        )

    def _wait_ready(self, host_idx: int, timeout_s: float | None = None) -> None:
        # Waits for the host's constructor and takes the refs of its experts.
        host = self.hosts[host_idx]
        refs = bounded_get(
            host.expert_refs.remote(),
            self.timeout_s if timeout_s is None else max(timeout_s, 0.001),
            f"expert host {host_idx} starting",
        )
        self._refs[host_idx] = (host, refs)

    @property
    def num_hosts(self) -> int:
        """Number of host actors."""
        return len(self.hosts)

    def fetch(self, key: ExpertKey) -> FetchResult:
        """Get one expert, replacing its host if it died; bounded by ``timeout_s``.

        Raises:
            ExpertFetchError: the deadline passed or the host keeps dying.
        """
        deadline = time.monotonic() + self.timeout_s
        host_idx = self.host_of[key]
        while True:
            host = self.hosts[host_idx]
            left = deadline - time.monotonic()
            start = time.perf_counter()
            try:
                if self._refs[host_idx][0] is not host:  # replaced elsewhere
                    self._wait_ready(host_idx, max(left, 0.001))
                flat = bounded_get(
                    self._refs[host_idx][1][key], max(left, 0.001), f"expert {key}"
                )
            except (RemoteTimeout, *HOST_FAULTS) as e:
                if time.monotonic() >= deadline:
                    raise ExpertFetchError(
                        f"expert {key} from host {host_idx} did not arrive within "
                        f"{self.timeout_s:g} s: {e}"
                    ) from e
                try:
                    self.replace(
                        host_idx,
                        host,
                        reason=type(e).__name__,
                        timeout_s=deadline - time.monotonic(),
                    )
                except RemoteTimeout as late:
                    raise ExpertFetchError(
                        f"expert {key}: the replacement of host {host_idx} was not "
                        f"ready within the fetch's {self.timeout_s:g} s"
                    ) from late
                except HOST_FAULTS as dead:
                    if getattr(dead, "actor_init_failed", False):
                        # Its constructor raised (the store cannot be read):
                        # starting it again would fail the same way.
                        raise ExpertFetchError(
                            f"expert {key}: the replacement of host {host_idx} could "
                            f"not load its shard from {self.store_uri}: "
                            f"{last_line(dead)}"
                        ) from dead
                    # It died while starting: the next get replaces it again.
                continue
            real_s = time.perf_counter() - start
            weights = unpack_expert(
                torch.from_numpy(np.array(flat)), self.config, self.dtype
            )
            return FetchResult(weights, real_s)

    def replace(
        self,
        host_idx: int,
        stale=None,
        *,
        reason: str = "",
        timeout_s: float | None = None,
        wait: bool = True,
    ) -> None:
        """Start a new host for ``host_idx``'s shard from the checkpoint store.

        A no-op when another caller already replaced ``stale`` (the failed handle).
        Waits at most ``timeout_s`` (default: the pool's) for the new host, unless
        ``wait`` is False.

        Raises:
            ExpertFetchError: the host was replaced ``max_replacements`` times.
            RemoteTimeout: the new host was not ready in time (a later fetch
                waits for it again).
        """
        with self._lock:
            if stale is not None and self.hosts[host_idx] is not stale:
                return
            if self.num_replacements[host_idx] >= self.max_replacements:
                raise ExpertFetchError(
                    f"expert host {host_idx} was replaced {self.max_replacements} "
                    "times and failed again; check the store and the nodes"
                )
            self.num_replacements[host_idx] += 1
            logger.info(
                "expert host %d lost (%s); starting a replacement from %s (#%d)",
                host_idx,
                reason or "requested",
                self.store_uri,
                self.num_replacements[host_idx],
            )
            ray.kill(self.hosts[host_idx], no_restart=True)
            self.hosts[host_idx] = self._start(host_idx)
            if wait:
                self._wait_ready(host_idx, timeout_s)

    def kill(self, host_idx: int) -> None:
        """Kill a host's process without warning (fault injection).

        `ray.kill` returns before the process is gone, and a call made in
        between can still be served; for a moment after, the dead host's
        objects can still be read until Ray learns their owner died. This
        returns once both a call to the host and a get of one of its experts
        fail, so the next fetch meets a dead host (bounded by ``timeout_s``).
        """
        host = self.hosts[host_idx]
        ray.kill(host, no_restart=True)
        expert = next(iter(self._refs[host_idx][1].values()), None)
        probes = [lambda: host.info.remote()]
        if expert is not None:
            probes.append(lambda: expert)
        deadline = time.monotonic() + self.timeout_s
        while probes and time.monotonic() < deadline:
            try:
                bounded_get(probes[0](), 1.0, f"expert host {host_idx}")
            except HOST_FAULTS:
                probes.pop(0)
                continue
            except RemoteTimeout:
                continue
            time.sleep(0.05)
        if probes:
            raise RaysysError(
                f"expert host {host_idx} still answers {self.timeout_s:g} s after "
                "it was killed"
            )

    def host_info(self) -> list[dict]:
        """`ExpertHost.info` of every host."""
        return bounded_get(
            [h.info.remote() for h in self.hosts], self.timeout_s, "expert host info"
        )

    def close(self) -> None:
        """Stop every host (those already gone are skipped)."""
        for host in self.hosts:
            try:
                ray.kill(host, no_restart=True)
            except Exception as e:  # noqa: BLE001 (closing; nothing to hand it to)
                logger.info("expert host already gone at close: %s", e)
