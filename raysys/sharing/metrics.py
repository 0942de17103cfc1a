"""Platform metrics: GPU utilisation over time, migrations, lost work, queueing.

`SharingMetrics` is plain Python shared by the controller and the simulation.
`RayMetricsExporter` publishes the same numbers through `ray.util.metrics`, so
they appear in Ray's Prometheus endpoint and dashboard next to Ray's own.

Definitions:
    gpu_utilization: time integral of GPUs held by tenants divided by the time
        integral of GPUs lent by providers present.
    lost GPU-seconds: GPUs times seconds of work that had to be redone because
        it was not in a committed checkpoint when a provider left.
    queueing delay: seconds from submission to first start, by kind.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class UtilisationSample:
    t_s: float
    gpus_lent: float
    gpus_in_use: float
    num_queued: int


@dataclass
class SharingMetrics:
    """Accumulates the platform's numbers as events happen.

    Args:
        sample_every_s: spacing of the utilisation timeline samples.
    """

    sample_every_s: float = 1.0
    lent_gpu_s: float = 0.0
    used_gpu_s: float = 0.0
    lost_gpu_s: float = 0.0
    migrations_attempted: dict[str, int] = field(
        default_factory=lambda: defaultdict(int)
    )
    migrations_succeeded: dict[str, int] = field(
        default_factory=lambda: defaultdict(int)
    )
    queue_delays_s: dict[str, list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    timeline: list[UtilisationSample] = field(default_factory=list)
    _last: tuple[float, float, float] | None = None

    def observe(
        self, now: float, gpus_lent: float, gpus_in_use: float, num_queued: int = 0
    ) -> None:
        """Record the GPUs lent and in use from ``now`` on."""
        if self._last is not None:
            t, lent, used = self._last
            dt = max(0.0, now - t)
            self.lent_gpu_s += dt * lent
            self.used_gpu_s += dt * used
        self._last = (now, gpus_lent, gpus_in_use)
        if not self.timeline or now - self.timeline[-1].t_s >= self.sample_every_s:
            self.timeline.append(
                UtilisationSample(now, gpus_lent, gpus_in_use, num_queued)
            )

    def migration_attempted(self, kind: str) -> None:
        self.migrations_attempted[kind] += 1

    def migration_succeeded(self, kind: str) -> None:
        self.migrations_succeeded[kind] += 1

    def lost(self, gpu_seconds: float) -> None:
        self.lost_gpu_s += max(0.0, gpu_seconds)

    def queue_delay(self, kind: str, seconds: float) -> None:
        self.queue_delays_s[kind].append(max(0.0, seconds))

    @property
    def gpu_utilization(self) -> float:
        return self.used_gpu_s / self.lent_gpu_s if self.lent_gpu_s > 0 else 0.0

    @property
    def num_migrations_attempted(self) -> int:
        return sum(self.migrations_attempted.values())

    @property
    def num_migrations_succeeded(self) -> int:
        return sum(self.migrations_succeeded.values())

    def queue_delay_percentile(self, kind: str, q: float) -> float | None:
        values = self.queue_delays_s.get(kind)
        return float(np.percentile(values, q)) if values else None

    def summary(self) -> dict[str, object]:
        return {
            "gpu_utilization": self.gpu_utilization,
            "migrations_attempted": self.num_migrations_attempted,
            "migrations_succeeded": self.num_migrations_succeeded,
            "migrations_by_kind": {
                k: {"attempted": v, "succeeded": self.migrations_succeeded.get(k, 0)}
                for k, v in sorted(self.migrations_attempted.items())
            },
            "lost_gpu_seconds": self.lost_gpu_s,
            "queue_delay_p50_s": {
                k: self.queue_delay_percentile(k, 50)
                for k in sorted(self.queue_delays_s)
            },
            "queue_delay_max_s": {
                k: max(v) for k, v in sorted(self.queue_delays_s.items()) if v
            },
        }


class RayMetricsExporter:
    """The same numbers as Ray metrics (``raysys_sharing_*``), for Prometheus."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.gpus_lent = Gauge(
            "raysys_sharing_gpus_lent", "GPUs lent by providers present"
        )
        self.gpus_in_use = Gauge(
            "raysys_sharing_gpus_in_use", "GPUs held by tenant workloads"
        )
        self.utilization = Gauge(
            "raysys_sharing_gpu_utilization", "GPUs in use divided by GPUs lent"
        )
        self.queued = Gauge(
            "raysys_sharing_queued_workloads", "workloads waiting for a place"
        )
        self.migrations_attempted = Counter(
            "raysys_sharing_migrations_attempted",
            "tenant migrations started, by kind (graceful or sudden)",
            tag_keys=("kind",),
        )
        self.migrations_succeeded = Counter(
            "raysys_sharing_migrations_succeeded",
            "tenant migrations that resumed elsewhere from a committed checkpoint",
            tag_keys=("kind",),
        )
        self.lost_gpu_seconds = Counter(
            "raysys_sharing_lost_gpu_seconds", "GPU-seconds of work redone after a loss"
        )
        self._queue_delay = Histogram(
            "raysys_sharing_queue_delay_s",
            "seconds from submission to first start",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800],
            tag_keys=("kind",),
        )

    def observe(self, gpus_lent: float, gpus_in_use: float, num_queued: int) -> None:
        self.gpus_lent.set(gpus_lent)
        self.gpus_in_use.set(gpus_in_use)
        self.utilization.set(gpus_in_use / gpus_lent if gpus_lent else 0.0)
        self.queued.set(num_queued)

    def migration_attempted(self, kind: str) -> None:
        self.migrations_attempted.inc(1, tags={"kind": kind})

    def migration_succeeded(self, kind: str) -> None:
        self.migrations_succeeded.inc(1, tags={"kind": kind})

    def lost(self, gpu_seconds: float) -> None:
        if gpu_seconds > 0:
            self.lost_gpu_seconds.inc(gpu_seconds)

    def queue_delay(self, kind: str, seconds: float) -> None:
        self._queue_delay.observe(max(0.0, seconds), tags={"kind": kind})
