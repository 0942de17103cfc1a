"""The ``raysys`` command: start, describe and stop a local cluster.

raysys up [--providers N] [--gpus-per-provider G]   start head + N providers
raysys status                                       describe the cluster
raysys down                                         stop it
raysys provider join|leave ...                      lend or take back GPUs
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from raysys.runtime import local_cluster
from raysys.runtime.config import build_parser, validate_config
from raysys.runtime.entry import setup_logging
from raysys.runtime.errors import ClusterError, ConfigError
from raysys.runtime.ray_env import enable_token_auth
from raysys.sharing import cli as sharing_cli

logger = logging.getLogger(__name__)

# Subsystems add sections to `raysys status` here: each gets the cluster state
# (or None) and returns lines to print.
STATUS_SECTIONS: list[Callable[[local_cluster.ClusterState | None], list[str]]] = []


def cmd_up(argv: Sequence[str]) -> int:
    parser = build_parser(
        local_cluster.LocalClusterConfig, "Start a local Ray cluster."
    )
    parser.prog = "raysys up"
    ns = vars(parser.parse_args(argv))
    ns.pop("config"), ns.pop("set")
    cfg = validate_config(
        local_cluster.LocalClusterConfig, {k: v for k, v in ns.items() if v is not None}
    )
    state = local_cluster.up(cfg)
    print(f"cluster {state.cluster_id} is up")
    print(f"  GCS address:   {state.gcs_address}")
    print(f"  dashboard/job: {state.dashboard_url}")
    print(f"  providers:     {sum(n.kind == 'provider' for n in state.nodes)}")
    print(f"  token auth:    {'on' if state.auth else 'OFF'}")
    print(
        f"submit a job:   ray job submit --address {state.dashboard_url} -- python JOB"
    )
    return 0


def cmd_down(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(
        prog="raysys down", description="Stop the local cluster."
    ).parse_args(argv)
    print("cluster stopped" if local_cluster.down() else "no local cluster is recorded")
    return 0


def describe_cluster(state: local_cluster.ClusterState | None) -> list[str]:
    """Lines describing the nodes of the connected cluster."""
    import ray

    lines = []
    if state is not None:
        lines.append(f"cluster {state.cluster_id} at {state.gcs_address}")
        lines.append(
            f"dashboard/job API: {state.dashboard_url} (token auth {'on' if state.auth else 'OFF'})"
        )
    lines.append(f"{'node':<14} {'alive':<6} {'CPU':>5} {'GPU':>5}  labels")
    for node in sorted(
        ray.nodes(), key=lambda n: n["NodeManagerAddress"] + n["NodeID"]
    ):
        res = node.get("Resources", {})
        labels = node.get("Labels", {}) or {}
        name = labels.get(local_cluster.PROVIDER_LABEL) or (
            "head" if local_cluster.HEAD_RESOURCE in res else node["NodeID"][:12]
        )
        shown = {k: v for k, v in labels.items() if not k.startswith("ray.io/")}
        lines.append(
            f"{name:<14} {str(node['Alive']).lower():<6} {res.get('CPU', 0):>5g} "
            f"{res.get('GPU', 0):>5g}  {shown or ''}"
        )
    return lines


def cmd_status(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(
        prog="raysys status", description="Describe the cluster."
    ).parse_args(argv)
    import os

    import ray

    state = local_cluster.running_cluster()
    address = os.environ.get("RAY_ADDRESS") or (state.gcs_address if state else None)
    if address is None:
        print("no cluster is running (start one with `raysys up`, or set RAY_ADDRESS)")
        return 1
    if state is not None and state.auth:
        enable_token_auth()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        for line in describe_cluster(state):
            print(line)
        for section in STATUS_SECTIONS:
            print()
            for line in section(state):
                print(line)
    finally:
        ray.shutdown()
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "provider": sharing_cli.cmd_provider,
}
STATUS_SECTIONS.append(sharing_cli.status_section)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(
                f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}"
            )
            return 2
        return 0
    setup_logging("WARNING")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
