"""Ray's own node drain, as cloud preemption uses it.

A drain tells the GCS that a node is about to go away, optionally by a
deadline: the scheduler stops placing new work there, and once nothing runs on
the node its raylet exits by itself. Ray 2.60 exposes this through the GCS
client (the same call behind the hidden ``ray drain-node`` command and the
autoscaler's preemption handling); it is reached here through one function so
that a change of that private API touches one place.
"""

from __future__ import annotations

import logging
import time

import ray

from raysys.runtime.errors import ClusterError

logger = logging.getLogger(__name__)


def drain_node(
    node_id: str, *, deadline_s: float | None, reason: str, timeout_s: float = 10.0
) -> float | None:
    """Ask the GCS to drain ``node_id`` (hex) as a preemption with a deadline.

    Args:
        deadline_s: seconds from now at which the node will be gone; None
            drains without a deadline.
        reason: why, shown in Ray's node state.
        timeout_s: bound on the GCS call.

    Returns:
        The deadline as a Unix time, or None without one.

    Raises:
        ClusterError: the GCS is unreachable or refused the drain.
    """
    try:
        from ray.core.generated import autoscaler_pb2

        gcs = ray._private.worker.global_worker.gcs_client
        deadline_at = None if deadline_s is None else time.time() + deadline_s
        accepted, message = gcs.drain_node(
            node_id,
            autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            reason,
            0 if deadline_at is None else int(deadline_at * 1000),
            timeout=timeout_s,
        )
    except (AttributeError, ImportError) as e:
        raise ClusterError(
            f"this Ray ({ray.__version__}) lacks the GCS drain API raysys uses: {e}"
        ) from e
    except Exception as e:  # grpc and Ray raise several types here
        raise ClusterError(f"draining node {node_id[:12]} failed: {e}") from e
    if not accepted:
        raise ClusterError(f"the GCS refused to drain node {node_id[:12]}: {message}")
    logger.info(
        "node %s draining (%s), deadline %s",
        node_id[:12],
        reason,
        "none" if deadline_s is None else f"in {deadline_s:.1f} s",
    )
    return deadline_at


def draining_nodes() -> dict[str, float | None]:
    """Nodes being drained: hex id -> deadline as a Unix time (None: no deadline)."""
    try:
        raw = ray._private.state.state.get_draining_nodes()
    except Exception as e:  # private API; a failure must not stop the caller
        logger.debug("cannot read draining nodes: %s", e)
        return {}
    return {node_id: (ms / 1000.0 if ms else None) for node_id, ms in raw.items()}
