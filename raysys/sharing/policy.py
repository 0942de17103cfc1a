"""Placement and migration policies: plain objects, no Ray inside.

The same two objects drive the real platform (`raysys.sharing.controller`
carries their decisions out with Ray actors) and the trace-driven simulation
(`raysys.sharing.simulation`), so what the simulation measures is what the
platform does.

`PlacementPolicy` follows GPUnion's provider-first rules:

1. the owner always wins: a provider whose owner reclaims it takes no new work
   and every tenant on it is evacuated (`PlacementPolicy.reclaim`);
2. interactive work is placed before batch work, older before newer (work
   evacuated from a provider keeps its place);
3. each workload goes to the best-fitting GPU: a fractional need takes the GPU
   whose free share is the smallest that still holds it (fragmentation-aware
   best fit, in the spirit of FGD), a whole-GPU need takes the provider with
   the fewest whole free GPUs that suffice, so large free blocks stay intact;
4. work that fits nowhere now waits in a visible queue with its reason; work
   that could never fit (more GPUs than any provider lends) is refused.

Every decision is returned as a small dataclass with its reason and logged at
INFO.

`MigrationPolicy` decides, per tenant on a departing provider, whether to
checkpoint now and move (graceful, nothing lost), resume elsewhere from the last
committed checkpoint (sudden, at most one checkpoint interval lost), or restart
from scratch (when checkpointing is off).

Design note on the placement index: with a thousand providers and thousands of
queued jobs a scan per decision is too slow, so free capacity is kept in two
sorted lists per placement group: ``partial`` holds ``(free_units, provider,
gpu)`` for every GPU with a free share below a whole GPU, ``full`` holds
``(whole_free_gpus, provider)``. A best fit is then one bisection. The queue is
kept in buckets of equal need, so one scheduling pass looks at each bucket's
head once: when a head does not fit, nothing behind it in that bucket fits
either.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum

from raysys.runtime.errors import ConfigError
from raysys.sharing.workload import GPU_UNITS, WorkloadKind, check_gpu_need

logger = logging.getLogger(__name__)

SHARED_GROUP = "*"
KIND_RANK = {WorkloadKind.INTERACTIVE: 0, WorkloadKind.BATCH: 1}


class ProviderState(str, Enum):
    ACTIVE = "active"
    DRAINING = "draining"


class MigrationAction(str, Enum):
    """What happens to a tenant when its provider leaves."""

    CHECKPOINT_AND_MOVE = "checkpoint-and-move"
    RESUME_FROM_LAST = "resume-from-last"
    RESTART_FROM_SCRATCH = "restart-from-scratch"


@dataclass(frozen=True)
class Request:
    """A workload as the policy sees it."""

    workload_id: str
    gpus: float
    kind: WorkloadKind = WorkloadKind.BATCH
    group: str | None = None  # owning lab; only used when sharing is off
    est_checkpoint_s: float = 5.0


@dataclass(frozen=True)
class Placement:
    workload_id: str
    provider: str
    gpu_slots: tuple[int, ...]
    reason: str
    at: float


@dataclass(frozen=True)
class Queued:
    workload_id: str
    reason: str
    at: float


@dataclass(frozen=True)
class Refusal:
    workload_id: str
    reason: str
    at: float


@dataclass(frozen=True)
class Evacuation:
    workload_id: str
    provider: str
    action: MigrationAction
    graceful: bool
    time_left_s: float
    reason: str
    at: float


Decision = Placement | Queued | Refusal | Evacuation


@dataclass(frozen=True)
class ProviderView:
    name: str
    num_gpus: float
    gpus_in_use: float
    state: ProviderState
    tenants: tuple[str, ...]
    group: str | None


@dataclass(frozen=True)
class QueueEntry:
    workload_id: str
    kind: WorkloadKind
    gpus: float
    position: int
    waiting_since: float
    reason: str


@dataclass
class MigrationPolicy:
    """Graceful when time allows, else resume from the last committed checkpoint.

    Args:
        checkpointing: False models a platform without checkpoints: every
            evacuated tenant restarts from scratch.
        safety_margin_s: seconds kept free before a deadline; a checkpoint that
            would end later than that is not attempted.
        immediate_grace_s: time a tenant gets to checkpoint when its owner
            leaves without giving a deadline.
    """

    checkpointing: bool = True
    safety_margin_s: float = 2.0
    immediate_grace_s: float = 10.0

    def time_left(
        self, deadline_s: float | None, grace_s: float | None = None
    ) -> float:
        """Seconds a graceful checkpoint may take for a notice of ``deadline_s``
        (None: at once, with ``grace_s``, by default ``immediate_grace_s``)."""
        if deadline_s is None:
            return self.immediate_grace_s if grace_s is None else grace_s
        return max(0.0, deadline_s - self.safety_margin_s)

    def plan(
        self, *, graceful: bool, time_left_s: float, est_checkpoint_s: float
    ) -> tuple[MigrationAction, str]:
        if not self.checkpointing:
            return (
                MigrationAction.RESTART_FROM_SCRATCH,
                "checkpointing is off: the work restarts from its first step",
            )
        if not graceful:
            return (
                MigrationAction.RESUME_FROM_LAST,
                "provider vanished without notice: resume from the last committed "
                "checkpoint (at most one interval lost)",
            )
        if est_checkpoint_s <= time_left_s:
            return (
                MigrationAction.CHECKPOINT_AND_MOVE,
                f"notice leaves {time_left_s:.1f} s, a checkpoint takes about "
                f"{est_checkpoint_s:.1f} s: checkpoint now and move (no step lost)",
            )
        return (
            MigrationAction.RESUME_FROM_LAST,
            f"notice leaves {time_left_s:.1f} s, less than the {est_checkpoint_s:.1f} "
            "s a checkpoint takes: resume from the last committed checkpoint",
        )


@dataclass
class _Provider:
    name: str
    num_gpus: float
    group: str
    cap: list[int]  # capacity of each GPU slot in units
    free: list[int]
    state: ProviderState = ProviderState.ACTIVE
    tenants: set[str] = field(default_factory=set)
    indexed: list[tuple] = field(default_factory=list)

    def whole_free(self) -> int:
        return sum(
            1 for c, f in zip(self.cap, self.free, strict=True) if f == c == GPU_UNITS
        )


@dataclass
class _Index:
    partial: list[tuple[int, str, int]] = field(default_factory=list)
    full: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _Work:
    request: Request
    units: int  # per GPU slot: < GPU_UNITS for a fraction, GPU_UNITS for whole GPUs
    num_slots: int
    seq: int
    queued_at: float | None = None
    provider: str | None = None
    slots: tuple[int, ...] = ()
    group_key: str = SHARED_GROUP

    @property
    def whole(self) -> bool:
        return self.units == GPU_UNITS

    @property
    def bucket(self) -> tuple[int, bool, int]:
        return (KIND_RANK[self.request.kind], self.whole, self.need)

    @property
    def need(self) -> int:
        return self.num_slots if self.whole else self.units


class PlacementPolicy:
    """Provider-first placement with interactive priority and best fit.

    Args:
        share: True lets any workload use any provider (the shared pool);
            False confines each workload to providers of its own group (static
            per-lab allocation, the baseline without sharing).
        migration: the `MigrationPolicy` applied to evacuated tenants.
        max_provider_gpus: the most GPUs a provider may ever lend; a request
            above it is refused at once. None means the largest provider seen
            so far (nothing is refused before the first provider joins).
        decision_log_size: how many recent decisions `recent_decisions` keeps.
    """

    def __init__(
        self,
        *,
        share: bool = True,
        migration: MigrationPolicy | None = None,
        max_provider_gpus: float | None = None,
        decision_log_size: int = 500,
    ):
        self.share = share
        self.migration = migration or MigrationPolicy()
        self.max_provider_gpus = max_provider_gpus
        self._providers: dict[str, _Provider] = {}
        self._indexes: dict[str, _Index] = {}
        self._largest_seen: dict[str, float] = {}
        self._work: dict[str, _Work] = {}
        # group -> (kind rank, whole, need) -> [(seq, workload id)] in seq order
        self._queues: dict[str, dict[tuple[int, bool, int], list[tuple[int, str]]]] = {}
        self._num_queued = 0
        self._seq = 0
        self._dirty: set[str] = set()
        self._units_lent = 0
        self._units_in_use = 0
        self._log: deque[Decision] = deque(maxlen=decision_log_size)

    # -- bookkeeping -----------------------------------------------------

    def _decide(self, decision: Decision) -> Decision:
        self._log.append(decision)
        if logger.isEnabledFor(logging.INFO):
            name = type(decision).__name__.lower()
            logger.info("%s %s: %s", name, decision.workload_id, decision.reason)
        return decision

    def _group_of_provider(self, group: str | None) -> str:
        return SHARED_GROUP if self.share else (group or SHARED_GROUP)

    def _group_of_work(self, request: Request) -> str:
        return SHARED_GROUP if self.share else (request.group or SHARED_GROUP)

    def _unindex(self, p: _Provider) -> None:
        if not p.indexed:
            return
        index = self._indexes[p.group]
        for entry in p.indexed:
            target = index.partial if len(entry) == 3 else index.full
            i = bisect.bisect_left(target, entry)
            if i < len(target) and target[i] == entry:
                del target[i]
        p.indexed = []

    def _index(self, p: _Provider) -> None:
        self._unindex(p)
        if p.state is not ProviderState.ACTIVE:
            return
        index = self._indexes.setdefault(p.group, _Index())
        whole = 0
        for slot, (cap, free) in enumerate(zip(p.cap, p.free, strict=True)):
            if free == cap == GPU_UNITS:
                whole += 1
            elif free > 0:
                entry = (free, p.name, slot)
                bisect.insort(index.partial, entry)
                p.indexed.append(entry)
        if whole:
            entry = (whole, p.name)
            bisect.insort(index.full, entry)
            p.indexed.append(entry)

    # -- providers ---------------------------------------------------------

    def add_provider(
        self, name: str, num_gpus: float, *, group: str | None = None, now: float = 0.0
    ) -> None:
        """A provider joins (or returns) and lends ``num_gpus`` GPUs."""
        if name in self._providers:
            raise ConfigError(f"provider {name!r} is already registered")
        if num_gpus < 0 or not math.isfinite(num_gpus):
            raise ConfigError(
                f"provider {name!r}: num_gpus must be >= 0, got {num_gpus}"
            )
        units = round(num_gpus * GPU_UNITS)
        cap = [GPU_UNITS] * (units // GPU_UNITS)
        if units % GPU_UNITS:
            cap.append(units % GPU_UNITS)
        key = self._group_of_provider(group)
        p = _Provider(name, num_gpus, key, cap, list(cap))
        self._providers[name] = p
        self._largest_seen[key] = max(self._largest_seen.get(key, 0.0), num_gpus)
        self._units_lent += units
        self._index(p)
        self._dirty.add(key)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "provider %s joins lending %g GPUs (group %s)", name, num_gpus, key
            )

    def reclaim(
        self,
        name: str,
        *,
        now: float,
        deadline_s: float | None,
        grace_s: float | None = None,
    ) -> list[Evacuation]:
        """The owner takes the provider back: no new work, every tenant leaves.

        Args:
            deadline_s: seconds until the machine goes away; None means at once.
            grace_s: with ``deadline_s`` None, the seconds tenants get to
                checkpoint (None: the migration policy's ``immediate_grace_s``).

        Returns:
            One `Evacuation` per tenant (its allocation stays until `requeue`).
        """
        p = self._providers.get(name)
        if p is None:
            return []
        if p.state is ProviderState.ACTIVE:
            p.state = ProviderState.DRAINING
            self._unindex(p)
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "provider %s: owner reclaims it (%s), %d tenant(s) to evacuate",
                    name,
                    "at once"
                    if deadline_s is None
                    else f"deadline in {deadline_s:.1f} s",
                    len(p.tenants),
                )
        time_left = self.migration.time_left(deadline_s, grace_s)
        out = []
        for wid in sorted(p.tenants):
            work = self._work[wid]
            action, why = self.migration.plan(
                graceful=True,
                time_left_s=time_left,
                est_checkpoint_s=work.request.est_checkpoint_s,
            )
            out.append(
                self._decide(
                    Evacuation(
                        wid,
                        name,
                        action,
                        True,
                        time_left,
                        f"owner of {name} reclaims it; {why}",
                        now,
                    )
                )
            )
        return out

    def provider_gone(self, name: str, *, now: float, reason: str) -> list[Evacuation]:
        """The provider is gone (lost, or drained to its end).

        Tenants still on it lose their allocation at once and get a sudden
        `Evacuation`; call `requeue` for each when it should wait for a new place.
        """
        p = self._providers.pop(name, None)
        if p is None:
            return []
        self._unindex(p)
        self._units_lent -= sum(p.cap)
        out = []
        for wid in sorted(p.tenants):
            work = self._work[wid]
            self._units_in_use -= work.units * work.num_slots
            work.provider, work.slots = None, ()
            action, why = self.migration.plan(
                graceful=False,
                time_left_s=0.0,
                est_checkpoint_s=work.request.est_checkpoint_s,
            )
            out.append(
                self._decide(
                    Evacuation(wid, name, action, False, 0.0, f"{reason}; {why}", now)
                )
            )
        if logger.isEnabledFor(logging.INFO):
            logger.info("provider %s removed: %s", name, reason)
        return out

    # -- workloads ---------------------------------------------------------

    def submit(self, request: Request, *, now: float) -> Queued | Refusal:
        """Queue a new workload, or refuse one that could never fit."""
        if request.workload_id in self._work:
            raise ConfigError(f"workload {request.workload_id!r} is already submitted")
        gpus = check_gpu_need(request.gpus)
        if not isinstance(request.kind, WorkloadKind):
            request = replace(request, kind=WorkloadKind(request.kind))
        group = self._group_of_work(request)
        limit = self.max_provider_gpus
        if limit is None:
            limit = self._largest_seen.get(group)
        if limit is not None and gpus > limit:
            where = (
                "any provider" if group == SHARED_GROUP else f"any provider of {group}"
            )
            return self._decide(
                Refusal(
                    request.workload_id,
                    f"asks {gpus:g} GPUs but {where} lends at most {limit:g}; it could "
                    "never be placed",
                    now,
                )
            )
        units = round(gpus * GPU_UNITS)
        whole = gpus >= 1
        work = _Work(
            request=request,
            units=GPU_UNITS if whole else units,
            num_slots=int(gpus) if whole else 1,
            seq=self._seq,
            group_key=group,
        )
        self._seq += 1
        self._work[request.workload_id] = work
        self._enqueue(work, now)
        return self._decide(
            Queued(
                request.workload_id,
                f"{request.kind.value} work asking {gpus:g} GPUs waits for a placement pass",
                now,
            )
        )

    def _enqueue(self, work: _Work, now: float) -> None:
        work.queued_at = now
        buckets = self._queues.setdefault(work.group_key, {})
        bisect.insort(
            buckets.setdefault(work.bucket, []), (work.seq, work.request.workload_id)
        )
        self._num_queued += 1
        self._dirty.add(work.group_key)

    def _dequeue(self, work: _Work) -> None:
        buckets = self._queues.get(work.group_key, {})
        bucket = buckets.get(work.bucket, [])
        key = (work.seq, work.request.workload_id)
        i = bisect.bisect_left(bucket, key)
        if i < len(bucket) and bucket[i] == key:
            del bucket[i]
            self._num_queued -= 1
            if not bucket:
                del buckets[work.bucket]
        work.queued_at = None

    def requeue(self, workload_id: str, *, now: float, reason: str) -> Queued | None:
        """Put an evacuated workload back in the queue, keeping its old priority.

        Frees its GPUs first when it still holds them (a graceful evacuation
        that has finished). Returns None for an unknown workload.
        """
        work = self._work.get(workload_id)
        if work is None:
            return None
        self._release(work)
        if work.queued_at is None:
            self._enqueue(work, now)
        return self._decide(Queued(workload_id, f"back in the queue: {reason}", now))

    def finish(self, workload_id: str) -> None:
        """The workload ended (done, failed or cancelled): free what it holds."""
        work = self._work.pop(workload_id, None)
        if work is None:
            return
        if work.queued_at is not None:
            self._dequeue(work)
        self._release(work)

    def _release(self, work: _Work) -> None:
        if work.provider is None:
            return
        p = self._providers.get(work.provider)
        if p is not None:
            for slot in work.slots:
                p.free[slot] += work.units
            p.tenants.discard(work.request.workload_id)
            self._units_in_use -= work.units * work.num_slots
            self._index(p)
            self._dirty.add(p.group)
        work.provider, work.slots = None, ()

    # -- placement ---------------------------------------------------------

    # TODO: Ray packs fractional requests onto GPU instances by its own rule, so
    # the GPU chosen here is advice; when Ray packs differently a runner can stay
    # pending although this index found room (its bounded start then re-queues it).
    def _fit(self, work: _Work) -> tuple[_Provider, tuple[int, ...], str] | None:
        index = self._indexes.get(work.group_key)
        if index is None:
            return None
        if not work.whole:
            i = bisect.bisect_left(index.partial, (work.units, "", -1))
            if i < len(index.partial):
                free, name, slot = index.partial[i]
                left = (free - work.units) / GPU_UNITS
                return (
                    self._providers[name],
                    (slot,),
                    f"best fit: GPU {slot} of {name} has {free / GPU_UNITS:.2f} free, "
                    f"{left:.2f} left after",
                )
            i = bisect.bisect_left(index.full, (1, ""))
            if i < len(index.full):
                count, name = index.full[i]
                p = self._providers[name]
                slot = next(
                    s
                    for s, (c, f) in enumerate(zip(p.cap, p.free, strict=True))
                    if f == c == GPU_UNITS
                )
                return (
                    p,
                    (slot,),
                    f"no partly used GPU holds it; whole GPU {slot} of {name} "
                    f"({count} whole GPU(s) free there, the fewest of any provider)",
                )
            return None
        i = bisect.bisect_left(index.full, (work.num_slots, ""))
        if i < len(index.full):
            count, name = index.full[i]
            p = self._providers[name]
            slots = tuple(
                s
                for s, (c, f) in enumerate(zip(p.cap, p.free, strict=True))
                if f == c == GPU_UNITS
            )[: work.num_slots]
            return (
                p,
                slots,
                f"best fit: {name} has {count} whole GPU(s) free, the fewest that "
                f"hold {work.num_slots}",
            )
        return None

    def schedule(self, *, now: float) -> list[Placement]:
        """One placement pass over the queue, interactive first, oldest first.

        Only groups whose capacity or queue changed since the last pass are
        looked at. Returns the placements made; each is now counted against
        its provider.
        """
        placed: list[Placement] = []
        dirty, self._dirty = self._dirty, set()
        for group in sorted(dirty):
            buckets = self._queues.get(group)
            if buckets:
                self._schedule_group(group, buckets, now, placed)
        return placed

    def _schedule_group(
        self,
        group: str,
        buckets: dict[tuple[int, bool, int], list[tuple[int, str]]],
        now: float,
        placed: list[Placement],
    ) -> None:
        index = self._indexes.get(group)
        if index is None or not (index.partial or index.full):
            return
        heads = [(key[0], bucket[0][0], key) for key, bucket in buckets.items()]
        heapq.heapify(heads)
        failed_frac = failed_whole = math.inf
        while heads and (index.partial or index.full):
            _, _, key = heapq.heappop(heads)
            _, whole, need = key
            if need >= (failed_whole if whole else failed_frac):
                continue  # a smaller need of this kind already found no room
            bucket = buckets[key]
            work = self._work[bucket[0][1]]
            fit = self._fit(work)
            if fit is None:
                if whole:
                    failed_whole = min(failed_whole, need)
                else:
                    failed_frac = min(failed_frac, need)
                    failed_whole = 1  # no GPU has that much free, so none is whole
                continue
            p, slots, why = fit
            for slot in slots:
                p.free[slot] -= work.units
            p.tenants.add(work.request.workload_id)
            self._units_in_use += work.units * work.num_slots
            self._index(p)
            del bucket[0]
            self._num_queued -= 1
            if bucket:
                heapq.heappush(heads, (key[0], bucket[0][0], key))
            else:
                del buckets[key]
            work.queued_at = None
            work.provider, work.slots = p.name, slots
            placed.append(
                self._decide(
                    Placement(work.request.workload_id, p.name, slots, why, now)
                )
            )

    def _wait_reason(self, work: _Work) -> str:
        index = self._indexes.get(work.group_key, _Index())
        largest_partial = max((e[0] for e in index.partial), default=0)
        most_whole = index.full[-1][0] if index.full else 0
        largest = 1.0 if most_whole else largest_partial / GPU_UNITS
        where = "" if work.group_key == SHARED_GROUP else f" in {work.group_key}"
        return (
            f"needs {work.request.gpus:g} GPUs; the largest free share of one GPU"
            f"{where} is {largest:.2f} and the most whole free GPUs on one "
            f"provider {most_whole}"
        )

    # -- views -------------------------------------------------------------

    @property
    def gpus_lent(self) -> float:
        return self._units_lent / GPU_UNITS

    @property
    def gpus_in_use(self) -> float:
        return self._units_in_use / GPU_UNITS

    def placement_of(self, workload_id: str) -> str | None:
        work = self._work.get(workload_id)
        return None if work is None else work.provider

    def is_queued(self, workload_id: str) -> bool:
        work = self._work.get(workload_id)
        return work is not None and work.queued_at is not None

    def num_queued(self) -> int:
        return self._num_queued

    def queue(self, *, now: float) -> list[QueueEntry]:
        """The waiting workloads in the order the next pass will consider them."""
        entries = sorted(
            (KIND_RANK[self._work[wid].request.kind], seq, wid)
            for buckets in self._queues.values()
            for bucket in buckets.values()
            for seq, wid in bucket
        )
        out = []
        for position, (_, _, wid) in enumerate(entries):
            work = self._work[wid]
            out.append(
                QueueEntry(
                    wid,
                    work.request.kind,
                    work.request.gpus,
                    position,
                    work.queued_at if work.queued_at is not None else now,
                    self._wait_reason(work),
                )
            )
        return out

    def providers(self) -> list[ProviderView]:
        return [
            ProviderView(
                p.name,
                p.num_gpus,
                (sum(p.cap) - sum(p.free)) / GPU_UNITS,
                p.state,
                tuple(sorted(p.tenants)),
                None if p.group == SHARED_GROUP else p.group,
            )
            for p in sorted(self._providers.values(), key=lambda p: p.name)
        ]

    def provider_state(self, name: str) -> ProviderState | None:
        p = self._providers.get(name)
        return None if p is None else p.state

    def tenants_of(self, name: str) -> tuple[str, ...]:
        p = self._providers.get(name)
        return () if p is None else tuple(sorted(p.tenants))

    def recent_decisions(self) -> list[Decision]:
        return list(self._log)
