"""Connect to Ray, or start it, and wait on remote results with a bound.

`init_ray` picks the cluster in this order:

1. ``RAY_ADDRESS`` when set (``ray job submit`` sets it for the job's driver);
2. the local cluster ``raysys up`` started, when its state file says it runs;
3. otherwise an embedded local Ray for this process alone, with token
   authentication on and no dashboard.

Plain ``ray.init()`` would silently join whatever cluster ``ray start`` left on
the machine; the explicit order above never does.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import yaml

from raysys.runtime.errors import ClusterError, ConfigError, RemoteTimeout

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The runtime_env every job is submitted with; its ``excludes`` are the one list
# of what never ships with a job (history, environments, caches, outputs, data).
RUNTIME_ENV_FILE = PROJECT_ROOT / "jobs" / "runtime_env.yaml"


def load_runtime_env(path: Path = RUNTIME_ENV_FILE) -> dict[str, Any]:
    """The runtime_env in ``jobs/runtime_env.yaml`` (a fresh copy per call).

    Raises:
        ConfigError: the file is missing, is not YAML, has a key Ray's
            runtime_env does not know, a value Ray refuses, or an ``excludes``
            that is not a list of strings.
    """
    return copy.deepcopy(_read_runtime_env(path))


@functools.cache
def _read_runtime_env(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: raysys submits jobs from a checkout of the "
            "project, which holds jobs/runtime_env.yaml"
        )
    try:
        env = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not a valid YAML runtime_env: {e}") from e
    excludes = env.get("excludes", []) if isinstance(env, dict) else None
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise ConfigError(
            f"{path}: expected a mapping with `excludes: [pattern, ...]`, got {env!r}"
        )
    from ray.runtime_env import RuntimeEnv

    # Ray takes any other key for a plugin's and, with no such plugin, ignores
    # it: a misspelt `env_var:` would silently set nothing.
    # TODO: third-party runtime_env plugins (RAY_RUNTIME_ENV_PLUGINS on the
    # cluster) are refused here too; there is no way to list them from a client.
    unknown = sorted(str(k) for k in env if k not in RuntimeEnv.known_fields)
    if unknown:
        raise ConfigError(
            f"{path}: unknown runtime_env field(s) {', '.join(unknown)}; Ray would "
            f"ignore them. Known fields: {', '.join(sorted(RuntimeEnv.known_fields))}"
        )
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: invalid runtime_env: {e}") from e
    return {**env, "excludes": excludes}


def __getattr__(name: str) -> Any:
    # RUNTIME_ENV_EXCLUDES is read from jobs/runtime_env.yaml on first use, so
    # importing this module never depends on the checkout being present.
    if name == "RUNTIME_ENV_EXCLUDES":
        return list(load_runtime_env()["excludes"])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def project_runtime_env(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A runtime_env that ships this project's source (not .git, venvs or data)."""
    env = load_runtime_env()
    env["working_dir"] = str(PROJECT_ROOT)
    env.update(extra or {})
    return env


def enable_token_auth() -> None:
    """Turn on Ray's token authentication for this process and its children.

    Ray reads ``RAY_AUTH_MODE`` once into its cached config, so setting the
    variable after ``import ray`` is not enough: the cache is refreshed too. The
    token itself comes from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``.
    """
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config as _RayConfig

        _RayConfig.initialize("")
    except (ImportError, AttributeError):  # older Ray: the variable alone is read
        pass


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing answers at a ``HOST:PORT`` cluster address.

    Ray itself retries an unreachable GCS for minutes. Addresses of another
    form (``auto``, ``ray://...``) are left to Ray.

    Raises:
        ClusterError: no TCP connection to the address within ``timeout_s``.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout_s).close()
    except OSError as e:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address}: {e}; check the address "
            "(HOST:PORT of the head's GCS, 6379 by default) and that the head runs"
        ) from e


def init_ray(
    *,
    namespace: str = "raysys",
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
    object_store_memory: int | None = None,
) -> str:
    """Connect to the cluster this process should use and return how.

    Returns:
        ``"initialized"`` when Ray was already up in this process, ``"address"``
        for ``RAY_ADDRESS``, ``"local-cluster"`` for the one ``raysys up``
        started, or ``"embedded"`` for a private local Ray.

    Raises:
        ClusterError: the address is set but cannot be reached.
    """
    if ray.is_initialized():
        return "initialized"
    with _keeping_sigterm_exit():
        return _init_ray(
            namespace=namespace,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=resources,
            object_store_memory=object_store_memory,
        )


@contextlib.contextmanager
def _keeping_sigterm_exit() -> Iterator[None]:
    # Connecting a driver installs Ray's own fatal-signal handler over ours: a
    # process killed with SIGTERM would then abort without its cleanup (a
    # cluster a job started would keep running), so ours goes back once Ray is up.
    from raysys.runtime.entry import exit_on_sigterm, sigterm_exits

    keep = sigterm_exits()
    try:
        yield
    finally:
        if keep:
            exit_on_sigterm()


def connect_driver(address: str) -> None:
    """``ray.init`` for a short command-line driver: quiet, no worker logs, and
    SIGTERM still a clean exit through its ``finally`` blocks.

    Raises:
        ClusterError: Ray refused the connection (a wrong token, say).
    """
    with _keeping_sigterm_exit():
        try:
            ray.init(
                address=address, logging_level=logging.WARNING, log_to_driver=False
            )
        except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as e:
            raise ClusterError(f"could not connect to Ray at {address}: {e}") from e


def _init_ray(
    *,
    namespace: str,
    num_cpus: int | None,
    num_gpus: int | None,
    resources: dict[str, float] | None,
    object_store_memory: int | None,
) -> str:
    address = os.environ.get("RAY_ADDRESS")
    mode = "address"
    if not address:
        from raysys.runtime.local_cluster import running_cluster

        state = running_cluster()
        if state is not None:
            address, mode = state.gcs_address, "local-cluster"
            if state.auth and os.environ.get("RAY_AUTH_MODE") != "disabled":
                enable_token_auth()
    try:
        if address:
            logger.info("connecting to Ray at %s (%s)", address, mode)
            check_reachable(address)
            ray.init(address=address, namespace=namespace, log_to_driver=True)
            return mode
        if os.environ.get("RAY_AUTH_MODE") != "disabled":
            enable_token_auth()
        logger.info("starting an embedded local Ray (no cluster address set)")
        ray.init(
            address="local",
            namespace=namespace,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=resources,
            object_store_memory=object_store_memory,
            include_dashboard=False,
        )
        return "embedded"
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"could not reach Ray at {address or 'local'}: {e}") from e


def bounded_get(refs: Any, timeout_s: float, what: str) -> Any:
    """``ray.get`` that gives up after ``timeout_s`` seconds.

    Raises:
        RemoteTimeout: the result did not arrive in time; ``what`` names it.
    """
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise RemoteTimeout(f"{what} did not answer within {timeout_s:g} s") from e


def cluster_gpus() -> float:
    """Total GPUs the connected cluster declares (logical ones included)."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def alive_node_ids() -> Sequence[str]:
    """Hex ids of the nodes Ray currently considers alive."""
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
