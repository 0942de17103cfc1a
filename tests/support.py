"""Helpers importable from any test module (``from support import shared_data``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A file from the shared real-data folder, or skip the test when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real input {relative} is not present at {SHARED_DATA}")
    return path


BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*cmd: str, env: dict[str, str], timeout: float = 240):
    """Run a command, capturing its output (``BIN`` holds this venv's scripts)."""
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT
    )


@contextlib.contextmanager
def raysys_cluster(
    state_dir: Path,
    *,
    providers: int,
    gpus_per_provider: float = 1,
    head_cpus: int = 1,
    cpus_per_provider: int = 2,
    object_store_mb: int = 128,
):
    """A local cluster started with ``raysys up`` (own state dir and free ports).

    Yields the environment that reaches it and the job API's address; stops it
    with ``raysys down`` afterwards.
    """
    env = dict(os.environ, RAYSYS_STATE_DIR=str(state_dir))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(var, None)
    port, dashboard_port = free_port(), free_port()
    up = run_cli(
        str(BIN / "raysys"), "up",
        "--providers", str(providers),
        "--gpus-per-provider", f"{gpus_per_provider:g}",
        "--head-cpus", str(head_cpus),
        "--cpus-per-provider", str(cpus_per_provider),
        "--port", str(port),
        "--dashboard-port", str(dashboard_port),
        "--object-store-mb", str(object_store_mb),
        env=env,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield env, f"http://127.0.0.1:{dashboard_port}"
    finally:
        down = run_cli(str(BIN / "raysys"), "down", env=env)
        assert down.returncode == 0, down.stderr


def raysys_submit(env, address, *entrypoint, submission_id=None, timeout=600):
    """Submit ``entrypoint`` with ``raysys submit`` (``ray job submit`` underneath)."""
    submission_id = submission_id or f"raysys-test-{uuid.uuid4().hex[:8]}"
    result = run_cli(
        str(BIN / "raysys"), "submit", "--address", address,
        "--submission-id", submission_id, "--", *entrypoint,
        env=env, timeout=timeout,
    )  # fmt: skip
    return submission_id, result


def sigterm_runs_cleanup(
    marker: Path, argv: list[str], env: dict | None = None
) -> None:
    """Start ``argv``, wait for ``<marker>.started``, SIGTERM it, and check that it
    exited 143 with ``marker`` reading "cleaned up" (its ``finally`` ran)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    started = marker.with_name(marker.name + ".started")
    deadline = time.monotonic() + 60
    try:
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:  # a failed check leaves nothing running
            proc.kill()
            proc.wait()
    assert marker.read_text() == "cleaned up"
