"""The cluster check's config: the request it builds and the input it refuses."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from raysys.runtime import load_config
from raysys.runtime.errors import ConfigError

JOB = Path(__file__).resolve().parents[2] / "jobs" / "cluster_check.py"
spec = importlib.util.spec_from_file_location("cluster_check", JOB)
cluster_check = importlib.util.module_from_spec(spec)
sys.modules["cluster_check"] = cluster_check  # pydantic resolves annotations there
spec.loader.exec_module(cluster_check)


def config(*argv: str):
    return load_config(cluster_check.ClusterCheckConfig, list(argv))


def test_bundle_from_flags():
    cfg = config(
        "--num-gpus", "1", "--num-cpus", "2", "--resources", "provider=1,ssd=0"
    )
    assert cfg.bundle() == {"CPU": 2.0, "GPU": 1.0, "provider": 1.0}


def test_resources_through_set():
    cfg = config("--num-cpus", "0", "--set", "resources.provider:lab-1=1")
    assert cfg.bundle() == {"provider:lab-1": 1.0}


@pytest.mark.parametrize(
    "argv, complaint",
    [
        (["--num-cpus", "0"], "must ask for something"),
        (["--num-gpus", "-1"], "num_gpus"),
        (["--resources", "provider"], "NAME=AMOUNT"),
        (["--strategy", "DENSE"], "invalid choice"),
    ],
)
def test_bad_input_is_refused_before_any_work(argv, complaint, capsys):
    if complaint == "invalid choice":
        with pytest.raises(SystemExit):
            config(*argv)
        assert complaint in capsys.readouterr().err
        return
    with pytest.raises(ConfigError, match=complaint):
        config(*argv)
