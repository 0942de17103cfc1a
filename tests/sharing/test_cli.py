"""`raysys provider join|leave` and the sharing section of `raysys status`, on a
real local cluster started with `raysys up`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
CONTROLLER = "sharing-cli-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raysys(
    *args: str, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "raysys"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def _python(
    code: str, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = dict(os.environ, RAYSYS_STATE_DIR=str(tmp_path_factory.mktemp("state")))
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["RAYSYS_SHARING_CONTROLLER"] = CONTROLLER
    up = _raysys(
        "up",
        "--providers", "0",
        "--port", str(_free_port()),
        "--dashboard-port", str(_free_port()),
        "--object-store-mb", "128",
        env=env,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    # Providers that joined and never left (lab-a, lab-dup when the whole
    # module runs) go down with the cluster, and so do their records.
    records = Path(env["RAYSYS_STATE_DIR"]) / "providers"
    down = _raysys("down", env=env)
    assert down.returncode == 0, down.stderr
    assert sorted(p.name for p in records.glob("*")) == []


def test_join_status_leave(cluster, tmp_path):
    env = cluster
    for name, gpus in (("lab-a", "2"), ("lab-b", "1")):
        joined = _raysys(
            "provider", "join", "--name", name, "--gpus", gpus, "--object-store-mb", "128",
            "--controller", CONTROLLER, env=env,
        )  # fmt: skip
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert f"provider {name} joined" in joined.stdout

    bad = _raysys("provider", "join", "--name", "../x", "--gpus", "1", env=env)
    assert bad.returncode == 2 and "'../x' is refused" in bad.stderr

    # A tenant workload on the platform (the controller outlives this script).
    started = _python(
        f"""
        import time
        from raysys.runtime import init_ray
        from raysys.sharing import SharingClient
        from raysys.sharing.examples import Counter
        init_ray()
        client = SharingClient.start(store={str(tmp_path / "ckpt")!r},
                                     controller_name={CONTROLLER!r}, poll_interval_s=0.2,
                                     heartbeat_interval_s=0.5, heartbeat_timeout_s=5)
        client.wait_for_providers(2, timeout_s=60)
        client.submit(Counter, dict(tenant="t", name="c", gpus=1, num_steps=100000,
                      checkpoint=dict(every_steps=20)), step_delay_s=0.02)
        deadline = time.time() + 120
        while time.time() < deadline:
            (w,) = client.status().workloads
            if w.state == "running" and w.step > 5:
                break
            time.sleep(0.2)
        print("HOST", w.provider, w.state)
        """,
        env,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    host = started.stdout.split("HOST ")[1].split()[0]
    assert host == "lab-b"  # best fit: the 1-GPU provider holds a 1-GPU need

    status = _raysys("status", env=env)
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert (
        f"sharing platform (controller {CONTROLLER}): 2 provider(s), 1 workload(s)"
        in text
    )
    assert any(
        line.startswith("lab-b") and "active" in line for line in text.splitlines()
    )
    assert any(
        line.startswith("t/c") and "running" in line for line in text.splitlines()
    )

    left = _raysys("provider", "leave", "--name", host, "--deadline", "20", env=env)
    assert left.returncode == 0, left.stdout + left.stderr
    assert f"provider {host} has left" in left.stdout

    moved = _python(
        f"""
        import time
        from raysys.runtime import init_ray
        from raysys.sharing import SharingClient
        init_ray()
        client = SharingClient.connect({CONTROLLER!r})
        deadline = time.time() + 120
        while time.time() < deadline:
            (w,) = client.status().workloads
            if w.state == "running":
                break
            time.sleep(0.2)
        (m,) = client.migrations()
        print("MIGRATION", m.kind, m.lost_steps, m.stop_step == m.resumed_step, m.to_provider)
        """,
        env,
    )
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "MIGRATION graceful 0 True lab-a" in moved.stdout

    after = _raysys("status", env=env).stdout
    rows = {line.split()[0]: line for line in after.splitlines() if line.split()}
    assert "gone" in rows[host]
    assert "running" in rows["t/c"] and "lab-a" in rows["t/c"]
    assert "migrations 1/1 succeeded" in after

    # The same numbers through Ray's metrics API: every node's Prometheus
    # endpoint is scraped until the controller's next export arrives.
    scraped = _python(
        """
        import json, time, urllib.request
        import ray
        from raysys.runtime import init_ray
        init_ray()
        wanted = ("ray_raysys_sharing_migrations_succeeded_total",
                  "ray_raysys_sharing_gpus_lent")
        found = {}
        deadline = time.time() + 90
        while time.time() < deadline and len(found) < len(wanted):
            for node in ray.nodes():
                if not node["Alive"]:
                    continue
                url = (f"http://{node['NodeManagerAddress']}:"
                       f"{node['MetricsExportPort']}/metrics")
                try:
                    text = urllib.request.urlopen(url, timeout=5).read().decode()
                except OSError:
                    continue
                for line in text.splitlines():
                    name = line.split("{")[0].split(" ")[0]
                    if name in wanted:
                        found[name] = (line.split("{")[1].split("}")[0],
                                       float(line.rsplit(" ", 1)[1]))
            time.sleep(2)
        print("METRICS", json.dumps(found))
        """,
        env,
    )
    assert scraped.returncode == 0, scraped.stdout + scraped.stderr
    metrics = json.loads(scraped.stdout.split("METRICS ")[1].splitlines()[0])
    tags, succeeded = metrics["ray_raysys_sharing_migrations_succeeded_total"]
    assert 'kind="graceful"' in tags and succeeded == 1.0
    assert metrics["ray_raysys_sharing_gpus_lent"][1] == 2.0  # lab-a's 2, lab-b gone

    stopped = _python(
        f"""
        from raysys.runtime import init_ray
        from raysys.sharing import SharingClient
        init_ray()
        SharingClient.connect({CONTROLLER!r}).shutdown()
        """,
        env,
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_a_taken_provider_name_is_refused(cluster):
    env = cluster
    state_dir = Path(env["RAYSYS_STATE_DIR"])
    joined = _raysys(
        "provider", "join", "--name", "lab-dup", "--gpus", "2", "--object-store-mb", "128",
        "--controller", CONTROLLER, env=env,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stdout + joined.stderr
    node_id = joined.stdout.split("joined: node ")[1].split(",")[0]
    record = (state_dir / "providers" / "lab-dup.json").read_text()
    cluster_state = (state_dir / "local-cluster.json").read_text()

    again = _raysys(
        "provider", "join", "--name", "lab-dup", "--gpus", "1", "--object-store-mb", "128",
        "--controller", CONTROLLER, env=env,
    )  # fmt: skip
    assert again.returncode == 2, again.stdout + again.stderr
    assert again.stdout == ""
    assert (
        f"error: provider name 'lab-dup' is already in use by node {node_id}"
        in again.stderr
    )
    # nothing of the first provider changed, and no second node started
    assert (state_dir / "providers" / "lab-dup.json").read_text() == record
    assert (state_dir / "local-cluster.json").read_text() == cluster_state
    status = _raysys("status", env=env)
    rows = [line.split() for line in status.stdout.splitlines()]
    assert [r[:4] for r in rows if r and r[0] == "lab-dup"] == [
        ["lab-dup", "true", "2", "2"]
    ]
    # lab-dup stays: `raysys down` at the end of the module takes it with it


@pytest.mark.parametrize(
    "argv, message",
    [
        (["leave", "--name", "lab-a", "--grace", "-5"], "--grace must be"),
        (["leave", "--name", "lab-a", "--grace", "nan"], "got nan"),
        (["join", "--name", "lab-a", "--gpus", "1", "--cpus", "-1"], "--cpus"),
        (
            ["join", "--name", "lab-a", "--gpus", "1", "--object-store-mb", "0"],
            "--object-store-mb",
        ),
        (["bogus"], "unknown provider command 'bogus'"),
    ],
)
def test_bad_provider_arguments_are_refused_before_any_cluster_work(
    argv, message, capsys
):
    from raysys.cli import main

    assert main(["provider", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.out + captured.err
