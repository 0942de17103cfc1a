"""Stopping marked processes: with grace (SIGTERM first) and without (a switch-off)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from raysys.runtime import local_cluster

# Writes a file when SIGTERM reaches it, then waits to be killed.
CHILD = """
import pathlib, signal, sys, time
def on_term(*_):
    pathlib.Path(sys.argv[1]).write_text("term")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
pathlib.Path(sys.argv[2]).write_text("ready")
while True:
    time.sleep(0.05)
"""


def _start(tmp_path, marker: str) -> tuple[subprocess.Popen, object]:
    term, ready = tmp_path / "term", tmp_path / "ready"
    env = {**os.environ, "RAYSYS_TEST_MARK": marker}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(term), str(ready)], env=env
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the marked child never started"
        time.sleep(0.05)
    return child, term


@pytest.mark.parametrize(
    ("grace_s", "sent", "handled"),
    [(0.0, [signal.SIGKILL], False), (5.0, [signal.SIGTERM], True)],
)
def test_only_a_graceful_stop_lets_handlers_run(
    tmp_path, monkeypatch, grace_s, sent, handled
):
    marker = uuid.uuid4().hex
    child, term = _start(tmp_path, marker)
    signals = []
    real_kill = os.kill

    def kill(pid, sig):  # os.kill of the whole process: Ray's threads pass through
        if pid == child.pid:
            signals.append(sig)
        real_kill(pid, sig)

    monkeypatch.setattr(local_cluster.os, "kill", kill)
    try:
        assert local_cluster.marked_pids("RAYSYS_TEST_MARK", marker) == [child.pid]
        assert local_cluster.kill_marked("RAYSYS_TEST_MARK", marker, grace_s) == 0
        code = child.wait(timeout=10)
        # Switched off: killed outright, no handler ran; stopped: it exited itself.
        assert signals == sent
        assert term.exists() is handled
        assert code == (0 if handled else -signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
