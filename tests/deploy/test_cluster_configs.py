"""The configs in clusters/ validate, keep raysys's promises, and typos fail."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from raysys.runtime import cluster_configs, nodes
from raysys.runtime.errors import ConfigError, UnsatisfiableResources
from raysys.runtime.ray_env import RUNTIME_ENV_FILE
from raysys.runtime.resources import (
    ResourceRequest,
    autoscaler_node_kinds,
    check_satisfiable,
)

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
LAUNCHER_FILES = ["campus.yaml", "aws.yaml", "gcp.yaml"]
CLOUD_FILES = ["aws.yaml", "gcp.yaml"]
TOKEN_ENV = {"RAY_AUTH_TOKEN": "test-token", "HOME": "/nonexistent", "PATH": "/bin"}


def load(name: str) -> dict:
    return cluster_configs.load_cluster_file(CLUSTERS / name)


def test_every_cluster_file_is_covered():
    shipped = sorted(p.name for p in CLUSTERS.glob("*.yaml"))
    assert shipped == sorted([*LAUNCHER_FILES, "kuberay.yaml"])


# ---- Ray's own launcher schema -------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_schema_as_written(name):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(load(name), schema)  # what ray up's validate_config runs


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_after_ray_fills_defaults(name):
    prepared = cluster_configs.validate_launcher_config(load(name))
    assert prepared["cluster_name"] == load(name)["cluster_name"]
    # the start commands are ours, not the provider defaults (which bind 0.0.0.0)
    assert prepared["head_start_ray_commands"] == load(name)["head_start_ray_commands"]


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cloud_gpu_types_scale_from_zero(name):
    config = load(name)
    types = config["available_node_types"]
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0
        assert node_type["max_workers"] >= 1
        # the autoscaler must know the provider resource to scale on it from zero
        assert node_type["resources"]["provider"] == node_type["resources"]["GPU"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0


def test_campus_config_names_one_machine_per_worker_ip():
    config = load("campus.yaml")
    ips = config["provider"]["worker_ips"]
    assert len(ips) == len(set(ips)) >= 1
    prepared = cluster_configs.validate_launcher_config(config)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(ips)


@pytest.mark.parametrize(
    "path, value, complaint",
    [
        (("worker_start_ray_command",), ["ray start"], "worker_start_ray_command"),
        (("available_node_types", "gpu-1x-a10g", "min_worker"), 0, "min_worker"),
        (("available_node_types", "gpu-1x-a10g", "resources", "GPU"), "1", "'1'"),
        (("auth", "ssh_usr"), "ubuntu", "ssh_usr"),
    ],
)
def test_launcher_typo_fails_naming_the_field(path, value, complaint):
    config = copy.deepcopy(load("aws.yaml"))
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        cluster_configs.validate_launcher_config(config, what="aws.yaml")
    assert complaint in str(info.value)


# ---- KubeRay's RayCluster fields ----------------------------------------------


def test_raycluster_manifest_is_valid():
    manifest = load("kuberay.yaml")
    cluster_configs.validate_raycluster(manifest)
    groups = manifest["spec"]["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 for g in groups)
    assert any(
        c["resources"]["limits"].get("nvidia.com/gpu", 0) >= 1
        for g in groups
        for c in g["template"]["spec"]["containers"]
    )


@pytest.mark.parametrize(
    "mutate, complaint",
    [
        (lambda m: m["spec"]["workerGroupSpecs"][0].update(maxReplica=8), "maxReplica"),
        (
            lambda m: m["spec"].update(enableInTreeAutoscale=True),
            "enableInTreeAutoscale",
        ),
        (
            lambda m: m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][
                0
            ].update(imagePullPolicy="Sometimes"),
            "Sometimes",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"][
                "containers"
            ][0]["env"][-1]["valueFrom"]["secretKeyRef"].update(nam="x"),
            "nam",
        ),
        (lambda m: m.update(apiVersion="ray.io/v1alpha1"), "ray.io/v1"),
        (lambda m: m["spec"]["headGroupSpec"].pop("template"), "template"),
    ],
)
def test_raycluster_typo_fails_naming_the_field(mutate, complaint):
    manifest = copy.deepcopy(load("kuberay.yaml"))
    mutate(manifest)
    with pytest.raises(ConfigError) as info:
        cluster_configs.validate_raycluster(manifest)
    assert complaint in str(info.value)


def test_cli_reports_an_invalid_file_and_exits_nonzero(tmp_path):
    manifest = load("kuberay.yaml")
    manifest["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    from raysys.cli import main

    assert main(["validate-cluster", str(CLUSTERS / "kuberay.yaml")]) == 0
    assert main(["validate-cluster", str(bad)]) == 2


# ---- what raysys promises: token everywhere, loopback dashboard -----------------


@pytest.mark.parametrize("name", [*LAUNCHER_FILES, "kuberay.yaml"])
def test_shipped_configs_have_no_security_findings(name):
    assert cluster_configs.security_findings(load(name)) == []


def test_findings_catch_a_launcher_without_token_or_on_all_interfaces():
    config = copy.deepcopy(load("campus.yaml"))
    del config["file_mounts"]["~/.ray/auth_token"]
    config["head_start_ray_commands"][-1] += " --dashboard-host=0.0.0.0"
    config["worker_start_ray_commands"][-1] = "ray start --address=$RAY_HEAD_IP:6379"
    findings = " | ".join(cluster_configs.security_findings(config))
    assert "auth_token" in findings
    assert "0.0.0.0" in findings
    assert "raysys node provider" in findings


def test_findings_catch_a_token_written_into_the_manifest():
    manifest = copy.deepcopy(load("kuberay.yaml"))
    head = manifest["spec"]["headGroupSpec"]
    head["template"]["spec"]["containers"][0]["env"][-1] = {
        "name": "RAY_AUTH_TOKEN",
        "value": "hunter2",
    }
    head["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    findings = " | ".join(cluster_configs.security_findings(manifest))
    assert "head/ray-head: RAY_AUTH_TOKEN is written into the manifest" in findings
    assert "dashboard-host is 0.0.0.0" in findings


# ---- one source of truth ---------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_rsync_excludes_are_the_job_excludes(name):
    job_excludes = yaml.safe_load(RUNTIME_ENV_FILE.read_text())["excludes"]
    # rsync has no "!" re-includes: those are the job's alone.
    excludes = [p for p in job_excludes if not p.startswith("!")]
    assert excludes != job_excludes  # the bundled weights are re-included for jobs
    assert load(name)["rsync_exclude"] == excludes


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_nodes_get_the_ray_version_of_this_checkout(name):
    setup = " ".join(load(name)["setup_commands"])
    assert f"RAYSYS_RAY_VERSION={ray.__version__} " in setup


def test_kuberay_images_match_the_ray_version():
    manifest = load("kuberay.yaml")
    assert manifest["spec"]["rayVersion"] == ray.__version__
    images = [
        c["image"]
        for _, c in cluster_configs._containers(manifest)  # noqa: SLF001
    ]
    assert images and all(
        re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py\d+(-gpu)?", i)
        for i in images
    )


def test_install_script_is_valid_bash():
    result = subprocess.run(
        ["bash", "-n", str(CLUSTERS / "install.sh")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---- the start commands do what they say ------------------------------------------


def _raysys_node_args(command: str) -> list[str]:
    """The arguments after `raysys node` in a launcher start command."""
    words = shlex.split(command.replace("$RAY_HEAD_IP", "10.0.0.10"))
    at = next(i for i, w in enumerate(words) if w.endswith("raysys"))
    assert words[at + 1] == "node"
    return words[at + 2 :]


def _plan(args: list[str], **kwargs) -> nodes.NodePlan:
    cut = args.index("--")
    role, flags, extra = args[0], args[1:cut], args[cut + 1 :]
    assert flags == []
    if role == "head":
        return nodes.plan_head(extra, environ=TOKEN_ENV)
    return nodes.plan_provider(extra, environ=TOKEN_ENV, **kwargs)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_head_starts_on_loopback_with_token(name):
    plan = _plan(_raysys_node_args(load(name)["head_start_ray_commands"][-1]))
    assert plan.env["RAY_AUTH_MODE"] == "token"
    assert "--head" in plan.argv
    assert "--dashboard-host=127.0.0.1" in plan.argv
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in plan.argv


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_workers_join_as_named_providers(name):
    args = _raysys_node_args(load(name)["worker_start_ray_commands"][-1])
    plan = _plan(args, name="lab-7", num_gpus=2)
    assert "--address=10.0.0.10:6379" in plan.argv
    resources = json.loads(
        next(a for a in plan.argv if a.startswith("--resources=")).split("=", 1)[1]
    )
    assert resources == {"provider": 2.0, "provider:lab-7": 1.0}
    assert "--labels=raysys.io/provider=lab-7" in plan.argv
    assert plan.env["RAY_AUTH_MODE"] == "token"


def _kuberay_args(container: dict) -> tuple[list[str], str]:
    script = " ".join(container["args"])
    exec_part = script.split("exec ", 1)[1]
    return shlex.split(exec_part), script


def test_kuberay_containers_start_through_raysys_node():
    manifest = load("kuberay.yaml")
    generated = {
        "head": "ray start --head --dashboard-host=127.0.0.1 --num-gpus=0 --block",
        "provider": "ray start --address=raysys-head-svc:6379 --num-gpus=1 --block",
    }
    for where, container in cluster_configs._containers(manifest):  # noqa: SLF001
        words, script = _kuberay_args(container)
        assert words[:2] == ["raysys", "node"]
        role = words[2]
        assert ("head" if where.startswith("head/") else "provider") == role
        assert 'clusters/install.sh" --system' in script
        assert '"$KUBERAY_GEN_RAY_START_CMD"' in script
        kwargs = {"ray_start_cmd": generated[role], "environ": TOKEN_ENV}
        if role == "head":
            plan = nodes.plan_head(**kwargs)
            assert "--dashboard-host=127.0.0.1" in plan.argv
        else:
            plan = nodes.plan_provider(name="raysys-gpu-1-abcde", **kwargs)
            assert "--labels=raysys.io/provider=raysys-gpu-1-abcde" in plan.argv
            assert any('"provider":1.0' in a for a in plan.argv)
        assert "--block" in plan.argv


# ---- the autoscaler's node types feed the resource check ------------------------


@pytest.mark.parametrize("name", [*CLOUD_FILES, "kuberay.yaml"])
def test_eight_gpus_in_one_bundle_never_fit_these_clusters(name):
    kinds = autoscaler_node_kinds(load(name))
    most = max(k.resources.get("GPU", 0) for k in kinds)
    assert 1 <= most < 8
    check_satisfiable(ResourceRequest(({"GPU": most},)), kinds)
    with pytest.raises(UnsatisfiableResources) as info:
        check_satisfiable(ResourceRequest(({"GPU": 8},), what="the job"), kinds)
    assert f"the most any node offers is {most:g}" in str(info.value)
