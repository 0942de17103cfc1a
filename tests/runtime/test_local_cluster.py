"""`raysys up` / `status` / `down` on real processes, with token authentication."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from raysys.runtime import local_cluster

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raysys(
    *args: str, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "raysys"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    env = dict(os.environ, RAYSYS_STATE_DIR=str(tmp_path_factory.mktemp("state")))
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    up = _raysys(
        "up",
        "--providers",
        "2",
        "--gpus-per-provider",
        "2",
        "--port",
        str(port),
        "--dashboard-port",
        str(dash),
        "--object-store-mb",
        "128",
        env=env,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    yield env, f"http://127.0.0.1:{dash}"
    down = _raysys("down", env=env)
    assert down.returncode == 0, down.stderr


def _submit(
    env: dict[str, str], dashboard: str, workdir: Path
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            str(workdir),
            "--",
            "python",
            "probe.py",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_status_lists_head_and_providers_with_gpus(local):
    env, _ = local
    status = _raysys("status", env=env)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    providers = [line for line in lines if line.startswith("provider-")]
    assert len(providers) == 2
    assert all(line.split()[3] == "2" for line in providers)  # GPU column
    assert any(line.startswith("head") for line in lines)
    assert "token auth on" in status.stdout


def test_job_with_token_runs_and_sees_all_nodes(local, tmp_path):
    env, dashboard = local
    (tmp_path / "probe.py").write_text(
        "import ray\nray.init()\n"
        "print('GPUS', ray.cluster_resources().get('GPU'), 'NODES', len(ray.nodes()))\n"
    )
    result = _submit(dict(env, RAY_AUTH_MODE="token"), dashboard, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "GPUS 4.0 NODES 3" in result.stdout


def test_workers_on_providers_leave_the_drivers_working_dir_alone(local, tmp_path):
    """Every node unpacks a job's working dir for its own workers, replacing a
    copy it has not unpacked itself: on nodes sharing one temp dir a provider
    would delete the directory the driver runs in. Each node has its own."""
    env, dashboard = local
    (tmp_path / "probe.py").write_text(
        "import os, ray\n"
        "ray.init()\n"
        "inode = os.stat('.').st_ino\n"
        "open('written-by-driver.txt', 'w').close()\n"
        "@ray.remote(num_cpus=0)\n"
        "def where():\n"
        "    return os.getcwd()\n"
        "dirs = ray.get([where.options(resources={f'provider:provider-{i}': 0.01})"
        ".remote() for i in range(2)])\n"
        "print('DRIVER', os.getcwd())\n"
        "print('PROVIDERS', *dirs)\n"
        "print('KEPT', os.path.exists('written-by-driver.txt'), "
        "os.stat(os.getcwd()).st_ino == inode)\n"
    )
    result = _submit(dict(env, RAY_AUTH_MODE="token"), dashboard, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "KEPT True True" in result.stdout
    driver = result.stdout.split("DRIVER ")[1].split()[0]
    providers = result.stdout.split("PROVIDERS ")[1].split()[:2]
    assert len({driver, *providers}) == 3  # one copy per node


def test_job_without_token_is_refused(local, tmp_path):
    env, dashboard = local
    (tmp_path / "probe.py").write_text("print('SHOULD NOT RUN')\n")
    stranger = dict(env, HOME=str(tmp_path), RAY_AUTH_MODE="disabled")
    stranger.pop("RAY_AUTH_TOKEN", None)
    stranger.pop("RAY_AUTH_TOKEN_PATH", None)
    result = _submit(stranger, dashboard, tmp_path)
    assert result.returncode != 0
    assert "SHOULD NOT RUN" not in result.stdout
    assert "Unauthorized" in result.stdout + result.stderr or "token" in (
        result.stdout + result.stderr
    )


def test_dashboard_refuses_unauthenticated_http(local):
    import urllib.error
    import urllib.request

    _, dashboard = local
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10)
    assert info.value.code == 401


def test_kill_node_stops_only_that_provider(local):
    env, _ = local
    os.environ["RAYSYS_STATE_DIR"], saved = (
        env["RAYSYS_STATE_DIR"],
        os.environ["RAYSYS_STATE_DIR"],
    )
    try:
        state = local_cluster.read_state()
        assert state is not None and state.provider("provider-1") is not None
        local_cluster.kill_node(state, "provider-1")
        assert local_cluster.read_state().provider("provider-1") is None
        assert local_cluster.running_cluster() is not None  # head still answers
    finally:
        os.environ["RAYSYS_STATE_DIR"] = saved
