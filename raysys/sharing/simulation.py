"""Discrete-event simulation of the sharing platform on real traces.

It replays a GPU job trace on providers whose presence follows availability
series, deciding placements and evacuations with the very `PlacementPolicy` and
`MigrationPolicy` objects the Ray platform uses. Three platforms are compared:

``share-migrate``
    the shared pool with checkpoints: a provider that gives notice has its
    tenants checkpointed and moved (nothing lost); one that vanishes costs each
    tenant the work since its last periodic checkpoint.
``share-restart``
    the same shared pool without checkpoints: every evacuated tenant starts
    over.
``static``
    no sharing: each lab's jobs run only on the lab's own providers, without
    checkpoints.

Churn model: provider ``i`` belongs to pool ``i mod K`` (one pool per
availability series) with rank ``i div K`` inside it. When a series says
``c`` of its peak ``c_max`` machines are live, the pool's providers of rank
below ``round(c / c_max * pool_size)`` are present. A provider that drops out
leaves suddenly with probability ``sudden_fraction``, otherwise it gives
``notice_s`` of notice first (the spot-instance warning). Series repeat when the
job trace outlasts them.

Accounting: a tenant holds its GPUs from placement to release (restore
overhead included); its useful work starts ``restore_s`` after a placement that
resumes from a checkpoint. Periodic checkpoints cost no time (they are taken
asynchronously); a graceful checkpoint takes ``checkpoint_s`` during which the
tenant holds its GPUs but makes no progress. A migration is counted as
succeeded when the tenant's state left the provider intact (a checkpoint
committed at notice, or its last periodic one), so it resumes without losing
more than one checkpoint interval.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from raysys.runtime.errors import ConfigError
from raysys.sharing.metrics import SharingMetrics
from raysys.sharing.policy import (
    MigrationAction,
    MigrationPolicy,
    PlacementPolicy,
    Refusal,
    Request,
)
from raysys.sharing.trace import AvailabilitySeries, TraceJob
from raysys.sharing.workload import WorkloadKind

logger = logging.getLogger(__name__)

POLICIES = ("share-migrate", "share-restart", "static")


@dataclass(frozen=True)
class SimSettings:
    """Knobs of one simulation run (validated by the job's config)."""

    num_providers: int = 1000
    provider_gpus: tuple[int, ...] = (8, 2)
    num_labs: int = 100
    notice_s: float = 120.0
    sudden_fraction: float = 0.25
    checkpoint_interval_s: float = 600.0
    checkpoint_s: float = 20.0
    restore_s: float = 20.0
    arrival_speedup: float = 1.0
    max_gap_s: float = 3600.0
    tail_s: float = 0.0
    sample_every_s: float = 3600.0
    seed: int = 0


@dataclass
class SimResult:
    policy: str
    gpu_utilization: float
    gpu_allocation: float
    jobs_submitted: int
    jobs_completed: int
    jobs_refused: int
    migrations_attempted: int
    migrations_succeeded: int
    lost_gpu_hours: float
    interactive_wait_p50_s: float | None
    interactive_wait_p95_s: float | None
    batch_wait_p50_s: float | None
    departures_graceful: int
    departures_sudden: int
    horizon_s: float
    timeline_t_s: list[float] = field(default_factory=list)
    timeline_utilization: list[float] = field(default_factory=list)
    timeline_gpus_lent: list[float] = field(default_factory=list)


class _Ev(IntEnum):
    # Order of events at the same instant: machines leave before anything
    # else, and a returning machine is there before arrivals look for room.
    GONE = 0
    CHURN = 1
    CHECKPOINTED = 2
    FINISH = 3
    ARRIVAL = 4
    SAMPLE = 5


@dataclass
class _Job:
    trace: TraceJob
    request: Request
    arrival_s: float
    done_s: float = 0.0  # progress at the start of the current run (seconds of work)
    useful_start: float | None = None  # when the current run's work began
    run_id: int = 0
    first_start: float | None = None
    finished: bool = False
    refused: bool = False
    # A graceful checkpoint is being written; if the machine goes first, the
    # job falls back to the periodic checkpoint it had at notice.
    checkpointing: bool = False
    fallback_s: float = 0.0


def make_policy(name: str, settings: SimSettings) -> PlacementPolicy:
    """The placement policy object a simulated platform uses."""
    if name not in POLICIES:
        raise ValueError(
            f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}"
        )
    migration = MigrationPolicy(
        checkpointing=name == "share-migrate",
        safety_margin_s=0.0,
        immediate_grace_s=settings.notice_s,
    )
    return PlacementPolicy(
        share=name != "static", migration=migration, decision_log_size=1
    )


class Simulation:
    """One platform replaying one trace; `run` returns its `SimResult`."""

    def __init__(
        self,
        policy: str,
        jobs: list[TraceJob],
        series: list[AvailabilitySeries],
        settings: SimSettings,
    ):
        self.name = policy
        self.settings = settings
        self.policy = make_policy(policy, settings)
        self.migration: MigrationPolicy = self.policy.migration
        self.metrics = SharingMetrics(sample_every_s=settings.sample_every_s)
        self.rng = random.Random(settings.seed)
        self.series = series
        self.events: list[tuple[float, int, int, object]] = []
        self._order = 0
        self.now = 0.0
        self.jobs: dict[str, _Job] = {}
        self.departures = {"graceful": 0, "sudden": 0}
        self.num_refused = 0
        self.num_completed = 0
        self.lost_gpu_s = 0.0

        labs = [f"lab-{i % settings.num_labs}" for i in range(settings.num_providers)]
        random.Random(settings.seed + 1).shuffle(labs)
        self.provider_lab = labs
        self.provider_gpus = [
            settings.provider_gpus[i % len(settings.provider_gpus)]
            for i in range(settings.num_providers)
        ]
        self.present = [False] * settings.num_providers
        self.pool_members = [
            list(range(k, settings.num_providers, len(series)))
            for k in range(len(series))
        ]
        self.pool_alive = [0] * len(series)

        arrivals = replay_arrivals(jobs, settings.max_gap_s, settings.arrival_speedup)
        last = 0.0
        for job, arrival in zip(jobs, arrivals, strict=True):
            last = max(last, arrival)
            lab = f"lab-{zlib.crc32(job.name.encode()) % settings.num_labs}"
            request = Request(job.name, job.gpus, job.kind, lab, settings.checkpoint_s)
            self.jobs[job.name] = _Job(job, request, arrival)
            self._push(arrival, _Ev.ARRIVAL, job.name)
        self.horizon = last + settings.tail_s
        _check_event_counts(self.horizon, series, settings)
        for k in range(len(series)):
            self._push(0.0, _Ev.CHURN, (k, 0))
        t = 0.0
        while t <= self.horizon:
            self._push(t, _Ev.SAMPLE, None)
            t += settings.sample_every_s

    def _push(self, t: float, kind: _Ev, payload: object) -> None:
        self._order += 1
        heapq.heappush(self.events, (t, int(kind), self._order, payload))

    # -- providers ---------------------------------------------------------

    def _provider_name(self, i: int) -> str:
        return f"p{i:05d}"

    def _churn(self, pool: int, step: int) -> None:
        s = self.series[pool]
        count = s.counts[step % len(s.counts)]
        members = self.pool_members[pool]
        target = round(count / s.peak * len(members))
        before = self.pool_alive[pool]
        for rank in range(before, target):
            i = members[rank]
            if not self.present[i]:
                self.present[i] = True
                self.policy.add_provider(
                    self._provider_name(i),
                    self.provider_gpus[i],
                    group=self.provider_lab[i],
                    now=self.now,
                )
        for rank in range(target, before):
            i = members[rank]
            if self.rng.random() < self.settings.sudden_fraction:
                self.departures["sudden"] += 1
                self._gone(i, "provider vanished")
            else:
                self.departures["graceful"] += 1
                self._notice(i)
        self.pool_alive[pool] = target
        self._push(self.now + s.gap_s, _Ev.CHURN, (pool, step + 1))

    def _notice(self, i: int) -> None:
        name = self._provider_name(i)
        for ev in self.policy.reclaim(
            name, now=self.now, deadline_s=self.settings.notice_s
        ):
            if ev.action is MigrationAction.CHECKPOINT_AND_MOVE:
                job = self.jobs[ev.workload_id]
                self.metrics.migration_attempted("graceful")
                job.fallback_s = self._committed(job)
                job.done_s = self._progress(job)
                job.run_id += 1
                job.useful_start = None
                job.checkpointing = True
                self._push(
                    self.now + self.settings.checkpoint_s,
                    _Ev.CHECKPOINTED,
                    job.trace.name,
                )
            # Other actions keep running until the machine is gone.
        self._push(self.now + self.settings.notice_s, _Ev.GONE, i)

    def _gone(self, i: int, reason: str) -> None:
        if not self.present[i]:
            return
        self.present[i] = False
        for ev in self.policy.provider_gone(
            self._provider_name(i), now=self.now, reason=reason
        ):
            job = self.jobs[ev.workload_id]
            progress = self._progress(job)
            if job.checkpointing:
                # Gone before the notice checkpoint was written: fall back to
                # the periodic checkpoint (the attempt was counted at notice).
                job.checkpointing = False
                committed = job.fallback_s
                self.metrics.migration_succeeded("graceful")
            else:
                kind = "graceful" if ev.graceful else "sudden"
                self.metrics.migration_attempted(kind)
                if ev.action is MigrationAction.RESTART_FROM_SCRATCH:
                    committed = 0.0
                else:
                    committed = self._committed(job)
                    self.metrics.migration_succeeded(kind)
            self.lost_gpu_s += (progress - committed) * job.request.gpus
            job.done_s = committed
            job.run_id += 1
            job.useful_start = None
            self.policy.requeue(ev.workload_id, now=self.now, reason=reason)

    # -- work accounting ---------------------------------------------------

    def _progress(self, job: _Job) -> float:
        if job.useful_start is None or self.now <= job.useful_start:
            return job.done_s
        return min(job.trace.duration_s, job.done_s + self.now - job.useful_start)

    def _committed(self, job: _Job) -> float:
        if job.useful_start is None or self.now <= job.useful_start:
            return job.done_s
        interval = self.settings.checkpoint_interval_s
        ran = self.now - job.useful_start
        return job.done_s + math.floor(ran / interval) * interval

    # -- main loop ---------------------------------------------------------

    def _place(self) -> None:
        for placement in self.policy.schedule(now=self.now):
            job = self.jobs[placement.workload_id]
            if job.first_start is None:
                job.first_start = self.now
                self.metrics.queue_delay(
                    job.request.kind.value, self.now - job.arrival_s
                )
            overhead = self.settings.restore_s if job.done_s > 0 else 0.0
            job.useful_start = self.now + overhead
            job.run_id += 1
            finish = job.useful_start + job.trace.duration_s - job.done_s
            self._push(finish, _Ev.FINISH, (job.trace.name, job.run_id))

    def run(self) -> SimResult:
        policy_logger = logging.getLogger("raysys.sharing.policy")
        level = policy_logger.level
        policy_logger.setLevel(
            logging.WARNING
        )  # millions of decisions: count, don't log
        try:
            while self.events:
                t, kind, _, payload = heapq.heappop(self.events)
                if t > self.horizon:
                    break
                self.now = t
                if kind == _Ev.ARRIVAL:
                    job = self.jobs[payload]
                    if isinstance(self.policy.submit(job.request, now=t), Refusal):
                        self.num_refused += 1
                        job.refused = True
                elif kind == _Ev.FINISH:
                    name, run_id = payload
                    job = self.jobs[name]
                    if run_id == job.run_id and not job.finished:
                        job.finished = True
                        job.done_s = job.trace.duration_s
                        self.num_completed += 1
                        self.policy.finish(name)
                elif kind == _Ev.CHURN:
                    self._churn(*payload)
                elif kind == _Ev.GONE:
                    self._gone(payload, "provider left at the end of its notice")
                elif kind == _Ev.CHECKPOINTED:
                    job = self.jobs[payload]
                    if job.checkpointing:
                        job.checkpointing = False
                        self.metrics.migration_succeeded("graceful")
                        self.policy.requeue(
                            payload, now=t, reason="checkpointed on notice"
                        )
                elif kind == _Ev.SAMPLE:
                    pass
                self._place()
                self.metrics.observe(
                    t,
                    self.policy.gpus_lent,
                    self.policy.gpus_in_use,
                    self.policy.num_queued(),
                )
            self.now = self.horizon
            self.metrics.observe(
                self.horizon, self.policy.gpus_lent, self.policy.gpus_in_use
            )
        finally:
            policy_logger.setLevel(level)
        return self._result()

    def _result(self) -> SimResult:
        # Waiting time runs from arrival to first start; a job still waiting at
        # the horizon counts with its wait so far (never flattering a policy).
        waits: dict[WorkloadKind, list[float]] = {k: [] for k in WorkloadKind}
        for job in self.jobs.values():
            if job.refused or job.arrival_s > self.horizon:
                continue
            started = job.first_start if job.first_start is not None else self.horizon
            waits[job.request.kind].append(started - job.arrival_s)

        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        # Utilisation counts work that stays done: progress kept at the horizon,
        # not restarts, redone steps or restore time.
        self.now = self.horizon
        useful_gpu_s = sum(
            self._progress(job) * job.request.gpus for job in self.jobs.values()
        )
        lent = self.metrics.lent_gpu_s
        timeline = self.metrics.timeline
        return SimResult(
            policy=self.name,
            gpu_utilization=useful_gpu_s / lent if lent else 0.0,
            gpu_allocation=self.metrics.gpu_utilization,
            jobs_submitted=len(self.jobs),
            jobs_completed=self.num_completed,
            jobs_refused=self.num_refused,
            migrations_attempted=self.metrics.num_migrations_attempted,
            migrations_succeeded=self.metrics.num_migrations_succeeded,
            lost_gpu_hours=self.lost_gpu_s / 3600.0,
            interactive_wait_p50_s=pct(waits[WorkloadKind.INTERACTIVE], 50),
            interactive_wait_p95_s=pct(waits[WorkloadKind.INTERACTIVE], 95),
            batch_wait_p50_s=pct(waits[WorkloadKind.BATCH], 50),
            departures_graceful=self.departures["graceful"],
            departures_sudden=self.departures["sudden"],
            horizon_s=self.horizon,
            timeline_t_s=[s.t_s for s in timeline],
            timeline_utilization=[
                s.gpus_in_use / s.gpus_lent if s.gpus_lent else 0.0 for s in timeline
            ],
            timeline_gpus_lent=[s.gpus_lent for s in timeline],
        )


# Bounds on the events one replay schedules: past them a run would take hours
# and most of the memory, from settings that are almost surely a mistake.
MAX_TIMELINE_SAMPLES = 200_000
MAX_CHURN_STEPS = 5_000_000


def _check_event_counts(
    horizon_s: float, series: Sequence[AvailabilitySeries], settings: SimSettings
) -> None:
    """Refuse a replay whose timeline or churn would need too many events.

    Raises:
        ConfigError: the sample spacing, the horizon or a series' gap is off.
    """
    samples = horizon_s / settings.sample_every_s
    if not math.isfinite(samples) or samples > MAX_TIMELINE_SAMPLES:
        raise ConfigError(
            f"a horizon of {horizon_s:.3g} s sampled every "
            f"{settings.sample_every_s:g} s needs {samples:.3g} timeline samples "
            f"(at most {MAX_TIMELINE_SAMPLES:,}); raise sample_every_s, or shorten "
            "the horizon (tail_s, arrival_speedup, max_gap_s)"
        )
    steps = sum(horizon_s / s.gap_s for s in series)
    if not math.isfinite(steps) or steps > MAX_CHURN_STEPS:
        raise ConfigError(
            f"a horizon of {horizon_s:.3g} s needs {steps:.3g} availability steps "
            f"over {len(series)} series (at most {MAX_CHURN_STEPS:,}); shorten the "
            "horizon (tail_s, arrival_speedup, max_gap_s) or use series with "
            "longer gaps"
        )


def replay_arrivals(
    jobs: list[TraceJob], max_gap_s: float, speedup: float
) -> list[float]:
    """Arrival times of the replay: trace times from the first arrival, with
    every idle gap longer than ``max_gap_s`` shortened to it (0 keeps gaps),
    divided by ``speedup``."""
    out, t, previous = [], 0.0, None
    for job in jobs:
        if previous is not None:
            gap = job.arrival_s - previous
            t += min(gap, max_gap_s) if max_gap_s > 0 else gap
        previous = job.arrival_s
        out.append(t / speedup)
    return out


def auto_speedup(
    jobs: list[TraceJob],
    series: list[AvailabilitySeries],
    settings: SimSettings,
    target_load: float,
) -> float:
    """Arrival compression that makes the offered load ``target_load`` of the
    GPUs the pool lends on average.

    The production trace was recorded on a cluster far larger than its own
    load; replayed at its own pace on 1,000 providers it would leave the pool
    idle and every policy would look the same.
    """
    if not jobs:
        return 1.0
    span = replay_arrivals(jobs, settings.max_gap_s, 1.0)[-1]
    offered = sum(j.gpus * j.duration_s for j in jobs)
    mean_alive = float(np.mean([np.mean(s.counts) / s.peak for s in series]))
    total_gpus = sum(
        settings.provider_gpus[i % len(settings.provider_gpus)]
        for i in range(settings.num_providers)
    )
    capacity = mean_alive * total_gpus
    if span <= 0 or offered <= 0 or capacity <= 0:
        return 1.0
    return max(1.0, target_load * capacity * span / offered)
