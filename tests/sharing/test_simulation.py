"""The trace simulation, on hand-made traces with hand-computed outcomes and on
the real traces."""

from __future__ import annotations

import csv
import json

import pytest
from support import shared_data

from raysys.runtime.errors import ConfigError
from raysys.sharing.simulation import SimSettings, Simulation
from raysys.sharing.trace import AvailabilitySeries, TraceJob
from raysys.sharing.workload import WorkloadKind


def one_provider(**overrides) -> SimSettings:
    base = dict(
        num_providers=1,
        provider_gpus=(1,),
        num_labs=1,
        notice_s=120.0,
        checkpoint_interval_s=600.0,
        checkpoint_s=20.0,
        restore_s=10.0,
        max_gap_s=0.0,
        tail_s=10_000.0,
        sample_every_s=100.0,
    )
    base.update(overrides)
    return SimSettings(**base)


# The single provider is there for 1000 s, away for 1000 s, then back.
AWAY_ONCE = [AvailabilitySeries("pool", 1000.0, (1, 0) + (1,) * 50)]
JOB = [TraceJob("job", 0.0, 3000.0, 1.0, WorkloadKind.INTERACTIVE)]


def test_sudden_departure_costs_at_most_one_interval_with_checkpoints():
    settings = one_provider(sudden_fraction=1.0)
    migrate = Simulation("share-migrate", JOB, AWAY_ONCE, settings).run()
    # 1000 s done, last periodic checkpoint at 600 s: 400 s lost
    assert migrate.lost_gpu_hours == pytest.approx(400 / 3600)
    assert (migrate.migrations_attempted, migrate.migrations_succeeded) == (1, 1)
    assert migrate.jobs_completed == 1
    restart = Simulation("share-restart", JOB, AWAY_ONCE, settings).run()
    assert restart.lost_gpu_hours == pytest.approx(1000 / 3600)
    assert (restart.migrations_attempted, restart.migrations_succeeded) == (1, 0)
    # useful work is the same 3000 s; restarts burn more GPU time for it
    assert restart.gpu_allocation > migrate.gpu_allocation


def test_graceful_departure_loses_nothing_with_checkpoints():
    settings = one_provider(sudden_fraction=0.0)
    migrate = Simulation("share-migrate", JOB, AWAY_ONCE, settings).run()
    assert migrate.lost_gpu_hours == 0
    assert (migrate.migrations_attempted, migrate.migrations_succeeded) == (1, 1)
    assert migrate.departures_graceful == 1 and migrate.departures_sudden == 0
    # notice at 1000 s: checkpoint of 1000 s of work, then the machine is gone;
    # it is back at 2000 s, restores for 10 s, and has 2000 s of work left
    assert migrate.jobs_completed == 1
    static = Simulation("static", JOB, AWAY_ONCE, settings).run()
    # without checkpoints the job ran until the machine left (1120 s) for nothing
    assert static.lost_gpu_hours == pytest.approx(1120 / 3600)


def test_static_allocation_leaves_other_labs_idle():
    # two labs of one 1-GPU provider each, both always present; every job
    # belongs to one lab by name hash, so static runs them one by one while
    # sharing runs two at a time
    settings = one_provider(num_providers=2, num_labs=2, tail_s=0.0)
    always = [AvailabilitySeries("pool", 1000.0, (1,) * 100)]
    from zlib import crc32

    names = [n for n in (f"j{i}" for i in range(40)) if crc32(n.encode()) % 2 == 0][:4]
    jobs = [TraceJob(n, 0.0, 1000.0, 1.0, WorkloadKind.BATCH) for n in names]
    jobs.append(TraceJob("end", 3000.0, 1.0, 1.0, WorkloadKind.BATCH))  # horizon
    share = Simulation("share-migrate", jobs, always, settings).run()
    static = Simulation("static", jobs, always, settings).run()
    assert share.horizon_s == static.horizon_s == 3000.0
    # sharing: the four jobs run two at a time and end by 2000 s
    assert share.jobs_completed == 4
    assert share.gpu_utilization == pytest.approx(4000 / 6000)
    # static: one at a time on the lab's own GPU, the other lab's GPU idle
    assert static.jobs_completed == 3
    assert static.gpu_utilization == pytest.approx(3000 / 6000)
    # waits (the job arriving at the horizon waits 0 s in both)
    assert share.batch_wait_p50_s == pytest.approx(0.0)  # 0, 0, 1000, 1000, 0
    assert static.batch_wait_p50_s == pytest.approx(1000.0)  # 0, 1000, 2000, 3000, 0


@pytest.mark.slow
def test_real_traces_sharing_beats_static_and_restart(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
    import sharing_trace

    jobs = shared_data("gpu-cluster/openb_pod_list_default.csv")
    availability = shared_data("provider-churn/AWS2")
    out = tmp_path / "trace.json"
    cfg = sharing_trace.TraceConfig(
        jobs=jobs, availability=availability, providers=1000, out=out
    )
    sharing_trace.main(cfg)
    report = json.loads(out.read_text())
    by = {r["policy"]: r for r in report["results"]}
    assert set(by) == {"share-migrate", "share-restart", "static"}
    # every row of the CSV is either used or counted as skipped
    with jobs.open(newline="") as f:
        num_rows = sum(1 for row in csv.reader(f) if row) - 1  # less the header
    assert report["rows_total"] == num_rows
    assert report["jobs_used"] + report["rows_skipped"] == report["rows_total"]
    assert sum(report["rows_skipped_by_reason"].values()) == report["rows_skipped"]
    migrate = by["share-migrate"]
    assert migrate["migrations_attempted"] > 0
    assert migrate["migrations_succeeded"] == migrate["migrations_attempted"]
    assert migrate["gpu_utilization"] > by["static"]["gpu_utilization"]
    assert migrate["lost_gpu_hours"] < by["share-restart"]["lost_gpu_hours"]
    assert by["share-restart"]["migrations_succeeded"] == 0
    assert (tmp_path / "trace.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "overrides, series_gap_s, complaint",
    [
        ({"sample_every_s": 0.01}, 1000.0, "timeline samples"),
        ({"tail_s": 1e12}, 1000.0, "timeline samples"),
        ({"tail_s": 1e8, "sample_every_s": 1e4}, 1.0, "availability steps"),
    ],
)
def test_replays_needing_too_many_events_are_refused(
    overrides, series_gap_s, complaint
):
    series = [AvailabilitySeries("pool", series_gap_s, (1, 1))]
    with pytest.raises(ConfigError, match=complaint):
        Simulation("share-migrate", JOB, series, one_provider(**overrides))


def test_trace_job_refuses_clashing_plot_paths_and_more_labs_than_providers(
    tmp_path,
):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
    import sharing_trace

    def make(**fields):
        return sharing_trace.TraceConfig(**{"out": tmp_path / "r.json", **fields})

    assert make().out == tmp_path / "r.json"
    for fields, complaint in [
        ({"plot": tmp_path / "r.json"}, "does not end in one of"),
        ({"out": tmp_path / "r.png"}, "would both be written"),
        ({"labs": 11, "providers": 10}, "every lab owns at least one provider"),
    ]:
        with pytest.raises(ValueError, match=complaint):
            make(**fields)


def test_trace_job_logs_malformed_rows_bad_series_and_rounded_waits(tmp_path, caplog):
    """One provider with one GPU, always present; three interactive 1-GPU jobs
    arrive together and run 1000.123 s each, so they wait 0, 1000.123 and
    2000.246 s: p50 1000.123 s, p95 1000.123 + 0.9 * 1000.123 = 1900.2337 s."""
    import logging
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
    import sharing_trace

    pods = tmp_path / "pods.csv"
    rows = [f"job-{i},1,1,1,1000,,LS,Running,0,1000.123,0" for i in range(3)] + [
        "bad,1,1,1,xyz,,LS,Running,0,10,0"
    ]
    pods.write_text(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
        "creation_time,deletion_time,scheduled_time\n" + "\n".join(rows) + "\n"
    )
    series = tmp_path / "series"
    series.mkdir()
    (series / "pool.json").write_text(
        json.dumps({"metadata": {"gap_seconds": 300}, "data": [1] * 12})
    )
    (series / "broken.json").write_text('{"metadata": {}, "data": [1]}')
    cfg = sharing_trace.TraceConfig(
        jobs=pods,
        availability=series,
        providers=1,
        provider_gpus=[1],
        labs=1,
        arrival_speedup=1.0,
        policies=["share-migrate"],
        out=tmp_path / "r.json",
    )
    with caplog.at_level(logging.INFO, logger="sharing_trace"):
        report = sharing_trace.main(cfg)
    (result,) = report.results
    assert result.interactive_wait_p50_s == pytest.approx(1000.123)
    assert result.interactive_wait_p95_s == pytest.approx(1900.2337)
    assert report.malformed_rows == [
        {"line": 5, "reason": "gpu_milli 'xyz' is not a number"}
    ]
    assert report.availability_problems == [
        "broken.json: no 'gap_seconds' field in its metadata"
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"job trace {pods}: skipped 1 malformed row(s): "
        "line 5: gpu_milli 'xyz' is not a number"
    ) in messages
    assert (
        f"availability {series}, not used as is: "
        "broken.json: no 'gap_seconds' field in its metadata"
    ) in messages
    (line,) = [m for m in messages if m.startswith("share-migrate:")]
    assert "interactive wait p50 1000.1 s, p95 1900.2 s (simulated in" in line
