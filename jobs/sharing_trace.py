"""Trace-driven comparison of GPU sharing platforms (runs on one CPU, no Ray).

Replays a GPU job trace (Alibaba pod-list CSV, fractional GPUs included) on
providers whose presence follows spot-instance availability series, once per
platform, with the same placement and migration policy objects the Ray
platform uses:

    share-migrate  shared pool, checkpoint and migrate on departures
    share-restart  shared pool, departures restart work from scratch
    static         each lab uses only its own machines, no checkpoints

    python jobs/sharing_trace.py \\
        --jobs ../shared/data/gpu-cluster/openb_pod_list_default.csv \\
        --availability ../shared/data/provider-churn/AWS2 \\
        --providers 1000 --out out/sharing/trace.json

Writes the JSON report (one record per platform in ``results``, plus the rows
skipped and why) and a PNG timeline next to it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from raysys.runtime import Config, Report, run_job
from raysys.runtime.config import OutputFile, check_plot_path
from raysys.runtime.errors import ConfigError
from raysys.runtime.ray_env import PROJECT_ROOT
from raysys.sharing.simulation import (
    POLICIES,
    SimResult,
    SimSettings,
    Simulation,
    auto_speedup,
    replay_arrivals,
)
from raysys.sharing.trace import load_availability, load_gpu_jobs

logger = logging.getLogger("sharing_trace")

SHARED = PROJECT_ROOT.parent / "shared" / "data"
PolicyName = Literal["share-migrate", "share-restart", "static"]


class TraceConfig(Config):
    """Trace-driven comparison of sharing with migration, without, and static."""

    jobs: Path = Field(
        SHARED / "gpu-cluster" / "openb_pod_list_default.csv",
        description="GPU job trace in the Alibaba pod-list CSV format",
    )
    availability: Path = Field(
        SHARED / "provider-churn" / "AWS2",
        description="availability JSON file, or a directory of them (one pool each)",
    )
    providers: int = Field(1000, ge=1, le=100_000, description="number of providers")
    out: OutputFile = Field(
        Path("out/sharing/trace.json"), description="where to write the JSON report"
    )
    plot: OutputFile | None = Field(
        None, description="PNG timeline path (default: the report's path with .png)"
    )
    policies: list[PolicyName] = Field(
        list(POLICIES), description="platforms to compare, in report order"
    )
    provider_gpus: list[int] = Field(
        [1, 2, 4, 8],
        description="GPUs per provider, cycled over providers (each >= 1)",
    )
    labs: int = Field(
        100, ge=1, description="labs owning the providers (static groups)"
    )
    notice_s: float = Field(
        120.0, gt=0, description="notice a graceful departure gives, seconds"
    )
    sudden_fraction: float = Field(
        0.25, ge=0, le=1, description="share of departures without notice, 0 to 1"
    )
    checkpoint_interval_s: float = Field(
        600.0, gt=0, description="periodic checkpoint interval of tenants, seconds"
    )
    checkpoint_s: float = Field(
        20.0, ge=0, description="seconds a checkpoint on notice takes"
    )
    restore_s: float = Field(
        20.0, ge=0, description="seconds a resume from a checkpoint takes"
    )
    target_load: float = Field(
        1.0,
        gt=0,
        description="offered GPU load over the arrival span as a share of the GPUs "
        "lent on average; sets the arrival speed-up unless --arrival-speedup is given",
    )
    arrival_speedup: float | None = Field(
        None, gt=0, description="divide arrival times by this (overrides target_load)"
    )
    max_gap_s: float = Field(
        3600.0,
        ge=0,
        description="shorten idle gaps between arrivals to this many seconds (0 keeps them)",
    )
    tail_s: float = Field(
        21600.0, ge=0, description="seconds simulated after the last arrival"
    )
    max_duration_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="rows running longer than this are skipped (and counted)",
    )
    sample_every_s: float = Field(
        300.0, gt=0, description="spacing of timeline samples, seconds"
    )
    seed: int = Field(0, description="seed of the departure kinds and lab assignment")

    @field_validator("provider_gpus")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(g < 1 for g in value):
            raise ValueError("give one or more GPU counts, each >= 1")
        return value

    @model_validator(mode="after")
    def _check(self) -> TraceConfig:
        check_plot_path(self.out, self.plot)
        if self.labs > self.providers:
            if "labs" in self.model_fields_set:
                raise ValueError(
                    f"--labs {self.labs} exceeds --providers {self.providers}: every "
                    "lab owns at least one provider"
                )
            # The default of 100 labs on a small pool: one lab per provider.
            self.__dict__["labs"] = self.providers
        return self


class PolicyResult(BaseModel):
    policy: PolicyName
    gpu_utilization: float = Field(
        description="GPU-seconds of work kept / GPU-seconds lent"
    )
    gpu_allocation: float = Field(
        description="GPU-seconds held by tenants (redone work included) / lent"
    )
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
    elapsed_s: float


class TraceReport(Report):
    jobs_file: str
    availability: str
    num_providers: int
    rows_total: int
    rows_skipped: int
    rows_skipped_by_reason: dict[str, int]
    malformed_rows: list[dict[str, int | str]] = Field(
        description="the first malformed rows of the job trace: line number and why"
    )
    availability_series: list[str]
    availability_entries_skipped: dict[str, int]
    availability_problems: list[str] = Field(
        description="each availability file skipped or patched, and what is wrong"
    )
    jobs_used: int
    arrival_speedup: float
    horizon_s: float
    settings: dict[str, object]
    results: list[PolicyResult]
    elapsed_s: float
    plot: str | None


def seconds(value: float | None) -> str:
    """A wait for the log: ``"1916.2 s"``, or ``"-"`` when there was none."""
    return "-" if value is None else f"{value:.1f} s"


def plot_timeline(results: list[SimResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for r in results:
        hours = [t / 3600 for t in r.timeline_t_s]
        top.plot(hours, r.timeline_utilization, label=r.policy, linewidth=1.2)
    top.set_ylabel("GPUs in use / GPUs lent")
    top.set_ylim(0, 1.05)
    top.legend(loc="lower right")
    top.set_title(
        "Provider-first GPU sharing on a production trace with provider churn"
    )
    if results:
        r = results[0]
        bottom.plot([t / 3600 for t in r.timeline_t_s], r.timeline_gpus_lent, color="k")
    bottom.set_ylabel("GPUs lent by providers present")
    bottom.set_xlabel("simulated time (hours)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(cfg: TraceConfig) -> TraceReport:
    started = time.perf_counter()
    trace = load_gpu_jobs(cfg.jobs, max_duration_s=cfg.max_duration_s)
    if not trace.jobs:
        malformed = trace.malformed_summary()
        raise ConfigError(
            f"job trace {str(cfg.jobs)!r} has no usable row ({trace.num_rows} rows; "
            f"skipped: {dict(trace.skipped) or 'none'})"
            + (f"; malformed rows: {malformed}" if malformed else "")
        )
    if trace.num_malformed:
        logger.warning(
            "job trace %s: skipped %d malformed row(s): %s",
            cfg.jobs,
            trace.num_malformed,
            trace.malformed_summary(),
        )
    series, series_skipped, series_problems = load_availability(cfg.availability)
    if series_problems:
        logger.warning(
            "availability %s, not used as is: %s",
            cfg.availability,
            "; ".join(series_problems),
        )
    logger.info(
        "trace: %d rows, %d usable, %d skipped %s; %d availability series",
        trace.num_rows,
        len(trace.jobs),
        trace.rows_skipped,
        dict(trace.skipped),
        len(series),
    )
    settings = SimSettings(
        num_providers=cfg.providers,
        provider_gpus=tuple(cfg.provider_gpus),
        num_labs=cfg.labs,
        notice_s=cfg.notice_s,
        sudden_fraction=cfg.sudden_fraction,
        checkpoint_interval_s=cfg.checkpoint_interval_s,
        checkpoint_s=cfg.checkpoint_s,
        restore_s=cfg.restore_s,
        max_gap_s=cfg.max_gap_s,
        tail_s=cfg.tail_s,
        sample_every_s=cfg.sample_every_s,
        seed=cfg.seed,
    )
    speedup = cfg.arrival_speedup or auto_speedup(
        trace.jobs, series, settings, cfg.target_load
    )
    settings = replace(settings, arrival_speedup=speedup)
    span_s = (
        replay_arrivals(trace.jobs, cfg.max_gap_s, speedup)[-1] if trace.jobs else 0
    )
    logger.info(
        "replaying %d jobs over %.1f h (arrivals %.1fx faster) on %d providers",
        len(trace.jobs),
        span_s / 3600,
        speedup,
        cfg.providers,
    )
    sims, results = [], []
    for name in cfg.policies:
        t0 = time.perf_counter()
        sim = Simulation(name, trace.jobs, series, settings).run()
        elapsed = time.perf_counter() - t0
        sims.append(sim)
        fields = {
            k: v for k, v in asdict(sim).items() if k in PolicyResult.model_fields
        }
        results.append(PolicyResult(**fields, elapsed_s=elapsed))
        logger.info(
            "%s: utilisation %.3f, %d/%d jobs done, migrations %d/%d, lost %.1f "
            "GPU-h, interactive wait p50 %s, p95 %s (simulated in %.1f s)",
            name,
            sim.gpu_utilization,
            sim.jobs_completed,
            sim.jobs_submitted,
            sim.migrations_succeeded,
            sim.migrations_attempted,
            sim.lost_gpu_hours,
            seconds(sim.interactive_wait_p50_s),
            seconds(sim.interactive_wait_p95_s),
            elapsed,
        )
    plot_path = check_plot_path(cfg.out, cfg.plot)
    plot_timeline(sims, plot_path)
    report = TraceReport(
        jobs_file=str(cfg.jobs),
        availability=str(cfg.availability),
        num_providers=cfg.providers,
        rows_total=trace.num_rows,
        rows_skipped=trace.rows_skipped,
        rows_skipped_by_reason=dict(trace.skipped),
        malformed_rows=[{"line": m.line, "reason": m.reason} for m in trace.malformed],
        availability_series=[s.name for s in series],
        availability_entries_skipped=dict(series_skipped),
        availability_problems=series_problems,
        jobs_used=len(trace.jobs),
        arrival_speedup=speedup,
        horizon_s=sims[0].horizon_s if sims else 0.0,
        settings={k: v for k, v in asdict(settings).items()},
        results=results,
        elapsed_s=time.perf_counter() - started,
        plot=str(plot_path),
    )
    report.write(cfg.out)
    logger.info("report written to %s, timeline to %s", cfg.out, plot_path)
    return report


if __name__ == "__main__":
    sys.exit(run_job(TraceConfig, main))
