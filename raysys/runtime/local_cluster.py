"""A local Ray cluster on one machine: a head plus N provider nodes.

``raysys up`` starts a head node (no GPUs) and N worker nodes that each declare
logical GPUs, so a laptop plays a campus of lab machines ("providers"). The
dashboard and job API bind to 127.0.0.1 and Ray's token authentication is on
unless the user turns it off. ``raysys down`` stops exactly the processes this
cluster started: each node's processes carry a marker in their environment
(``RAYSYS_CLUSTER`` and ``RAYSYS_NODE``), inherited by every worker Ray spawns
there, so another Ray on the same machine is left alone. The same marker lets a
single provider node vanish without warning, as a machine switched off would.

The cluster's address and nodes are kept in a small JSON state file
(``$RAYSYS_STATE_DIR`` or ``~/.raysys``), which is how ``raysys status`` and
`raysys.runtime.init_ray` find it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator

from raysys.runtime.config import Config, check_writable_place
from raysys.runtime.errors import ClusterError, ConfigError
from raysys.runtime.security import warn_if_exposed, warn_if_token_exposed

logger = logging.getLogger(__name__)

PROVIDER_RESOURCE = "provider"
PROVIDER_LABEL = "raysys.io/provider"
HEAD_RESOURCE = "raysys_head"
CLUSTER_MARKER = "RAYSYS_CLUSTER"
NODE_MARKER = "RAYSYS_NODE"


class LocalClusterConfig(Config):
    """Options of ``raysys up``."""

    providers: int = Field(
        3, ge=0, le=64, description="provider nodes to start, 0 to 64"
    )
    gpus_per_provider: float = Field(
        1.0, ge=0, description="logical GPUs each provider declares, >= 0"
    )
    cpus_per_provider: int = Field(
        2, ge=1, description="logical CPUs per provider, >= 1"
    )
    head_cpus: int = Field(2, ge=1, description="logical CPUs of the head node, >= 1")
    port: int = Field(6379, ge=1024, le=65535, description="GCS port of the head")
    dashboard_host: str = Field(
        "127.0.0.1", description="address the dashboard and job API bind to"
    )
    dashboard_port: int = Field(
        8265, ge=1024, le=65535, description="dashboard/job API port"
    )
    object_store_mb: int = Field(
        512, ge=80, description="object store per node in MiB, >= 80"
    )
    auth: bool = Field(True, description="Ray token authentication (on by default)")

    @field_validator("dashboard_host")
    @classmethod
    def _host_is_ip(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError as e:
            raise ValueError(
                "must be an IP address such as 127.0.0.1 or 0.0.0.0"
            ) from e
        return value

    @model_validator(mode="after")
    def _ports_differ(self) -> LocalClusterConfig:
        if self.port == self.dashboard_port:
            raise ValueError(
                f"--port and --dashboard-port are both {self.port}; the GCS and the "
                "dashboard need a port each"
            )
        return self


class NodeRecord(BaseModel):
    """One node this cluster started."""

    name: str
    kind: str  # "head" or "provider"
    num_gpus: float = 0.0
    num_cpus: int = 0
    marker: str


class ClusterState(BaseModel):
    """What ``raysys up`` records about the cluster it started."""

    cluster_id: str
    gcs_address: str
    dashboard_url: str
    auth: bool
    started_at: float
    nodes: list[NodeRecord] = Field(default_factory=list)
    temp_dir: str | None = None  # this cluster's Ray temp dir (logs, sockets)

    def provider(self, name: str) -> NodeRecord | None:
        return next(
            (n for n in self.nodes if n.kind == "provider" and n.name == name), None
        )


def state_dir() -> Path:
    return Path(os.environ.get("RAYSYS_STATE_DIR", Path.home() / ".raysys"))


def state_path() -> Path:
    return state_dir() / "local-cluster.json"


def provider_records_dir() -> Path:
    """Where `raysys provider join` records each provider node it started on
    this machine (``<name>.json``: ``{"address": ..., "marker": ...}``), for
    `raysys provider leave` and `down` to find."""
    return state_dir() / "providers"


def provider_record_path(name: str) -> Path:
    return provider_records_dir() / f"{name}.json"


def _remove_provider_records(state: ClusterState) -> list[Path]:
    """Remove the provider records of the nodes of ``state``'s cluster."""
    folder = provider_records_dir()
    markers = {n.marker for n in state.nodes}
    removed = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            marker = json.loads(path.read_text()).get("marker")
        except (OSError, ValueError, AttributeError):
            continue  # not a record this code wrote: left alone
        if not isinstance(marker, str):
            continue
        if marker in markers or marker.startswith(f"{state.cluster_id}/"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def read_state() -> ClusterState | None:
    path = state_path()
    if not path.is_file():
        return None
    try:
        return ClusterState.model_validate_json(path.read_text())
    except ValueError:
        logger.warning("ignoring unreadable cluster state file %s", path)
        return None


def write_state(state: ClusterState) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    os.replace(tmp, path)


def check_state_dir() -> Path:
    """The state folder, checked before a cluster starts (its record goes there).

    Raises:
        ConfigError: it is a file, or cannot be created or written.
    """
    path = state_dir()
    where = "RAYSYS_STATE_DIR" if "RAYSYS_STATE_DIR" in os.environ else "~/.raysys"
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"the cluster state folder {str(path)!r} ({where}) is a file; point "
            "RAYSYS_STATE_DIR at a folder"
        )
    try:
        check_writable_place(path, "the cluster state folder")
    except ValueError as e:
        raise ConfigError(f"{e} ({where}); point RAYSYS_STATE_DIR elsewhere") from e
    return path


def port_in_use(port: int) -> bool:
    """Whether something on this machine listens on ``port`` (any interface)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _check_ports(cfg: LocalClusterConfig) -> None:
    for port, flag, what in (
        (cfg.port, "--port", "GCS"),
        (cfg.dashboard_port, "--dashboard-port", "dashboard/job API"),
    ):
        if port_in_use(port):
            raise ClusterError(
                f"port {port} (the {what} port) is already in use on this machine, "
                f"maybe by another Ray; pick a free one with {flag} PORT"
            )


def _port_open(address: str, timeout_s: float = 1.0) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def running_cluster() -> ClusterState | None:
    """The recorded local cluster if its head still answers, else None."""
    state = read_state()
    if state is None or not _port_open(state.gcs_address):
        return None
    return state


def ray_executable() -> str:
    local = Path(sys.executable).parent / "ray"
    if local.exists():
        return str(local)
    found = shutil.which("ray")
    if found is None:
        raise ClusterError(
            "the `ray` command is not installed; run `pip install 'ray[default]'`"
        )
    return found


def _node_env(cluster_id: str, node_name: str, auth: bool) -> dict[str, str]:
    env = dict(os.environ)
    env[CLUSTER_MARKER] = cluster_id
    env[NODE_MARKER] = f"{cluster_id}/{node_name}"
    env["RAY_AUTH_MODE"] = "token" if auth else "disabled"
    env.pop("RAY_ADDRESS", None)
    # Job entrypoints say `python ...`: make that the interpreter raysys runs in.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ray_start(args: list[str], env: dict[str, str], what: str) -> None:
    # Ray's dashboard agent listens on a fixed default port (52365); a second Ray
    # on the same machine holding it leaves this node without an agent, and job
    # submission then fails with "No available agent". Pick a free one per node.
    if not any(a.startswith("--dashboard-agent-listen-port") for a in args):
        args = [*args, f"--dashboard-agent-listen-port={_free_port()}"]
    cmd = [ray_executable(), "start", "--disable-usage-stats", *args]
    logger.info("starting %s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ClusterError(
            f"`ray start` for {what} failed (exit {proc.returncode}):\n{tail}"
        )


def ensure_auth_token() -> None:
    """Create Ray's default token file (~/.ray/auth_token) if it does not exist,
    readable by its owner only.

    Raises:
        ClusterError: Ray could not generate the token.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file():
        return
    proc = subprocess.run(
        [ray_executable(), "get-auth-token", "--generate"],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise ClusterError(f"`ray get-auth-token --generate` failed:\n{tail}")
    # Ray writes it with the umask's mode (world-readable under the usual 022):
    # any other user of a shared machine could read it and run code.
    path.chmod(0o600)


def node_temp_dir(cluster_temp_dir: str, name: str) -> str:
    """A provider node's own Ray temp dir, inside the cluster's.

    Every node's runtime-env agent unpacks a job's working dir for its workers
    (at job start: Ray installs job runtime envs eagerly) and replaces any copy
    it did not unpack itself. Nodes sharing one temp dir share that folder, so
    a provider would delete the directory the job's driver runs in on the head.
    The name is short: Ray's socket paths under it must fit 107 bytes.
    """
    digest = hashlib.sha1(name.encode()).hexdigest()[:6]
    return os.path.join(cluster_temp_dir, f"n-{digest}")


def start_provider_node(
    gcs_address: str,
    name: str,
    *,
    num_gpus: float,
    num_cpus: int,
    cluster_id: str,
    auth: bool,
    object_store_mb: int = 512,
    node_ip: str | None = "127.0.0.1",
    temp_dir: str | None = None,
) -> NodeRecord:
    """Start one provider node: a Ray worker node lending ``num_gpus`` GPUs.

    It carries the ``provider`` resource (its GPU count, at least 1), a
    ``provider:<name>`` resource so work can be pinned to it, and the label
    ``raysys.io/provider=<name>``.
    """
    resources = {
        PROVIDER_RESOURCE: max(num_gpus, 1.0),
        f"{PROVIDER_RESOURCE}:{name}": 1.0,
    }
    args = [
        f"--address={gcs_address}",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus:g}",
        f"--resources={json.dumps(resources)}",
        f"--labels={PROVIDER_LABEL}={name}",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
    ]
    if node_ip:
        args.append(f"--node-ip-address={node_ip}")
    if temp_dir:
        args.append(f"--temp-dir={node_temp_dir(temp_dir, name)}")
    _run_ray_start(args, _node_env(cluster_id, name, auth), f"provider {name!r}")
    return NodeRecord(
        name=name,
        kind="provider",
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        marker=f"{cluster_id}/{name}",
    )


def up(cfg: LocalClusterConfig) -> ClusterState:
    """Start a head and ``cfg.providers`` provider nodes; record the cluster.

    Raises:
        ConfigError: the state folder is unusable.
        ClusterError: a cluster is already running, a port is taken, or a node
            failed to start.
    """
    check_state_dir()
    recorded = read_state()
    if recorded is not None and _port_open(recorded.gcs_address):
        raise ClusterError(
            f"a local cluster is already running at {recorded.gcs_address}; "
            "run `raysys down` first"
        )
    if recorded is not None:
        # Its head is gone; what is left of it (providers, agents) would be
        # forgotten once this cluster's record replaces it.
        logger.warning(
            "the recorded cluster %s at %s no longer answers; stopping what is "
            "left of it",
            recorded.cluster_id,
            recorded.gcs_address,
        )
        down()
    _check_ports(cfg)
    loopback = warn_if_exposed(cfg.dashboard_host, cfg.auth)
    if cfg.auth:
        ensure_auth_token()
        warn_if_token_exposed()
    cluster_id = uuid.uuid4().hex[:12]
    # Ray records "the" cluster of a machine in <temp dir>/ray_current_cluster,
    # and a job's driver connects to whatever that file names: with the shared
    # default temp dir, a job could join another Ray on this machine. Each
    # cluster gets its own (short: Ray's socket paths must fit 107 bytes).
    temp_dir = os.path.join(tempfile.gettempdir(), f"raysys-{cluster_id}")
    node_ip = "127.0.0.1" if loopback else None
    gcs_address = f"{node_ip or _primary_ip()}:{cfg.port}"
    head_args = [
        "--head",
        f"--port={cfg.port}",
        f"--num-cpus={cfg.head_cpus}",
        "--num-gpus=0",
        f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
        "--include-dashboard=true",
        f"--dashboard-host={cfg.dashboard_host}",
        f"--dashboard-port={cfg.dashboard_port}",
        f"--object-store-memory={cfg.object_store_mb * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
    ]
    if node_ip:
        head_args.append(f"--node-ip-address={node_ip}")
    state = ClusterState(
        cluster_id=cluster_id,
        gcs_address=gcs_address,
        dashboard_url=f"http://{_url_host(cfg.dashboard_host)}:{cfg.dashboard_port}",
        auth=cfg.auth,
        started_at=time.time(),
        temp_dir=temp_dir,
        nodes=[
            NodeRecord(
                name="head",
                kind="head",
                num_cpus=cfg.head_cpus,
                marker=f"{cluster_id}/head",
            )
        ],
    )
    try:
        _run_ray_start(
            head_args, _node_env(cluster_id, "head", cfg.auth), "the head node"
        )
        write_state(state)
        for i in range(cfg.providers):
            record = start_provider_node(
                gcs_address,
                f"provider-{i}",
                num_gpus=cfg.gpus_per_provider,
                num_cpus=cfg.cpus_per_provider,
                cluster_id=cluster_id,
                auth=cfg.auth,
                object_store_mb=cfg.object_store_mb,
                node_ip=node_ip,
                temp_dir=temp_dir,
            )
            state.nodes.append(record)
            write_state(state)
    except BaseException:  # errors, Ctrl-C and SIGTERM alike
        logger.error("cluster start failed or was interrupted; stopping what started")
        kill_marked(CLUSTER_MARKER, cluster_id)
        with contextlib.suppress(OSError):
            state_path().unlink(missing_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return state


def _primary_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def marked_pids(key: str, value: str) -> list[int]:
    """Pids whose environment holds ``key=value`` (Linux /proc)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_marked(key: str, value: str, grace_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``grace_s`` (0: SIGKILL alone), every process
    marked ``key=value``.

    Processes a dying one starts meanwhile (Ray's agents and workers) are
    found by a new look and stopped too; returns how many still run.
    """
    if not Path("/proc").is_dir():
        raise ClusterError("stopping a single raysys cluster needs /proc (Linux)")
    left = 0
    for _ in range(3):
        left = _kill_pids(marked_pids(key, value), grace_s)
        if not marked_pids(key, value):
            return 0
    return left


def _kill_pids(pids: list[int], grace_s: float) -> int:
    # Without grace, no SIGTERM either: a process that got one would still
    # run its handlers (Ray's workers abort with stack traces), which a
    # machine switched off never does.
    signals = (signal.SIGKILL,) if grace_s <= 0 else (signal.SIGTERM, signal.SIGKILL)
    for sig in signals:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            pids = [
                p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)
            ]
            if not pids:
                break
            time.sleep(0.1)
        if not pids:
            break
    return len(pids)


def _is_zombie(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def kill_node(state: ClusterState, name: str) -> None:
    """Stop one node's processes at once, as a machine switched off would vanish."""
    kill_marked(NODE_MARKER, f"{state.cluster_id}/{name}", grace_s=0.0)
    state.nodes = [n for n in state.nodes if n.name != name]
    write_state(state)


def down() -> bool:
    """Stop the recorded local cluster; returns False when none was recorded."""
    state = read_state()
    if state is None:
        return False
    for node in reversed(state.nodes):
        kill_marked(NODE_MARKER, node.marker, grace_s=3.0)
    kill_marked(CLUSTER_MARKER, state.cluster_id)
    # Providers joined to this cluster and never left went down with it.
    _remove_provider_records(state)
    state_path().unlink(missing_ok=True)
    if state.temp_dir:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    return True
