"""`raysys node` builds the `ray start` of head and provider nodes securely."""

from __future__ import annotations

import json
import logging

import pytest

from raysys.runtime import nodes
from raysys.runtime.errors import ConfigError

WITH_TOKEN = {"RAY_AUTH_TOKEN": "t0ken", "HOME": "/nonexistent", "PATH": "/usr/bin"}
NO_TOKEN = {"HOME": "/nonexistent", "PATH": "/usr/bin"}


def option(plan: nodes.NodePlan, name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in plan.argv if a.startswith(name + "=")]
    return value


def test_head_defaults_to_loopback_token_and_no_gpus():
    plan = nodes.plan_head(["--port=6379"], environ=WITH_TOKEN)
    assert plan.argv[1:3] == ["start", "--head"]
    assert option(plan, "--dashboard-host") == "127.0.0.1"
    assert option(plan, "--num-gpus") == "0"
    assert json.loads(option(plan, "--resources")) == {"raysys_head": 1.0}
    assert plan.env["RAY_AUTH_MODE"] == "token"
    # job entrypoints say `python`: the node's PATH starts with raysys's interpreter
    import sys
    from pathlib import Path

    assert plan.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_head_keeps_an_explicit_host_and_warns_loudly_without_auth(caplog):
    with caplog.at_level(logging.WARNING, logger="raysys.runtime.security"):
        plan = nodes.plan_head(
            ["--dashboard-host=0.0.0.0"], auth=False, environ=NO_TOKEN
        )
    assert option(plan, "--dashboard-host") == "0.0.0.0"
    assert plan.env["RAY_AUTH_MODE"] == "disabled"
    assert "SECURITY WARNING" in caplog.text and "0.0.0.0" in caplog.text


@pytest.mark.parametrize("role", ["head", "provider"])
def test_no_token_on_the_machine_refuses_to_start(role):
    plan = getattr(nodes, f"plan_{role}")
    with pytest.raises(ConfigError, match="no Ray token"):
        plan(
            ["--address=10.0.0.1:6379"] if role == "provider" else [], environ=NO_TOKEN
        )


def test_token_file_counts(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    env = {**NO_TOKEN, "RAY_AUTH_TOKEN_PATH": str(token)}
    assert nodes.plan_head([], environ=env).env["RAY_AUTH_MODE"] == "token"


def test_provider_lends_its_gpus_under_its_name():
    plan = nodes.plan_provider(
        ["--address=10.0.0.1:6379", '--resources={"ssd": 1}', "--labels=zone=b"],
        name="lab-3",
        num_gpus=4,
        environ=WITH_TOKEN,
    )
    assert json.loads(option(plan, "--resources")) == {
        "provider": 4.0,
        "provider:lab-3": 1.0,
        "ssd": 1,
    }
    assert option(plan, "--labels") == "raysys.io/provider=lab-3,zone=b"
    assert plan.name == "lab-3"


def test_provider_without_gpus_still_offers_one_provider_slot():
    plan = nodes.plan_provider(
        ["--address=10.0.0.1:6379"], name="cpu-box", num_gpus=0, environ=WITH_TOKEN
    )
    assert json.loads(option(plan, "--resources"))["provider"] == 1.0


def test_provider_extends_kuberays_generated_command():
    generated = (
        "ray start --address=raysys-head-svc.default.svc.cluster.local:6379 "
        "--block --num-gpus=2 --resources='{\"provider\": 2}' --metrics-export-port=8080"
    )
    plan = nodes.plan_provider(
        ray_start_cmd=generated, name="raysys-gpu-1-x7k2p", environ=WITH_TOKEN
    )
    assert "--block" in plan.argv and "--metrics-export-port=8080" in plan.argv
    assert json.loads(option(plan, "--resources")) == {
        "provider": 2,
        "provider:raysys-gpu-1-x7k2p": 1.0,
    }
    assert sum(a.startswith("--resources") for a in plan.argv) == 1


def test_provider_name_comes_from_the_environment():
    env = {**WITH_TOKEN, "RAYSYS_PROVIDER_NAME": "from-env"}
    plan = nodes.plan_provider(["--address=h:6379"], num_gpus=1, environ=env)
    assert plan.name == "from-env"


@pytest.mark.parametrize(
    "args, kwargs, complaint",
    [
        ([], {"name": "a"}, "needs the head's address"),
        (["--head", "--address=h:1"], {"name": "a"}, "drop --head"),
        (["--address=h:1"], {"name": "bad name!"}, "not a valid label value"),
        (["--address=h:1", "--resources=nope"], {"name": "a"}, "is not JSON"),
    ],
)
def test_provider_rejects_bad_input(args, kwargs, complaint):
    with pytest.raises(ConfigError, match=complaint):
        nodes.plan_provider(args, num_gpus=1, environ=WITH_TOKEN, **kwargs)


def test_cli_dry_run_prints_the_command(capsys, monkeypatch):
    from raysys.cli import main

    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0ken")
    status = main(
        ["node", "provider", "--name", "lab-9", "--num-gpus", "1", "--dry-run"]
        + ["--", "--address=10.1.1.1:6379"]
    )
    assert status == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("RAY_AUTH_MODE=token ")
    assert "--labels=raysys.io/provider=lab-9" in out
    assert out.count("--num-gpus") == 1 and " --num-gpus=1 " in out + " "


def test_provider_passes_the_gpus_it_lends_to_ray():
    plan = nodes.plan_provider(
        ["--address=h:6379", "--num-gpus=4"], num_gpus=2, environ=WITH_TOKEN
    )
    assert [a for a in plan.argv if a.startswith("--num-gpus")] == ["--num-gpus=2"]
    with pytest.raises(ConfigError, match="whole number"):
        nodes.plan_provider(["--address=h:6379"], num_gpus=0.5, environ=WITH_TOKEN)
