"""The campus job's config: inputs given as relative paths survive the job
leaving its working directory, and bad values stop it before any cluster."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from raysys.runtime.config import load_config
from raysys.runtime.errors import ConfigError, RemoteTimeout

JOB = Path(__file__).resolve().parents[2] / "jobs" / "campus.py"


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", JOB.parent / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the annotations there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def campus():
    return load_job("campus.py")


def test_relative_inputs_are_read_after_the_job_leaves_its_folder(
    campus, tmp_path, monkeypatch
):
    data = tmp_path / "inputs"
    data.mkdir()
    (data / "prompts.jsonl").write_text(
        json.dumps({"prompt": "first question"})
        + "\n"
        + json.dumps({"turns": ["second question"]})
        + "\n"
    )
    (data / "trace.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        campus.CampusConfig,
        [
            "--prompts", "inputs/prompts.jsonl",
            "--trace", "inputs/trace.csv",
            "--moe-prompts", "2",
            "--store", "ckpt",
            "--out", "out",
        ],
    )  # fmt: skip
    campus.absolute_paths(cfg)
    os.chdir(tmp_path.parent)  # as Campus.start does
    assert cfg.out == tmp_path / "out"
    assert cfg.store == str(tmp_path / "ckpt")
    specs = campus.tenant_specs(cfg)
    assert specs["serving"][1]["trace"] == str(data / "trace.csv")
    prompts = specs["moe"][1]["prompts"]
    assert len(prompts) == 2
    assert "first question" in prompts[0] and "second question" in prompts[1]
    assert campus.describe_inputs(cfg)["moe"] == str(data / "prompts.jsonl")


def test_bad_values_name_the_field(campus, tmp_path):
    with pytest.raises(ConfigError, match="nows_instances") as e:
        load_config(campus.CampusConfig, ["--set", "nows_instances=many"])
    assert "'many'" in str(e.value)
    with pytest.raises(ConfigError, match="providers"):
        load_config(campus.CampusConfig, ["--providers", "2"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(campus.CampusConfig, ["--trace", str(tmp_path / "missing.csv")])
    with pytest.raises(ConfigError, match="systems must be"):
        load_config(campus.CampusConfig, ["--systems", "nows", "gpu"])
    with pytest.raises(ConfigError, match="nows_solver"):
        load_config(campus.CampusConfig, ["--set", "nows_solver=minres"])
    with pytest.raises(ConfigError, match="nows_rtol"):
        load_config(campus.CampusConfig, ["--nows-rtol", "5"])
    with pytest.raises(ConfigError, match="bogus_knob: Extra inputs"):
        load_config(campus.CampusConfig, ["--set", "serving_arrow.bogus_knob=1"])


def test_a_bad_trace_fails_before_any_cluster_starts(campus, tmp_path, monkeypatch):
    bad = tmp_path / "trace.csv"
    bad.write_text("name,prompt\nx,1\n")
    cfg = load_config(
        campus.CampusConfig,
        ["--trace", str(bad), "--systems", "serving", "--out", str(tmp_path / "o")],
    )

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a bad trace")

    monkeypatch.setattr(campus.Campus, "start", no_cluster)
    with pytest.raises(ConfigError, match="lacks column"):
        campus.main(cfg)


def test_the_serving_own_job_replays_the_same_requests(campus, tmp_path):
    """The serving record's ``own_job`` reads the tenant's trace and settings."""
    import shlex

    from raysys.campus.tenants import ServingFleet
    from raysys.serving.trace import load_trace

    cfg = load_config(
        campus.CampusConfig, ["--out", str(tmp_path), "--serving-requests", "40"]
    )
    campus.absolute_paths(cfg)
    path = campus.write_builtin_trace(cfg)
    fleet = ServingFleet(**campus.serving_kwargs(cfg))
    want = fleet.builtin_trace()
    state = {"records": "[]", "flips": "[]", "num_clipped": 0}
    state |= {"num_checked": 0, "num_matching": 0}
    record = campus.serving_record(cfg, "campus-serving/serving", "done", state)
    argv = shlex.split(record["own_job"])
    assert argv[:2] == ["python", "jobs/serve_trace.py"]
    serve = load_job("serve_trace.py").ServeTraceConfig
    job = load_config(serve, argv[2:])
    assert job.trace == path and job.mode == "real"
    got = load_trace(job.trace).head(job.max_requests)
    assert len(got.requests) == len(want.requests) == 40
    for a, b in zip(got.requests, want.requests, strict=True):
        assert (a.request_id, a.prompt_tokens, a.output_tokens) == (
            b.request_id,
            b.prompt_tokens,
            b.output_tokens,
        )
        assert a.arrival_s == pytest.approx(b.arrival_s - want.requests[0].arrival_s)
    assert (job.policy, job.instances, job.rate_scale) == ("arrow", 4, 4.0)
    assert (job.ttft_slo_s, job.tpot_slo_s) == (0.1, 0.02)
    assert (job.seed, job.real_model_context, job.real_num_cpus) == (0, 512, 0.25)
    assert job.arrow.cooldown_s == 2.0 and job.arrow.monitor_interval_s == 0.5
    assert job.arrow.num_intervals == 2


@pytest.mark.parametrize("num_instances", [3, 5])
def test_the_nows_own_job_solves_the_same_instances(campus, tmp_path, num_instances):
    import shlex

    import numpy as np

    from raysys.solvers.datasets import load_instances

    rng = np.random.default_rng(0)
    darcy = tmp_path / "darcy_test.npz"
    np.savez(darcy, x=rng.random((5, 8, 8)) > 0.5, y=rng.random((5, 8, 8)))
    cfg = load_config(
        campus.CampusConfig,
        ["--out", str(tmp_path / "out"), "--darcy", str(darcy)]
        + ["--nows-instances", str(num_instances)],
    )
    campus.absolute_paths(cfg)
    cfg.out.mkdir()
    written = campus.write_darcy_subset(cfg)
    state = {"results": "[]"}
    record = campus.nows_record(cfg, "campus-nows/nows", "done", state)
    argv = shlex.split(record["own_job"])
    assert argv[:2] == ["python", "jobs/nows_solve.py"]
    job = load_config(load_job("nows_solve.py").NowsSolveConfig, argv[2:])
    if num_instances == 5:  # the whole file: the job reads it
        assert written is None and Path(job.data) == darcy
    else:
        assert written == Path(job.data) == cfg.out / "darcy_test-first3.npz"
    theirs = load_instances(job.data)
    mine = load_instances(darcy)[:num_instances]  # what the tenant solves
    assert len(theirs) == num_instances
    for a, b in zip(theirs, mine, strict=True):
        assert a.family == b.family == "darcy"
        assert np.array_equal(a.fields["a"], b.fields["a"])
    assert (job.solver, job.rtol) == ("cg", 1e-5)


def test_a_system_named_twice_is_refused(campus, tmp_path):
    # It ran once, silently.
    with pytest.raises(ConfigError, match="each named once"):
        load_config(
            campus.CampusConfig,
            ["--systems", "nows", "nows", "--out", str(tmp_path)],
        )


class _Stuck:
    """A sharing client whose one tenant never ends."""

    def __init__(self):
        self.polls = 0

    def status(self):
        from types import SimpleNamespace

        self.polls += 1
        tenant = SimpleNamespace(
            workload_id="w-1", name="nows", state="running", provider="p-0", step=1
        )
        return SimpleNamespace(at=0.0, workloads=[tenant], providers=[])


def test_the_timeout_bounds_the_start_up_too(campus, tmp_path):
    # The clock started only once the tenants ran: start-up (a cluster, the
    # providers joining) came on top of --timeout-s.
    cfg = load_config(
        campus.CampusConfig,
        ["--timeout-s", "5", "--no-disrupt", "--out", str(tmp_path)],
    )
    run = campus.Campus(cfg, started=time.monotonic() - 6)  # start-up took 6 s
    run.client, run.wids = _Stuck(), {"nows": "w-1"}
    with pytest.raises(RemoteTimeout, match="--timeout-s 5 ran out"):
        run.run()
    assert run.client.polls == 1
    with pytest.raises(RemoteTimeout, match="before starting the sharing"):
        run.check_time("starting the sharing platform")
