"""The ``raysys`` command and `local_cluster.up` on odd input, stale records and
interruptions, without starting Ray (``ray start`` is stood in for)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import free_port, sigterm_runs_cleanup

from raysys import cli
from raysys.runtime import local_cluster
from raysys.runtime.errors import ClusterError, ConfigError
from raysys.runtime.local_cluster import ClusterState, LocalClusterConfig, NodeRecord


@pytest.fixture
def state_dir(monkeypatch, tmp_path):
    path = tmp_path / "state"
    monkeypatch.setenv("RAYSYS_STATE_DIR", str(path))
    return path


@pytest.fixture
def no_ray_start(monkeypatch):
    """`ray start` that starts nothing; the calls are recorded."""
    calls = []

    def refuse(args, env, what):
        calls.append(what)
        raise ClusterError("not starting Ray in this test")

    monkeypatch.setattr(local_cluster, "_run_ray_start", refuse)
    monkeypatch.setattr(local_cluster, "ensure_auth_token", lambda: None)
    return calls


def free_ports() -> dict[str, int]:
    return {"port": free_port(), "dashboard_port": free_port()}


def marked_sleeper(cluster_id: str, node: str) -> subprocess.Popen:
    """A process carrying a node's markers, as the node's Ray processes do."""
    env = dict(
        os.environ,
        **{
            local_cluster.CLUSTER_MARKER: cluster_id,
            local_cluster.NODE_MARKER: f"{cluster_id}/{node}",
        },
    )
    return subprocess.Popen(["sleep", "60"], env=env)


def test_up_reads_config_files_and_set(monkeypatch, tmp_path, capsys):
    # They were parsed and then dropped: the cluster started with the defaults.
    seen = []
    monkeypatch.setattr(
        local_cluster, "up", lambda cfg: seen.append(cfg) or sys.exit(0)
    )
    path = tmp_path / "up.yaml"
    path.write_text("providers: 5\n")
    with pytest.raises(SystemExit):
        cli.main(["up", "--config", str(path), "--set", "gpus_per_provider=2"])
    assert (seen[0].providers, seen[0].gpus_per_provider) == (5, 2.0)
    assert cli.main(["up", "--set", "providers=abc"]) == 2
    assert "providers" in capsys.readouterr().err


def test_a_state_folder_that_is_a_file_fails_before_anything_starts(
    monkeypatch, tmp_path, no_ray_start
):
    path = tmp_path / "state"
    path.write_text("")
    monkeypatch.setenv("RAYSYS_STATE_DIR", str(path))
    with pytest.raises(ConfigError, match=f"{path}.*is a file"):
        local_cluster.up(LocalClusterConfig(providers=0, **free_ports()))
    assert no_ray_start == []


def test_a_port_in_use_is_named_before_ray_starts(state_dir, no_ray_start):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for field, flag in (("port", "--port"), ("dashboard_port", "--dashboard-port")):
            ports = free_ports() | {field: port}
            with pytest.raises(ClusterError, match=f"port {port} .*{flag}"):
                local_cluster.up(LocalClusterConfig(providers=0, **ports))
    assert no_ray_start == []


def test_the_gcs_and_dashboard_ports_must_differ():
    with pytest.raises(ValueError, match="both 8265"):
        LocalClusterConfig(port=8265, dashboard_port=8265)


def _record(state_dir: Path, cluster_id: str, gcs_port: int) -> ClusterState:
    state = ClusterState(
        cluster_id=cluster_id,
        gcs_address=f"127.0.0.1:{gcs_port}",
        dashboard_url="http://127.0.0.1:1",
        auth=True,
        started_at=time.time(),
        nodes=[
            NodeRecord(name="head", kind="head", marker=f"{cluster_id}/head"),
            NodeRecord(
                name="provider-0", kind="provider", marker=f"{cluster_id}/provider-0"
            ),
        ],
    )
    local_cluster.write_state(state)
    return state


def test_up_stops_what_is_left_of_a_recorded_cluster_whose_head_died(
    state_dir, no_ray_start
):
    # Its record was overwritten and its surviving providers ran on, forgotten.
    cluster_id = f"stale{os.getpid()}"
    left = marked_sleeper(cluster_id, "provider-0")
    try:
        _record(state_dir, cluster_id, free_port())
        with pytest.raises(ClusterError, match="not starting Ray"):
            local_cluster.up(LocalClusterConfig(providers=0, **free_ports()))
        assert left.wait(10) is not None
        assert local_cluster.read_state() is None
    finally:
        left.kill()


def test_an_interrupted_up_stops_what_it_started(state_dir, monkeypatch):
    # Ctrl-C (or SIGTERM, which `raysys` turns into an exit) in the middle of
    # starting providers left the head running.
    started = []

    def start(args, env, what):
        if started:
            raise KeyboardInterrupt
        started.append(subprocess.Popen(["sleep", "60"], env=env))

    monkeypatch.setattr(local_cluster, "_run_ray_start", start)
    monkeypatch.setattr(local_cluster, "ensure_auth_token", lambda: None)
    try:
        with pytest.raises(KeyboardInterrupt):
            local_cluster.up(LocalClusterConfig(providers=2, **free_ports()))
        assert started[0].wait(10) is not None
        assert local_cluster.read_state() is None
    finally:
        for proc in started:
            proc.kill()


def test_an_interrupted_command_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "down", interrupted)
    try:
        status = cli.main(["down"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `raysys` as a traceback")
    assert status == 130
    assert capsys.readouterr().err == "raysys down: interrupted\n"


def test_status_names_a_missing_token_and_a_stale_record(
    state_dir, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    state = _record(state_dir, "nohead", free_port())
    assert cli.main(["status"]) == 1
    assert "the recorded cluster nohead" in capsys.readouterr().out
    monkeypatch.setattr(local_cluster, "running_cluster", lambda: state)
    assert cli.main(["status"]) == 1
    assert "no Ray token is on this machine" in capsys.readouterr().err


def test_status_notes_recorded_nodes_whose_processes_are_gone(state_dir):
    # Ray reports a killed node alive until its heartbeats time out (~30 s).
    cluster_id = f"gone{os.getpid()}"
    head = marked_sleeper(cluster_id, "head")
    try:
        notes = cli.vanished_nodes(_record(state_dir, cluster_id, 1))
    finally:
        head.kill()
    assert len(notes) == 1 and "provider-0 is recorded but none" in notes[0]


CONNECTED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from raysys.cli import connect_driver
    from raysys.runtime.entry import exit_on_sigterm

    exit_on_sigterm()  # as `raysys` does
    connect_driver(sys.argv[1])
    Path(sys.argv[2] + ".started").write_text("")
    try:
        time.sleep(60)
    finally:
        Path(sys.argv[2]).write_text("cleaned up")
    """
)


def test_sigterm_ends_a_connected_cli_command_through_its_cleanup(
    tmp_path, ray_cluster
):
    # ray.init installs Ray's handler: exit status 15 and a fatal signal report.
    marker = tmp_path / "marker"
    argv = [sys.executable, "-c", CONNECTED, ray_cluster.address, str(marker)]
    sigterm_runs_cleanup(marker, argv)
