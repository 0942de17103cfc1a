"""Jobs submitted through Ray's job API to a cluster `raysys up` started.

One local cluster per module (a head and one provider with one logical GPU, its
own state dir and free ports); each test submits real jobs from ``jobs/`` with
``raysys submit`` (a plain ``ray job submit`` underneath) and checks their
status and output through the job API.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str, env: dict[str, str], timeout: float = 240):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = dict(os.environ, RAYSYS_STATE_DIR=str(tmp_path_factory.mktemp("state")))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(var, None)
    port, dashboard_port = _free_port(), _free_port()
    up = _run(
        str(BIN / "raysys"),
        "up",
        "--providers",
        "1",
        "--gpus-per-provider",
        "1",
        "--head-cpus",
        "1",
        "--cpus-per-provider",
        "2",
        "--port",
        str(port),
        "--dashboard-port",
        str(dashboard_port),
        "--object-store-mb",
        "128",
        env=env,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    yield env, f"http://127.0.0.1:{dashboard_port}"
    down = _run(str(BIN / "raysys"), "down", env=env)
    assert down.returncode == 0, down.stderr


def submit(env, address, *entrypoint, submission_id=None):
    submission_id = submission_id or f"raysys-test-{uuid.uuid4().hex[:8]}"
    result = _run(
        str(BIN / "raysys"),
        "submit",
        "--address",
        address,
        "--submission-id",
        submission_id,
        "--",
        *entrypoint,
        env=env,
    )
    return submission_id, result


def job_api(env, address, path):
    """GET ``/api/jobs/<path>`` from the job API, with the cluster's token."""
    from raysys.runtime.security import token_source

    source = token_source(env)
    assert source is not None, "raysys up left no token"
    token = env["RAY_AUTH_TOKEN"] if source == "RAY_AUTH_TOKEN" else None
    token = token or Path(source).read_text().strip()
    request = urllib.request.Request(
        f"{address}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_cluster_check_job_runs_on_every_provider(cluster, tmp_path):
    env, address = cluster
    out = tmp_path / "check.json"
    job_id, result = submit(
        env,
        address,
        "python",
        "jobs/cluster_check.py",
        "--num-gpus",
        "1",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "token auth on" in result.stdout
    assert job_api(env, address, job_id)["status"] == "SUCCEEDED"
    assert "1/1 providers answered" in job_api(env, address, f"{job_id}/logs")["logs"]

    report = json.loads(out.read_text())
    assert report["connection"] == "address"  # the driver joined the cluster
    assert report["auth_mode"] == "token"
    assert len(report["nodes"]) == 2 and report["num_providers"] == 1
    (probe,) = report["probes"]
    assert probe["provider"] == "provider-0" and probe["answered"]
    assert report["bundles"] == [{"CPU": 1.0, "GPU": 1.0}]


def test_eight_gpus_on_a_one_gpu_cluster_fails_with_its_reason(cluster, tmp_path):
    env, address = cluster
    job_id, result = submit(
        env,
        address,
        "python",
        "jobs/cluster_check.py",
        "--num-gpus",
        "8",
        "--out",
        str(tmp_path / "check.json"),
    )
    assert result.returncode != 0
    assert job_api(env, address, job_id)["status"] == "FAILED"
    logs = job_api(env, address, f"{job_id}/logs")["logs"]
    assert "cluster_check can never be scheduled" in logs
    assert "8 GPU, the most any node offers is 1 (provider-0)" in logs


def test_a_job_with_the_wrong_token_is_refused(cluster, tmp_path):
    env, address = cluster
    stranger = dict(env, HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token")
    job_id, result = submit(
        stranger, address, "python", "jobs/cluster_check.py", "--out", "/dev/null"
    )
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "Unauthorized" in text or "401" in text or "invalid" in text.lower()
    # nothing was queued under that id
    with pytest.raises(urllib.error.HTTPError) as info:
        job_api(env, address, job_id)
    assert info.value.code == 404


def _tiny_sharing_inputs(folder: Path) -> tuple[Path, Path]:
    """A pod list of four GPU jobs and one availability series, for sharing_trace."""
    pods = folder / "pods.csv"
    pods.write_text(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
        "creation_time,deletion_time,scheduled_time\n"
        "a,1,1,1,1000,,LS,Running,0,600,0\n"
        "b,1,1,1,500,,BE,Running,60,1260,60\n"
        "c,1,1,2,1000,,BE,Running,120,2520,120\n"
        "d,1,1,0,0,,BE,Running,0,10,0\n"  # asks no GPU: skipped
    )
    series = folder / "availability"
    series.mkdir()
    (series / "pool.json").write_text(
        json.dumps({"metadata": {"gap_seconds": 300}, "data": [4, 4, 2, 4, 4, 3, 4]})
    )
    return pods, series


# One short job of each system, each checked through its own report.
SYSTEM_JOBS = {
    "nows": (
        ["jobs/nows_solve.py", "--generate", "2", "--resolution", "16"],
        lambda r: (
            r["summary"]["num_instances"] == 2
            and r["summary"]["num_converged_cold"] == 2
            and r["summary"]["num_converged_warm"] == 2
        ),
    ),
    "serving": (
        ["jobs/serve_trace.py", "--mode", "sim", "--max-requests", "40", "--no-plot"],
        lambda r: r["num_requests"] == 40 and r["num_completed"] == 40,
    ),
    "moe": (
        ["jobs/moe_generate.py", "--num-prompts", "1", "--max-new-tokens", "8"],
        lambda r: r["num_prompts"] == 1 and r["num_tokens"] == 8,
    ),
    "sharing": (
        ["jobs/sharing_trace.py", "--providers", "8", "--provider-gpus", "2"],
        lambda r: (
            r["rows_total"] == 4
            and r["jobs_used"] == 3
            and [x["policy"] for x in r["results"]]
            == ["share-migrate", "share-restart", "static"]
            and all(x["jobs_submitted"] == 3 for x in r["results"])
        ),
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("system", list(SYSTEM_JOBS))
def test_a_short_job_of_each_system_runs_through_the_job_api(cluster, tmp_path, system):
    env, address = cluster
    argv, check = SYSTEM_JOBS[system]
    out = tmp_path / "report.json"
    extra = ["--out", str(out)]
    if system == "sharing":
        pods, series = _tiny_sharing_inputs(tmp_path)
        extra += ["--jobs", str(pods), "--availability", str(series)]
    job_id, result = submit(env, address, "python", *argv, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert job_api(env, address, job_id)["status"] == "SUCCEEDED"
    report = json.loads(out.read_text())
    assert check(report), report
