"""``raysys provider join|leave`` and the sharing section of ``raysys status``.

raysys provider join --address HEAD --name lab-a --gpus 2
    start a Ray worker node on this machine that lends 2 GPUs as provider
    ``lab-a``, and its agent;
raysys provider leave --name lab-a [--deadline SECONDS]
    the owner's kill switch: Ray drains the node by the deadline while the
    platform moves the tenants off; without a deadline the tenants are
    evacuated at once. The node is gone when the command returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from raysys.runtime import local_cluster
from raysys.runtime.errors import ClusterError, ConfigError, RemoteTimeout

logger = logging.getLogger(__name__)

CONTROLLER_ENV = "RAYSYS_SHARING_CONTROLLER"
LEAVE_MARGIN_S = 15.0


def _record_path(name: str) -> Path:
    return local_cluster.provider_record_path(name)


def _resolve(address: str | None) -> tuple[str, local_cluster.ClusterState | None]:
    state = local_cluster.running_cluster()
    address = (
        address
        or os.environ.get("RAY_ADDRESS")
        or (state.gcs_address if state else None)
    )
    if not address:
        raise ConfigError(
            "no cluster address: pass --address HOST:PORT (the head's GCS address), "
            "set RAY_ADDRESS, or start a local cluster with `raysys up`"
        )
    if state is not None and state.gcs_address != address:
        state = None
    return address, state


def _uses_auth(state: local_cluster.ClusterState | None) -> bool:
    """Token authentication unless the recorded cluster or the environment says off."""
    if state is not None:
        return state.auth
    return os.environ.get("RAY_AUTH_MODE") != "disabled"


def _connect(address: str, state: local_cluster.ClusterState | None) -> None:
    from raysys.runtime.ray_env import (
        check_reachable,
        connect_driver,
        enable_token_auth,
    )

    if _uses_auth(state):
        enable_token_auth()
    check_reachable(address)
    connect_driver(address)


def _provider_nodes(name: str) -> list[dict]:
    import ray

    return [
        n
        for n in ray.nodes()
        if (n.get("Labels") or {}).get(local_cluster.PROVIDER_LABEL) == name
    ]


def _alive_node(name: str) -> dict | None:
    return next((n for n in _provider_nodes(name) if n.get("Alive")), None)


def _check_name_free(
    name: str, address: str, state: local_cluster.ClusterState | None
) -> None:
    """Refuse a provider name a live node of the cluster already carries.

    Needs a connected driver. A name the local cluster's record still lists
    without a live node (a node that crashed) is free again when no process
    of that node runs on this machine.

    Raises:
        ConfigError: the name is in use.
    """
    node = _alive_node(name)
    if node is not None:
        raise ConfigError(
            f"provider name {name!r} is already in use by node "
            f"{node['NodeID'][:12]} of the cluster at {address}; pick another "
            f"--name, or take that provider back first with "
            f"`raysys provider leave --name {name}`"
        )
    record = state.provider(name) if state is not None else None
    if record is not None and local_cluster.marked_pids(
        local_cluster.NODE_MARKER, record.marker
    ):
        raise ConfigError(
            f"provider name {name!r} is already in use: its node was started on "
            f"this machine (marker {record.marker}) and still runs, though the "
            "cluster does not list it alive; pick another --name, or stop it with "
            "`raysys down`"
        )


def cmd_join(argv: Sequence[str]) -> int:
    from raysys.sharing.names import check_name

    parser = argparse.ArgumentParser(
        prog="raysys provider join",
        description="Lend this machine's GPUs to the sharing platform.",
    )
    parser.add_argument("--address", help="GCS address of the head, HOST:PORT")
    parser.add_argument("--name", required=True, help="provider name, e.g. lab-a")
    parser.add_argument("--gpus", type=float, required=True, help="GPUs to lend")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs (default 2)")
    parser.add_argument(
        "--object-store-mb",
        type=int,
        default=512,
        help="object store MiB (default 512)",
    )
    parser.add_argument(
        "--node-ip", help="this machine's address as the head sees it (default: auto)"
    )
    parser.add_argument(
        "--controller",
        default=os.environ.get(CONTROLLER_ENV, "raysys-sharing"),
        help="name of the sharing controller the agent reports to",
    )
    args = parser.parse_args(argv)
    name = check_name(args.name, "provider")
    if not (math.isfinite(args.gpus) and args.gpus >= 0):
        raise ConfigError(f"--gpus must be a number >= 0, got {args.gpus}")
    if args.cpus < 0:
        raise ConfigError(f"--cpus must be >= 0, got {args.cpus}")
    if args.object_store_mb < 1:
        raise ConfigError(f"--object-store-mb must be >= 1, got {args.object_store_mb}")
    address, state = _resolve(args.address)
    auth = _uses_auth(state)
    cluster_id = state.cluster_id if state else f"ext-{uuid.uuid4().hex[:8]}"
    node_ip = args.node_ip
    if node_ip is None and address.split(":")[0] in ("127.0.0.1", "localhost"):
        node_ip = "127.0.0.1"

    import ray

    from raysys.runtime.ray_env import bounded_get
    from raysys.sharing.agent import ensure_agent

    _connect(address, state)
    try:
        # Before anything starts: a second node under a taken name would be
        # indistinguishable from the first (same label, same marker), and
        # leaving would take both.
        _check_name_free(name, address, state)
        record = local_cluster.start_provider_node(
            address,
            name,
            num_gpus=args.gpus,
            num_cpus=args.cpus,
            cluster_id=cluster_id,
            auth=auth,
            object_store_mb=args.object_store_mb,
            node_ip=node_ip,
            # a node of its own inside the local cluster's temp dir (see
            # `local_cluster.node_temp_dir`); Ray's default elsewhere
            temp_dir=state.temp_dir if state else None,
        )
        if state is not None:
            state.nodes = [n for n in state.nodes if n.marker != record.marker]
            state.nodes.append(record)
            local_cluster.write_state(state)
        path = _record_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"address": address, "marker": record.marker}))
        deadline = time.monotonic() + 60
        node = _alive_node(name)
        while node is None and time.monotonic() < deadline:
            time.sleep(0.5)
            node = _alive_node(name)
        if node is None:
            raise ClusterError(f"provider node {name!r} did not register within 60 s")
        agent = ensure_agent(name, node["NodeID"], controller_name=args.controller)
        info = bounded_get(agent.info.remote(), 60, f"agent of {name}")
    finally:
        ray.shutdown()
    print(
        f"provider {name} joined: node {info['node_id'][:12]}, lending {args.gpus:g} GPUs"
    )
    print(f"  agent reports to controller {args.controller!r}")
    print(f"  leave with: raysys provider leave --name {name} [--deadline SECONDS]")
    return 0


def cmd_leave(argv: Sequence[str]) -> int:
    from raysys.sharing.names import check_name

    parser = argparse.ArgumentParser(
        prog="raysys provider leave",
        description="Take a provider back: drain it by a deadline, or evacuate at once.",
    )
    parser.add_argument("--name", required=True, help="provider name")
    parser.add_argument(
        "--deadline", type=float, help="seconds until the machine goes (default: now)"
    )
    parser.add_argument("--address", help="GCS address of the head, HOST:PORT")
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="without --deadline: seconds tenants get to checkpoint (default 10)",
    )
    args = parser.parse_args(argv)
    name = check_name(args.name, "provider")
    if args.deadline is not None and not (
        math.isfinite(args.deadline) and args.deadline >= 0
    ):
        raise ConfigError(
            f"--deadline must be a number of seconds >= 0, got {args.deadline}"
        )
    if not (math.isfinite(args.grace) and args.grace > 0):
        raise ConfigError(f"--grace must be a number of seconds > 0, got {args.grace}")
    address, state = _resolve(args.address)

    import ray

    from raysys.runtime.ray_env import bounded_get
    from raysys.sharing.agent import find_agent
    from raysys.sharing.drain import drain_node

    _connect(address, state)
    try:
        node = _alive_node(name)
        if node is None:
            raise ClusterError(f"no live provider named {name!r} in the cluster")
        window = args.deadline if args.deadline is not None else args.grace
        try:
            agent = find_agent(name)
            bounded_get(
                agent.leave.remote(args.deadline, args.grace), 30, f"agent of {name}"
            )
        except (ClusterError, RemoteTimeout, ray.exceptions.RayActorError) as e:
            # No agent to ask (or it ended while asked): drain through Ray
            # directly. Its deadline is all the controller hears, so it carries
            # the grace too.
            logger.warning("%s; draining the node directly", e)
            drain_node(
                node["NodeID"],
                deadline_s=window,
                reason=f"owner of provider {name} reclaims it",
            )
        print(f"provider {name} is leaving; tenants move off within {window:g} s")
        deadline = time.monotonic() + window + LEAVE_MARGIN_S
        while _alive_node(name) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        gone = _alive_node(name) is None
    finally:
        ray.shutdown()
    if not gone:
        gone = _stop_local_node(name, state)
    if not gone:
        print(
            f"provider {name} is drained but its node still runs; stop Ray on that "
            "machine to finish"
        )
        return 1
    _record_path(name).unlink(missing_ok=True)
    print(f"provider {name} has left")
    return 0


def _stop_local_node(name: str, state: local_cluster.ClusterState | None) -> bool:
    """Stop the node at its deadline when it was started on this machine."""
    path = _record_path(name)
    if not path.is_file():
        return False
    marker = json.loads(path.read_text())["marker"]
    logger.info("deadline passed: stopping provider node %s on this machine", name)
    local_cluster.kill_marked(local_cluster.NODE_MARKER, marker, grace_s=2.0)
    if state is not None:
        state.nodes = [n for n in state.nodes if n.marker != marker]
        local_cluster.write_state(state)
    return True


def cmd_provider(argv: Sequence[str]) -> int:
    """``raysys provider join|leave ...``"""
    commands = {"join": cmd_join, "leave": cmd_leave}
    if not argv or argv[0] not in commands:
        print(__doc__)
        if argv[:1] in ([], ["-h"], ["--help"]):
            return 0
        print(f"error: unknown provider command {argv[0]!r}; use join or leave")
        return 2
    return commands[argv[0]](argv[1:])


def status_section(state: local_cluster.ClusterState | None) -> list[str]:
    """Lines of ``raysys status`` about the sharing platform."""
    from raysys.sharing.client import SharingClient

    name = os.environ.get(CONTROLLER_ENV, "raysys-sharing")
    try:
        status = SharingClient.connect(name, call_timeout_s=10.0).status()
    except ClusterError:
        return [f"sharing: no platform controller named {name!r} is running"]
    except RemoteTimeout as e:
        return [f"sharing: the controller did not answer ({e})"]
    return format_status(status, name)


def format_status(status, name: str) -> list[str]:
    """Render a `SharingStatus` as text."""
    m = status.metrics
    lines = [
        f"sharing platform (controller {name}): {len(status.providers)} provider(s), "
        f"{len(status.workloads)} workload(s), {len(status.queue)} queued",
        f"{'provider':<14} {'phase':<9} {'lent':>6} {'in use':>7} {'tenants':>8}  heartbeat",
    ]
    for p in status.providers:
        beat = (
            "-"
            if p.last_heartbeat_s_ago is None
            else f"{p.last_heartbeat_s_ago:.1f} s ago"
        )
        extra = ""
        if p.phase == "draining" and p.leave_deadline_in_s is not None:
            extra = f"  (deadline in {max(0.0, p.leave_deadline_in_s):.1f} s)"
        elif p.phase == "gone":
            extra = f"  ({p.reason})"
        lines.append(
            f"{p.name:<14} {p.phase:<9} {p.gpus_lent:>6.2f} {p.gpus_in_use:>7.2f} "
            f"{len(p.tenants):>8}  {beat}{extra}"
        )
    lines.append(
        f"{'workload':<24} {'kind':<11} {'GPUs':>5} {'state':<9} {'provider':<12} "
        f"{'step':>11} {'ckpt':>6} {'restarts':>8}"
    )
    for w in status.workloads:
        total = "?" if w.num_steps is None else str(w.num_steps)
        ckpt = "-" if w.last_checkpoint_step is None else str(w.last_checkpoint_step)
        lines.append(
            f"{w.workload_id:<24} {w.kind:<11} {w.gpus:>5g} {w.state:<9} "
            f"{w.provider or '-':<12} {f'{w.step}/{total}':>11} {ckpt:>6} {w.restarts:>8}"
        )
        if w.state == "failed" and w.error:
            lines.append(f"    error: {w.error.splitlines()[0]}")
    if status.queue:
        lines.append("queue (next placement pass considers them in this order):")
        for q in status.queue:
            lines.append(
                f"  {q.position + 1}. {q.workload_id} ({q.kind}, {q.gpus:g} GPUs, "
                f"waiting {q.waiting_s:.1f} s): {q.reason}"
            )
    delays = ", ".join(
        f"{k} {v:.1f} s"
        for k, v in m.get("queue_delay_p50_s", {}).items()
        if v is not None
    )
    lines.append(
        f"utilisation {m.get('gpu_utilization', 0):.2f}, migrations "
        f"{m.get('migrations_succeeded', 0)}/{m.get('migrations_attempted', 0)} "
        f"succeeded, lost {m.get('lost_gpu_seconds', 0):.1f} GPU-s, queue delay p50: "
        f"{delays or '-'}"
    )
    return lines
