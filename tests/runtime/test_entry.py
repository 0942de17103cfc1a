"""Entry points: SIGTERM runs a job's cleanup."""

from __future__ import annotations

import os
import sys
import textwrap

from support import sigterm_runs_cleanup

JOB = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from raysys.runtime import Config, run_job

    class Cfg(Config):
        marker: str
        connect: bool = False

    def body(cfg):
        if cfg.connect:
            from raysys.runtime.ray_env import init_ray

            init_ray()
        Path(cfg.marker + ".started").write_text("")
        try:
            time.sleep(60)
        finally:
            Path(cfg.marker).write_text("cleaned up")

    sys.exit(run_job(Cfg, body))
    """
)


def _killed_job_cleans_up(tmp_path, *args: str, env: dict | None = None) -> None:
    marker = tmp_path / "marker"
    argv = [sys.executable, "-c", JOB, "--marker", str(marker), *args]
    sigterm_runs_cleanup(marker, argv, env)


def test_sigterm_ends_a_job_through_its_cleanup(tmp_path):
    _killed_job_cleans_up(tmp_path)


def test_sigterm_ends_a_job_connected_to_a_cluster_through_its_cleanup(
    tmp_path, ray_cluster
):
    # A driver connected to a running cluster gets Ray's fatal-signal handler,
    # which aborted the job on SIGTERM before its cleanup ran.
    env = os.environ | {"RAY_ADDRESS": ray_cluster.address}
    _killed_job_cleans_up(tmp_path, "--connect", env=env)
