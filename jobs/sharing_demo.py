"""Live demo of the sharing platform: tenants survive a drain and a crash.

On the local cluster (its own one when none is running) it adds three provider
nodes, runs counters and small torch training loops as tenants, then

1. the owner of the provider holding them leaves with a deadline (Ray drain):
   every tenant checkpoints, stops and resumes on another provider;
2. the provider that took them in is killed without warning: every tenant
   resumes from its last committed checkpoint on the third provider.

Each final state is compared with a fault-free run computed in this process,
and the training loss of every step with the uninterrupted run's.

    python jobs/sharing_demo.py --out out/sharing/demo.json

Writes the JSON report and a PNG of the loss curves with the migrations marked.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from raysys.runtime import Config, Report, run_job
from raysys.runtime.config import OutputFile, check_plot_path
from raysys.runtime.errors import ClusterError, RaysysError, RemoteTimeout
from raysys.sharing.localpool import LocalPool
from raysys.sharing.store import StoreLocation

logger = logging.getLogger("sharing_demo")

PROVIDERS = ("demo-a", "demo-b", "demo-c")


class DemoConfig(Config):
    """Counters and torch training loops surviving a drain and a kill."""

    out: OutputFile = Field(
        Path("out/sharing/demo.json"), description="where to write the JSON report"
    )
    plot: OutputFile | None = Field(
        None, description="PNG path (default: the report's path with .png)"
    )
    store: StoreLocation | None = Field(
        None,
        description="checkpoint store directory or URI (default: a fresh directory "
        "next to the report)",
    )
    num_counters: int = Field(2, ge=1, le=8, description="counter tenants (0.25 GPU)")
    num_trainers: int = Field(
        2, ge=1, le=4, description="torch training tenants (0.5 GPU, interactive)"
    )
    num_steps: int = Field(300, ge=50, description="steps every tenant runs")
    checkpoint_every_steps: int = Field(
        10, ge=1, description="checkpoint interval in steps"
    )
    step_delay_s: float = Field(
        0.1, ge=0, description="extra seconds per step, to make the run watchable"
    )
    gpus_per_provider: float = Field(
        2.0, gt=0, description="logical GPUs each demo provider lends"
    )
    drain_deadline_s: float = Field(
        30.0, gt=0, description="deadline the first owner gives when leaving"
    )
    timeout_s: float = Field(
        900.0, gt=0, description="bound on the whole demo, seconds"
    )

    @model_validator(mode="after")
    def _plot_path(self) -> DemoConfig:
        check_plot_path(self.out, self.plot)
        return self


class MigrationRow(BaseModel):
    workload_id: str
    kind: str
    from_provider: str
    to_provider: str | None
    stop_step: int | None
    last_seen_step: int
    resumed_step: int | None
    lost_steps: int | None
    succeeded: bool | None


class DemoReport(Report):
    cluster: str
    providers: list[str]
    drained_provider: str
    killed_provider: str
    workloads: list[str]
    migrations_attempted: int
    migrations_succeeded: int
    lost_steps: dict[str, int]
    restarts: dict[str, int]
    final_states_match_reference: bool
    mismatched_workloads: list[str]
    loss_curve_max_abs_diff: float
    gpu_utilization: float
    queue_delay_p50_s: dict[str, float | None]
    max_wait_over_bound: float = Field(
        description="largest (observed wait / its bound) over all remote waits"
    )
    migrations: list[MigrationRow]
    elapsed_s: float
    plot: str | None


def _wait(client, predicate, what: str, timeout_s: float, *, too_late=None):
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status()
        if predicate(status):
            return status
        if too_late is not None and too_late(status):
            raise RaysysError(
                f"demo: tenants finished before {what}; this machine starts runners "
                "slowly, give them more work with a larger --num-steps or --step-delay-s"
            )
        if time.monotonic() > deadline:
            raise RemoteTimeout(f"demo: {what} did not happen within {timeout_s:g} s")
        time.sleep(0.25)


def plot_losses(results: dict, references: dict, migrations, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for wid, result in results.items():
        steps = sorted(result.metrics)
        (line,) = ax.plot(steps, [result.metrics[s]["loss"] for s in steps], label=wid)
        ref = references[wid]
        ax.plot(range(1, len(ref) + 1), ref, "--", color=line.get_color(), alpha=0.5)
        for m in migrations:
            if m.workload_id == wid and m.resumed_step:
                style = ":" if m.kind == "graceful" else "-."
                ax.axvline(
                    m.resumed_step, color=line.get_color(), alpha=0.6, linestyle=style
                )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(
        "Training loss across migrations\n(solid: on the platform, dashed: fault-free "
        "run, dotted: graceful resume, dash-dot: sudden resume)"
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(cfg: DemoConfig) -> DemoReport:
    from raysys.sharing import SharingClient, WorkloadSpec
    from raysys.sharing.examples import Counter, TinyTrainer, run_reference

    started = time.monotonic()
    cluster = LocalPool("demo")
    client = None
    try:
        mode = cluster.connect()
        # Paths first, then leave the working directory: a submitted job's
        # directory is temporary, and the nodes started below keep their cwd.
        cfg.out = cfg.out.resolve()
        cfg.plot = cfg.plot.resolve() if cfg.plot else None
        if cfg.store is not None and "://" not in cfg.store:
            cfg.store = str(Path(cfg.store).resolve())
        os.chdir(tempfile.gettempdir())
        cluster.add_providers(list(PROVIDERS), cfg.gpus_per_provider)
        store = cfg.store or str(cfg.out.parent / f"checkpoints-{uuid.uuid4().hex[:6]}")
        client = SharingClient.start(
            store=store,
            controller_name=f"raysys-sharing-demo-{uuid.uuid4().hex[:6]}",
            poll_interval_s=0.25,
            heartbeat_interval_s=0.5,
            heartbeat_timeout_s=5.0,
            stop_timeout_s=min(20.0, cfg.drain_deadline_s),
        )
        client.wait_for_providers(len(PROVIDERS), timeout_s=120)
        every = {"every_steps": cfg.checkpoint_every_steps}
        kwargs: dict[str, dict[str, Any]] = {}
        for i in range(cfg.num_counters):
            spec = WorkloadSpec(
                tenant="counters", name=f"count-{i}", gpus=0.25, num_steps=cfg.num_steps,
                checkpoint=every,
            )  # fmt: skip
            kwargs[
                client.submit(
                    Counter,
                    spec,
                    start=i,
                    increment=i + 1,
                    step_delay_s=cfg.step_delay_s,
                )
            ] = dict(start=i, increment=i + 1)
        for i in range(cfg.num_trainers):
            spec = WorkloadSpec(
                tenant="trainers", name=f"train-{i}", gpus=0.5, kind="interactive",
                num_steps=cfg.num_steps, checkpoint=every,
            )  # fmt: skip
            kwargs[
                client.submit(TinyTrainer, spec, seed=i, step_delay_s=cfg.step_delay_s)
            ] = dict(seed=i)
        wids = list(kwargs)
        budget = cfg.timeout_s

        status = _wait(
            client,
            lambda s: all(
                w.state == "running" and w.step >= 2 * cfg.checkpoint_every_steps
                for w in s.workloads
            ),
            "every tenant running",
            budget,
            too_late=lambda s: any(w.state in ("done", "failed") for w in s.workloads),
        )
        drained = max(status.providers, key=lambda p: len(p.tenants)).name
        logger.info(
            "owner of %s leaves with a %.0f s deadline", drained, cfg.drain_deadline_s
        )
        client.leave(drained, deadline_s=cfg.drain_deadline_s)
        status = _wait(
            client,
            lambda s: all(
                w.state == "done"
                or (
                    w.state == "running"
                    and w.provider != drained
                    and w.step >= (w.last_checkpoint_step or 0) + 3
                )
                for w in s.workloads
            ),
            "every tenant moved and running again",
            budget,
        )
        receivers = [p for p in status.providers if p.phase == "active" and p.tenants]
        killed = (
            max(receivers, key=lambda p: len(p.tenants)).name
            if receivers
            else PROVIDERS[1]
        )
        logger.info("switching %s off without warning", killed)
        cluster.kill(killed)
        client.wait(wids, timeout_s=budget)
        status = client.status()
        results = {wid: client.result(wid) for wid in wids}
    finally:
        if client is not None:
            try:
                client.shutdown()
            except (RemoteTimeout, ClusterError) as e:
                logger.warning("platform shutdown: %s", e)
        cluster.close()

    import torch

    mismatched, losses_ref, max_diff = [], {}, 0.0
    for wid, kw in kwargs.items():
        is_trainer = wid.startswith("trainers/")
        ref_state, ref_metrics = run_reference(
            TinyTrainer(**kw) if is_trainer else Counter(**kw), cfg.num_steps
        )
        got = results[wid].final_state
        if is_trainer:
            same = got["num_steps"] == ref_state["num_steps"] and all(
                torch.equal(got["model"][k], v) for k, v in ref_state["model"].items()
            )
            losses_ref[wid] = [m["loss"] for m in ref_metrics]
            curve = results[wid].metrics
            for k, ref_loss in enumerate(losses_ref[wid], start=1):
                got_loss = curve.get(k, {}).get("loss", float("inf"))
                max_diff = max(max_diff, abs(got_loss - ref_loss))
        else:
            same = got == ref_state
        if not same:
            mismatched.append(wid)
    plot_path = check_plot_path(cfg.out, cfg.plot)
    plot_losses(
        {w: r for w, r in results.items() if w in losses_ref},
        losses_ref,
        status.migrations,
        plot_path,
    )
    m = status.metrics
    report = DemoReport(
        cluster=mode,
        providers=list(PROVIDERS),
        drained_provider=drained,
        killed_provider=killed,
        workloads=wids,
        migrations_attempted=m["migrations_attempted"],
        migrations_succeeded=m["migrations_succeeded"],
        lost_steps={w.workload_id: w.lost_steps for w in status.workloads},
        restarts={w.workload_id: w.restarts for w in status.workloads},
        final_states_match_reference=not mismatched,
        mismatched_workloads=mismatched,
        loss_curve_max_abs_diff=max_diff,
        gpu_utilization=m["gpu_utilization"],
        queue_delay_p50_s=m["queue_delay_p50_s"],
        max_wait_over_bound=max(
            (w.max_s / w.bound_s for w in status.waits), default=0.0
        ),
        migrations=[
            MigrationRow(**r.model_dump(include=set(MigrationRow.model_fields)))
            for r in status.migrations
        ],
        elapsed_s=time.monotonic() - started,
        plot=str(plot_path),
    )
    report.write(cfg.out)
    logger.info(
        "migrations %d/%d succeeded, lost steps %s, final states match: %s, loss max diff %.3g, "
        "report %s",
        report.migrations_succeeded,
        report.migrations_attempted,
        report.lost_steps,
        report.final_states_match_reference,
        max_diff,
        cfg.out,
    )
    return report


if __name__ == "__main__":
    sys.exit(run_job(DemoConfig, main))
