"""The ``raysys`` command: start, describe and stop a local cluster.

raysys up [--providers N] [--gpus-per-provider G]   start head + N providers
raysys status                                       describe the cluster
raysys down                                         stop it
raysys submit [--address URL] [--dry-run] -- python jobs/JOB.py ...
                                                    submit a job (ray job submit)
raysys node head|provider [--dry-run] [-- RAY_START_ARGS]
                                                    start this machine as a node
                                                    of a multi-machine cluster
raysys validate-cluster FILE...                     check launcher configs and
                                                    RayCluster manifests
raysys provider join|leave ...                      lend or take back GPUs
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from raysys.runtime import local_cluster
from raysys.runtime.config import load_config
from raysys.runtime.entry import exit_on_sigterm, setup_logging
from raysys.runtime.errors import ClusterError, ConfigError
from raysys.runtime.ray_env import check_reachable, connect_driver, enable_token_auth
from raysys.runtime.security import token_source
from raysys.sharing import cli as sharing_cli

logger = logging.getLogger(__name__)

# Subsystems add sections to `raysys status` here: each gets the cluster state
# (or None) and returns lines to print.
STATUS_SECTIONS: list[Callable[[local_cluster.ClusterState | None], list[str]]] = []


def cmd_up(argv: Sequence[str]) -> int:
    cfg = load_config(
        local_cluster.LocalClusterConfig,
        argv,
        description="Start a local Ray cluster.",
        prog="raysys up",
    )
    state = local_cluster.up(cfg)
    print(f"cluster {state.cluster_id} is up")
    print(f"  GCS address:   {state.gcs_address}")
    print(f"  dashboard/job: {state.dashboard_url}")
    print(f"  providers:     {sum(n.kind == 'provider' for n in state.nodes)}")
    print(f"  token auth:    {'on' if state.auth else 'OFF'}")
    print(
        f"submit a job:   raysys submit --address {state.dashboard_url} -- python JOB"
    )
    auth = "RAY_AUTH_MODE=token " if state.auth else ""
    print(
        f"  or plain Ray: {auth}ray job submit --address {state.dashboard_url} "
        "--working-dir . --runtime-env jobs/runtime_env.yaml -- python JOB "
        "(from the project folder)"
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


def require_token(what: str) -> None:
    """Fail at once, naming where Ray looks, when token auth is on and no token
    is here (Ray would fail with a traceback, `ray job submit` after uploading).

    Raises:
        ClusterError: no token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
            ~/.ray/auth_token.
    """
    if token_source() is None:
        raise ClusterError(
            f"{what} uses token authentication, but no Ray token is on this "
            "machine (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or "
            "~/.ray/auth_token); restore the token the cluster was started with "
            "(a new one is refused)"
        )


def vanished_nodes(state: local_cluster.ClusterState | None) -> list[str]:
    """Notes on recorded nodes of this machine's cluster none of whose processes
    run: Ray still reports such a node alive until its heartbeats time out."""
    if state is None or not Path("/proc").is_dir():
        return []
    return [
        f"note: {node.name} is recorded but none of its processes runs (killed?); "
        "Ray marks it dead once its heartbeats time out"
        for node in state.nodes
        if not local_cluster.marked_pids(local_cluster.NODE_MARKER, node.marker)
    ]


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
        stale = local_cluster.read_state()
        if stale is not None:
            print(
                f"the recorded cluster {stale.cluster_id} at {stale.gcs_address} no "
                "longer answers; `raysys down` stops what is left of it"
            )
        return 1
    if state is not None and state.auth:
        require_token(f"the local cluster {state.cluster_id}")
        enable_token_auth()
    check_reachable(address)
    connect_driver(address)
    try:
        for line in describe_cluster(state):
            print(line)
        for line in vanished_nodes(state):
            print(line)
        for section in STATUS_SECTIONS:
            print()
            for line in section(state):
                print(line)
    finally:
        ray.shutdown()
    return 0


def cmd_submit(argv: Sequence[str]) -> int:
    import subprocess

    from raysys.runtime import submit

    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="raysys submit",
        description=(
            "Submit a job through Ray's job API (`ray job submit`) with the project "
            "as its working dir, after checking the upload fits Ray's limit. Other "
            "`ray job submit` options (--no-wait, --submission-id ID, "
            "--entrypoint-num-gpus N, ...) pass through."
        ),
        usage="raysys submit [--address URL] [--dry-run] [OPTIONS] -- ENTRYPOINT...",
    )
    parser.add_argument("--address", help="job API address (default: see docs)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="measure the package and print the command without submitting",
    )
    parser.add_argument(
        "--working-dir",
        default=str(submit.PROJECT_ROOT),
        help="directory shipped as the job's working dir (default: the project)",
    )
    parser.add_argument(
        "--runtime-env",
        default=str(submit.RUNTIME_ENV_FILE),
        help="runtime_env YAML whose excludes apply (default: jobs/runtime_env.yaml)",
    )
    ns, ray_args = parser.parse_known_args(argv[:cut])
    address = submit.resolve_dashboard_address(ns.address)
    cmd = submit.submit_command(
        argv[cut + 1 :],
        address=address,
        working_dir=ns.working_dir,
        runtime_env_file=ns.runtime_env,
        ray_args=ray_args,
    )
    env = submit.submit_env(address)
    if env.get("RAY_AUTH_MODE") == "token" and not ns.dry_run:
        require_token(f"the job API at {address}")
    measure = submit.prepare_submission(ns.working_dir, ns.runtime_env)
    limit_bytes, _ = submit.upload_limit()
    print(
        f"package: {measure.package_bytes / 1024**2:.2f} MiB in {measure.num_files} "
        f"files (Ray's upload limit {limit_bytes / 1024**2:.0f} MiB); "
        f"token auth {'on' if env.get('RAY_AUTH_MODE') == 'token' else 'off'}"
    )
    if ns.dry_run:
        # With token auth, plain `ray job submit` finds its token only when told
        # to look for one.
        auth = "RAY_AUTH_MODE=token " if env.get("RAY_AUTH_MODE") == "token" else ""
        print(auth + shlex.join(cmd))
        return 0
    sys.stdout.flush()
    return subprocess.run(cmd, env=env).returncode


def cmd_node(argv: Sequence[str]) -> int:
    from raysys.runtime import nodes

    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="raysys node",
        description=(
            "Start this machine as the head or a provider node of a multi-machine "
            "cluster (`ray start` with token authentication, the dashboard on "
            "127.0.0.1, and the provider resources and label). Arguments after "
            "`--` go to `ray start`."
        ),
    )
    parser.add_argument("role", choices=["head", "provider"])
    parser.add_argument("--name", help="provider name (default: host name)")
    parser.add_argument(
        "--num-gpus", type=float, help="GPUs to lend (default: nvidia-smi count)"
    )
    parser.add_argument(
        "--ray-start-cmd",
        help="a generated `ray start ...` command to extend (KubeRay's "
        "$KUBERAY_GEN_RAY_START_CMD)",
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="turn token authentication off"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the command, start nothing"
    )
    ns = parser.parse_args(argv[:cut])
    extra = argv[cut + 1 :]
    if ns.role == "head":
        if ns.name is not None or ns.num_gpus is not None:
            parser.error("--name and --num-gpus apply to providers only")
        plan = nodes.plan_head(
            extra, ray_start_cmd=ns.ray_start_cmd, auth=not ns.no_auth
        )
    else:
        plan = nodes.plan_provider(
            extra,
            ray_start_cmd=ns.ray_start_cmd,
            name=ns.name,
            num_gpus=ns.num_gpus,
            auth=not ns.no_auth,
        )
    if ns.dry_run:
        print(plan.shell())
        return 0
    nodes.run(plan)
    return 1  # not reached: run() replaces this process


def cmd_validate_cluster(argv: Sequence[str]) -> int:
    from raysys.runtime import cluster_configs

    parser = argparse.ArgumentParser(
        prog="raysys validate-cluster",
        description=(
            "Validate cluster-launcher configs against the installed Ray's schema "
            "and RayCluster manifests against KubeRay's ray.io/v1 fields, then "
            "check token authentication and loopback binding."
        ),
    )
    parser.add_argument("files", nargs="+", help="files from clusters/")
    ns = parser.parse_args(argv)
    status = 0
    for path in ns.files:
        try:
            findings = cluster_configs.check_cluster_file(path)
        except ConfigError as e:
            print(f"{path}: INVALID\n{e}")
            status = 2
            continue
        if findings:
            print(f"{path}: valid, but open:")
            for finding in findings:
                print(f"  - {finding}")
            status = max(status, 1)
        else:
            print(f"{path}: ok")
    return status


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "submit": cmd_submit,
    "node": cmd_node,
    "validate-cluster": cmd_validate_cluster,
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
    # SIGTERM ends a command as Ctrl-C does, through its cleanup (a half-started
    # `raysys up` stops what it started).
    exit_on_sigterm()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print(f"raysys {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
