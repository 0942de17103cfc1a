"""Secure defaults: token auth on, loopback binding, loud warnings otherwise."""

from __future__ import annotations

import logging
import stat

import pytest
from support import free_port

from raysys.runtime import local_cluster, security
from raysys.runtime.errors import ClusterError
from raysys.runtime.local_cluster import LocalClusterConfig


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("lab-head.example.edu", False),
    ],
)
def test_is_loopback(host, loopback):
    assert security.is_loopback(host) is loopback


def test_token_source_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert security.token_source({"HOME": str(home)}) is None
    (home / ".ray" / "auth_token").write_text("   \n")  # empty counts as none
    assert security.token_source({"HOME": str(home)}) is None
    (home / ".ray" / "auth_token").write_text("abc")
    assert security.token_source({"HOME": str(home)}) == str(home / ".ray/auth_token")
    named = tmp_path / "named"
    named.write_text("def")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named)}
    assert security.token_source(env) == str(named)
    assert security.token_source({**env, "RAY_AUTH_TOKEN": "x"}) == "RAY_AUTH_TOKEN"


@pytest.mark.parametrize(
    "host, auth, level, text",
    [
        ("0.0.0.0", False, logging.WARNING, "SECURITY WARNING"),
        ("127.0.0.1", False, logging.WARNING, "every user of this machine"),
        ("0.0.0.0", True, logging.INFO, "clear text unless a TLS proxy"),
    ],
)
def test_exposure_is_logged_by_severity(caplog, host, auth, level, text):
    with caplog.at_level(logging.INFO, logger="raysys.runtime.security"):
        security.warn_if_exposed(host, auth)
    (record,) = caplog.records
    assert record.levelno == level and text in record.getMessage()


def test_loopback_with_auth_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="raysys.runtime.security"):
        assert security.warn_if_exposed("127.0.0.1", True) is True
    assert caplog.records == []


def test_local_cluster_defaults_are_secure():
    cfg = LocalClusterConfig()
    assert cfg.auth is True
    assert security.is_loopback(cfg.dashboard_host)


def test_raysys_up_warns_before_binding_everywhere_without_auth(
    caplog, monkeypatch, tmp_path
):
    started = []

    def refuse(args, env, what):  # stands in for `ray start`: nothing starts
        started.append((args, env["RAY_AUTH_MODE"]))
        raise ClusterError("not starting Ray in this test")

    monkeypatch.setenv("RAYSYS_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(local_cluster, "_run_ray_start", refuse)
    cfg = LocalClusterConfig(
        dashboard_host="0.0.0.0",
        auth=False,
        providers=0,
        port=free_port(),
        dashboard_port=free_port(),
    )
    with (
        caplog.at_level(logging.WARNING, logger="raysys.runtime.security"),
        pytest.raises(ClusterError),
    ):
        local_cluster.up(cfg)
    assert "SECURITY WARNING" in caplog.text
    ((args, auth_mode),) = started
    assert "--dashboard-host=0.0.0.0" in args and auth_mode == "disabled"
    assert not (tmp_path / "local-cluster.json").exists()


def test_raysys_up_binds_the_dashboard_to_loopback_with_token(monkeypatch, tmp_path):
    started = []

    def refuse(args, env, what):
        started.append((args, env["RAY_AUTH_MODE"]))
        raise ClusterError("not starting Ray in this test")

    monkeypatch.setenv("RAYSYS_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(local_cluster, "_run_ray_start", refuse)
    monkeypatch.setattr(local_cluster, "ensure_auth_token", lambda: None)
    with pytest.raises(ClusterError):
        local_cluster.up(
            LocalClusterConfig(
                providers=0, port=free_port(), dashboard_port=free_port()
            )
        )
    ((args, auth_mode),) = started
    assert "--dashboard-host=127.0.0.1" in args
    assert "--node-ip-address=127.0.0.1" in args
    assert auth_mode == "token"
    # its own Ray temp dir, so a job's driver can only find this cluster
    (temp_dir,) = [a.split("=", 1)[1] for a in args if a.startswith("--temp-dir=")]
    assert "raysys-" in temp_dir and temp_dir != "/tmp/ray"


def test_the_token_raysys_up_creates_is_for_its_owner_only(monkeypatch, tmp_path):
    # `ray get-auth-token --generate` writes it with the umask's mode, 0644 under
    # the usual umask: readable by every user of a shared machine.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    local_cluster.ensure_auth_token()
    token = tmp_path / ".ray" / "auth_token"
    assert token.read_text().strip()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert not security.token_file_exposed(token)


def test_a_token_file_others_can_read_is_warned_about(caplog, tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o644)
    env = {"RAY_AUTH_TOKEN_PATH": str(token), "HOME": str(tmp_path)}
    with caplog.at_level(logging.WARNING, logger="raysys.runtime.security"):
        security.warn_if_token_exposed(env)
    assert "chmod 600" in caplog.text and str(token) in caplog.text
    caplog.clear()
    token.chmod(0o600)
    security.warn_if_token_exposed(env)
    assert caplog.text == ""
