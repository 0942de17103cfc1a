"""Validate cluster configs before they are used.

Two kinds of files live in ``clusters/``:

- Ray cluster-launcher configs (``ray up FILE``). They are checked the way
  ``ray up`` checks them: against the ``ray-schema.json`` shipped with the
  installed Ray, once as written and once after Ray fills in its provider
  defaults (``prepare_config``), with ``jsonschema`` as Ray's own
  ``validate_config`` does.
- KubeRay ``RayCluster`` manifests (``kubectl apply -f FILE``). No CRD is
  installed offline, so they are checked against ``schemas/raycluster.v1.schema.json``,
  written from KubeRay's ray.io/v1 types and closed where the CRD is closed, so
  a misspelt field fails here instead of being pruned by the API server.

`security_findings` then checks what raysys promises about every cluster it
starts: token authentication on every node, the token distributed without
writing it into the file, and the dashboard on loopback.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from raysys.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

RAYCLUSTER_SCHEMA = Path(__file__).parent / "schemas" / "raycluster.v1.schema.json"
TOKEN_FILE = "~/.ray/auth_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def load_cluster_file(path: str | Path) -> dict[str, Any]:
    """Read one cluster config or manifest (a single YAML mapping).

    Raises:
        ConfigError: missing file, bad YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"cluster config {path} is not UTF-8 text (byte {e.start}); give a "
            "YAML file"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"cluster config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"cluster config {path} must hold one mapping")
    return data


def is_raycluster(config: Mapping[str, Any]) -> bool:
    return config.get("kind") == "RayCluster"


def _where(error: Any) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "<top level>"


def _schema_error(what: str, error: Any) -> ConfigError:
    return ConfigError(f"{what}: at {_where(error)}: {error.message}")


@functools.cache
def ray_launcher_schema() -> dict[str, Any]:
    """The launcher schema of the installed Ray (``ray/autoscaler/ray-schema.json``)."""
    import ray.autoscaler

    return json.loads(
        (Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()
    )


@functools.cache
def raycluster_schema() -> dict[str, Any]:
    return json.loads(RAYCLUSTER_SCHEMA.read_text())


def validate_launcher_config(
    config: Mapping[str, Any], what: str = "launcher config"
) -> dict[str, Any]:
    """Check a cluster-launcher config as ``ray up`` would, offline.

    Returns:
        The config with Ray's defaults filled in, as the launcher would use it.

    Raises:
        ConfigError: naming the path inside the file and Ray's complaint.
    """
    import jsonschema
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler._private.util import validate_config as ray_validate

    schema = ray_launcher_schema()
    try:
        jsonschema.validate(dict(config), schema)
    except jsonschema.ValidationError as e:
        raise _schema_error(what, e) from e
    try:
        prepared = prepare_config(copy.deepcopy(dict(config)))
    except Exception as e:  # Ray aborts with click errors and asserts here
        raise ConfigError(f"{what}: Ray cannot fill in its defaults: {e}") from e
    try:
        ray_validate(prepared)
    except jsonschema.ValidationError as e:
        raise _schema_error(f"{what} (with Ray's defaults)", e) from e
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{what}: {e}") from e
    return prepared


def validate_raycluster(manifest: Mapping[str, Any], what: str = "RayCluster") -> None:
    """Check a RayCluster manifest against the KubeRay fields raysys knows.

    Raises:
        ConfigError: naming the path inside the manifest and the problem; every
            problem is listed, not only the first.
    """
    import jsonschema

    validator = jsonschema.Draft7Validator(raycluster_schema())
    errors = sorted(validator.iter_errors(dict(manifest)), key=lambda e: e.path)
    if errors:
        lines = [f"{what} is not a valid ray.io/v1 RayCluster:"]
        lines += [f"  at {_where(e)}: {e.message}" for e in errors]
        raise ConfigError("\n".join(lines))


# ---- what raysys promises about every cluster ---------------------------------


def _commands(config: Mapping[str, Any], key: str) -> list[str]:
    return [str(c) for c in config.get(key) or []]


def _launcher_findings(config: Mapping[str, Any]) -> list[str]:
    findings = []
    mounts = config.get("file_mounts") or {}
    if TOKEN_FILE not in mounts:
        findings.append(
            f"file_mounts does not copy the Ray token to {TOKEN_FILE} on every node"
        )
    for key, role in (
        ("head_start_ray_commands", "head"),
        ("worker_start_ray_commands", "provider"),
    ):
        commands = _commands(config, key)
        if not any(f"raysys node {role}" in c for c in commands):
            findings.append(
                f"{key} does not start the node with `raysys node {role}` "
                "(token auth, loopback dashboard, provider resources)"
            )
        for command in commands:
            if "--no-auth" in command or "RAY_AUTH_MODE=disabled" in command:
                findings.append(f"{key} turns token authentication off: {command!r}")
            for word in command.split():
                if word.startswith("--dashboard-host="):
                    host = word.split("=", 1)[1]
                    if host not in LOOPBACK_HOSTS:
                        findings.append(
                            f"{key} binds the dashboard to {host}, not loopback"
                        )
    return findings


def _containers(manifest: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    spec = manifest.get("spec") or {}
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs") or []]
    found = []
    for name, group in groups:
        pod = (group.get("template") or {}).get("spec") or {}
        for container in pod.get("containers") or []:
            found.append((f"{name}/{container.get('name', '?')}", container))
    return found


def _env(items: Any) -> dict[str, Mapping[str, Any]]:
    return {e.get("name"): e for e in items or [] if isinstance(e, Mapping)}


def _token_findings(where: str, env: Mapping[str, Mapping[str, Any]]) -> list[str]:
    findings = []
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        findings.append(f"{where}: RAY_AUTH_MODE is not set to token")
    token = env.get("RAY_AUTH_TOKEN") or {}
    if "value" in token:
        findings.append(
            f"{where}: RAY_AUTH_TOKEN is written into the manifest; read it from a "
            "Secret (valueFrom.secretKeyRef)"
        )
    elif not ((token.get("valueFrom") or {}).get("secretKeyRef")):
        findings.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret")
    return findings


def _raycluster_findings(manifest: Mapping[str, Any]) -> list[str]:
    spec = manifest.get("spec") or {}
    findings = []
    if (spec.get("authOptions") or {}).get("mode") == "token":
        return findings  # KubeRay >= 1.5 injects the token from its own Secret
    for where, container in _containers(manifest):
        findings += _token_findings(where, _env(container.get("env")))
        command = " ".join(container.get("args") or [])
        role = "head" if where.startswith("head/") else "provider"
        if f"raysys node {role}" not in command:
            findings.append(f"{where}: does not start Ray with `raysys node {role}`")
    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions") or {}
        findings += _token_findings("autoscaler", _env(options.get("env")))
    head = spec.get("headGroupSpec") or {}
    host = (head.get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0")
    if host not in LOOPBACK_HOSTS:
        findings.append(
            f"head rayStartParams dashboard-host is {host}, not loopback (KubeRay "
            "binds 0.0.0.0 unless told otherwise)"
        )
    return findings


def security_findings(config: Mapping[str, Any]) -> list[str]:
    """What a config leaves open that raysys promises to close (empty: none)."""
    if is_raycluster(config):
        return _raycluster_findings(config)
    return _launcher_findings(config)


def check_cluster_file(path: str | Path) -> list[str]:
    """Validate one file in ``clusters/`` and return its security findings.

    Raises:
        ConfigError: the file is not a valid launcher config or RayCluster.
    """
    config = load_cluster_file(path)
    if is_raycluster(config):
        validate_raycluster(config, what=str(path))
    else:
        validate_launcher_config(config, what=str(path))
    return security_findings(config)
