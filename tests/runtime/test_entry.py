"""Entry points: SIGTERM runs a job's cleanup."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

JOB = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from raysys.runtime import Config, run_job

    class Cfg(Config):
        marker: str

    def body(cfg):
        Path(cfg.marker + ".started").write_text("")
        try:
            time.sleep(60)
        finally:
            Path(cfg.marker).write_text("cleaned up")

    sys.exit(run_job(Cfg, body))
    """
)


def test_sigterm_ends_a_job_through_its_cleanup(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", JOB, "--marker", str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "marker.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert marker.read_text() == "cleaned up"
