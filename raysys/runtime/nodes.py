"""Start this machine as a node of a multi-machine raysys cluster.

The configs in ``clusters/`` (Ray's cluster launcher for campus machines, AWS and
GCP, and the KubeRay manifest) start every node through ``raysys node``, so all
of them join the same way as the nodes ``raysys up`` starts on one machine::

    raysys node head [--dry-run] [-- RAY_START_ARGS...]
    raysys node provider [--name NAME] [--num-gpus N] [--dry-run] -- --address=HEAD:6379
    raysys node provider --name "$POD_NAME" --ray-start-cmd "$KUBERAY_GEN_RAY_START_CMD"

``head`` runs ``ray start --head`` with the dashboard and job API on 127.0.0.1
(unless ``--dashboard-host`` is among the arguments), the ``raysys_head``
resource and no GPUs lent. ``provider`` runs ``ray start`` so the node lends its
GPUs to the sharing platform: the ``provider`` resource (its GPU count, at least
1), a ``provider:<name>`` resource that pins work to it, and the label
``raysys.io/provider=<name>``. Resources and labels already among the arguments
are kept and merged.

Both set ``RAY_AUTH_MODE=token`` and refuse to start when this machine holds no
token: a worker without one could never join, and a head would invent a token
no other machine has. ``--no-auth`` turns authentication off, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raysys.runtime.errors import ConfigError
from raysys.runtime.local_cluster import (
    HEAD_RESOURCE,
    PROVIDER_LABEL,
    PROVIDER_RESOURCE,
    ray_executable,
)
from raysys.runtime.security import token_source, warn_if_exposed

logger = logging.getLogger(__name__)

PROVIDER_NAME_ENV = "RAYSYS_PROVIDER_NAME"
LOOPBACK = "127.0.0.1"
# Ray label values follow Kubernetes label syntax.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-_.A-Za-z0-9]{0,61}[A-Za-z0-9])?$")


@dataclass
class NodePlan:
    """The ``ray start`` command a node runs, and its environment."""

    role: str
    name: str
    argv: list[str]
    env: dict[str, str] = field(repr=False, default_factory=dict)

    def shell(self) -> str:
        auth = self.env.get("RAY_AUTH_MODE", "unset")
        return f"RAY_AUTH_MODE={auth} " + shlex.join(self.argv)


def _split_option(args: list[str], option: str) -> tuple[list[str], list[str]]:
    """Remove every ``--option=value`` / ``--option value`` from ``args``.

    Returns:
        The remaining arguments and the values found, in order.
    """
    rest, values = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == option:
            if i + 1 >= len(args):
                raise ConfigError(f"`ray start` argument {option} has no value")
            values.append(args[i + 1])
            i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, values


def _merge_resources(values: Sequence[str], ours: Mapping[str, float]) -> str:
    merged: dict[str, float] = {}
    for raw in values:
        text = raw.strip().strip("'")
        try:
            given = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"--resources {raw!r} is not JSON; write it as "
                "--resources='{\"name\": amount}'"
            ) from e
        merged.update(given)
    for key, amount in ours.items():
        merged.setdefault(key, amount)  # values given explicitly win
    return json.dumps(merged, sort_keys=True, separators=(",", ":"))


def _merge_labels(values: Sequence[str], ours: Mapping[str, str]) -> str:
    merged: dict[str, str] = {}
    for raw in values:
        for pair in filter(None, raw.strip().strip("'\"").split(",")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(f"--labels {raw!r}: expected key=value[,key=value]")
            merged[key.strip()] = value.strip()
    for key, value in ours.items():
        merged.setdefault(key, value)
    return ",".join(f"{k}={v}" for k, v in sorted(merged.items()))


def _ray_start_args(ray_start_cmd: str | None, extra: Sequence[str]) -> list[str]:
    args = shlex.split(ray_start_cmd) if ray_start_cmd else []
    args += list(extra)
    if args[:2] == ["ray", "start"] or (
        args and args[0].endswith("/ray") and args[1:2] == ["start"]
    ):
        args = args[2:]
    return args


def _node_env(auth: bool, environ: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    # Job entrypoints say `python ...`: make that the interpreter raysys runs in,
    # for the drivers this node's raylet starts.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    if not auth:
        env["RAY_AUTH_MODE"] = "disabled"
        return env
    if token_source(env) is None:
        raise ConfigError(
            "token authentication is on but this machine has no Ray token: give "
            "every node the cluster's token as ~/.ray/auth_token (the launcher "
            "configs copy it with file_mounts), RAY_AUTH_TOKEN_PATH or "
            "RAY_AUTH_TOKEN (the KubeRay manifest reads a Secret); create one "
            "with `ray get-auth-token --generate`"
        )
    env["RAY_AUTH_MODE"] = "token"
    return env


def detect_num_gpus() -> int:
    """GPUs on this machine as ``nvidia-smi -L`` lists them (0 without it)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def provider_name(
    explicit: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The provider's name: ``--name``, ``$RAYSYS_PROVIDER_NAME``, or the host name.

    Raises:
        ConfigError: the name is not a valid Ray label value.
    """
    env = os.environ if environ is None else environ
    name = explicit or env.get(PROVIDER_NAME_ENV) or socket.gethostname().split(".")[0]
    if not _LABEL_VALUE.match(name):
        raise ConfigError(
            f"provider name {name!r} is not a valid label value: use at most 63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or "
            f"digit (pass --name or set {PROVIDER_NAME_ENV})"
        )
    return name


def plan_head(
    extra: Sequence[str] = (),
    *,
    ray_start_cmd: str | None = None,
    auth: bool = True,
    environ: Mapping[str, str] | None = None,
) -> NodePlan:
    """The ``ray start --head`` command of a raysys head node.

    Raises:
        ConfigError: authentication is on and no token is present, or an
            argument is malformed.
    """
    env = _node_env(auth, environ)
    args = _ray_start_args(ray_start_cmd, extra)
    args, resources = _split_option(args, "--resources")
    if "--head" not in args:
        args.insert(0, "--head")
    _, hosts = _split_option(list(args), "--dashboard-host")
    if not hosts:
        args.append(f"--dashboard-host={LOOPBACK}")
    warn_if_exposed(hosts[-1] if hosts else LOOPBACK, auth)
    if not any(a == "--num-gpus" or a.startswith("--num-gpus=") for a in args):
        args.append("--num-gpus=0")
    args.append("--resources=" + _merge_resources(resources, {HEAD_RESOURCE: 1.0}))
    return NodePlan(
        role="head", name="head", argv=[ray_executable(), "start", *args], env=env
    )


def plan_provider(
    extra: Sequence[str] = (),
    *,
    ray_start_cmd: str | None = None,
    name: str | None = None,
    num_gpus: float | None = None,
    auth: bool = True,
    environ: Mapping[str, str] | None = None,
) -> NodePlan:
    """The ``ray start`` command of a provider node (a machine lending GPUs).

    Raises:
        ConfigError: no head address, a bad name, no token while authentication
            is on, or a malformed argument.
    """
    env = _node_env(auth, environ)
    args = _ray_start_args(ray_start_cmd, extra)
    if "--head" in args:
        raise ConfigError("a provider joins a head: drop --head, pass --address")
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        raise ConfigError(
            "a provider needs the head's address: pass --address=HEAD_IP:6379 "
            "after `--` (the launcher sets $RAY_HEAD_IP)"
        )
    name = provider_name(name, env)
    args, given_gpus = _split_option(args, "--num-gpus")
    if num_gpus is not None:
        gpus = num_gpus
    elif given_gpus:
        gpus = float(given_gpus[-1])
    else:
        gpus = detect_num_gpus()
    if not math.isfinite(gpus) or gpus < 0 or gpus != int(gpus):
        raise ConfigError(
            f"--num-gpus {gpus:g} is not a whole number >= 0; give the GPUs to lend"
        )
    if num_gpus is not None or given_gpus:
        # Ray's own GPU count follows the GPUs lent (left alone, Ray counts
        # every GPU it finds, lent or not).
        args.append(f"--num-gpus={gpus:g}")
    args, resources = _split_option(args, "--resources")
    args, labels = _split_option(args, "--labels")
    ours = {
        PROVIDER_RESOURCE: max(float(gpus), 1.0),
        f"{PROVIDER_RESOURCE}:{name}": 1.0,
    }
    args.append("--resources=" + _merge_resources(resources, ours))
    args.append("--labels=" + _merge_labels(labels, {PROVIDER_LABEL: name}))
    logger.info("starting provider %s lending %g GPU(s)", name, gpus)
    return NodePlan(
        role="provider", name=name, argv=[ray_executable(), "start", *args], env=env
    )


def run(plan: NodePlan) -> None:
    """Replace this process with the planned ``ray start``.

    Exec rather than a child process: in a container ``ray start --block`` then
    is the main process and receives the pod's termination signal itself.
    """
    logger.info("%s node %s: %s", plan.role, plan.name, plan.shell())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(plan.argv[0], plan.argv, plan.env)
