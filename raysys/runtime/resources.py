"""Refuse resource requests the cluster can never satisfy, before scheduling them.

Ray queues a task, actor or placement group it cannot place and waits, forever
on a fixed cluster: a job asking for 8 GPUs on a 1-GPU cluster hangs instead of
failing. `require_resources` checks a request up front against what the cluster
could ever offer: every node alive now (its total resources, not what is free at
the moment) and, when an autoscaler config is known, every node type it may
launch, counted up to its ``max_workers``.

A request is a list of bundles, each a mapping of resource name to amount
(``CPU``, ``GPU``, and custom resources such as ``provider`` or
``provider:<name>``). Without a strategy the bundles are independent tasks or
actors: each must fit on one node. With a placement-group strategy they must be
placed together:

- ``STRICT_PACK``: the sum of the bundles must fit on one node (exact);
- ``STRICT_SPREAD``: each bundle on a different node (exact, by matching bundles
  to nodes);
- ``PACK`` / ``SPREAD``: every bundle fits a node and the cluster's totals cover
  the sum. This is a necessary condition only: the check never refuses a request
  that can be placed, but may pass one that only bin packing rules out.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raysys.runtime.errors import ConfigError, UnsatisfiableResources

logger = logging.getLogger(__name__)

# Slack for float sums of fractional resources (Ray keeps 4 decimal places).
_EPS = 1e-4
# The launcher writes the cluster's config here on the head node, where job
# drivers run; RAYSYS_AUTOSCALER_CONFIG points elsewhere.
LAUNCHER_BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
AUTOSCALER_CONFIG_ENV = "RAYSYS_AUTOSCALER_CONFIG"


class Strategy(str, enum.Enum):
    """Placement-group strategies (Ray's names)."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


@dataclass(frozen=True)
class NodeKind:
    """Nodes of one shape the cluster has or may launch.

    Attributes:
        name: a node's provider name, ``head``, its id, or an autoscaler node type.
        resources: the total resources of one such node.
        max_count: how many such nodes can exist at once.
        source: ``"alive"`` for a node of the running cluster, ``"autoscaler"``
            for a node type the autoscaler may launch.
    """

    name: str
    resources: Mapping[str, float]
    max_count: int = 1
    source: str = "alive"

    def fits(self, bundle: Mapping[str, float]) -> bool:
        return all(self.resources.get(r, 0.0) + _EPS >= a for r, a in bundle.items())


@dataclass(frozen=True)
class ResourceRequest:
    """Bundles of resources, placed independently or together as one group."""

    bundles: tuple[Mapping[str, float], ...]
    strategy: Strategy | None = None
    what: str = "the request"

    def __post_init__(self) -> None:
        if not self.bundles:
            raise ConfigError(f"{self.what} has no bundles; give at least one")
        for i, bundle in enumerate(self.bundles):
            for name, amount in bundle.items():
                if not isinstance(amount, int | float) or not math.isfinite(amount):
                    raise ConfigError(
                        f"{self.what}: bundle {i} asks for {name}={amount!r}; "
                        "amounts are finite numbers"
                    )
                if amount < 0:
                    raise ConfigError(
                        f"{self.what}: bundle {i} asks for {name}={amount:g}; "
                        "amounts are >= 0"
                    )
                if amount > 1 and abs(amount - round(amount)) > _EPS:
                    raise ConfigError(
                        f"{self.what}: bundle {i} asks for {name}={amount:g}; Ray "
                        "takes fractions only up to 1, so use a whole number"
                    )


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _nonzero(bundle: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in bundle.items() if v > 0}


def _largest(kinds: Sequence[NodeKind], resource: str) -> tuple[float, str]:
    best = max(kinds, key=lambda k: k.resources.get(resource, 0.0), default=None)
    if best is None:
        return 0.0, "no node"
    return best.resources.get(resource, 0.0), best.name


def _why_no_node_fits(bundle: Mapping[str, float], kinds: Sequence[NodeKind]) -> str:
    short = []
    for resource, amount in sorted(bundle.items()):
        most, where = _largest(kinds, resource)
        if most + _EPS < amount:
            where = f" ({where})" if most > 0 else ""
            short.append(
                f"{amount:g} {resource}, the most any node offers is {most:g}{where}"
            )
    if short:
        return "asks for " + "; ".join(short)
    return "needs these together on one node, and no node has all of them"


def _match_spread(bundles: Sequence[Mapping[str, float]], kinds: Sequence[NodeKind]):
    """Maximum matching of bundles to distinct nodes (augmenting paths)."""
    nodes = [k for k in kinds for _ in range(min(k.max_count, len(bundles)))]
    owner: dict[int, int] = {}  # node index -> bundle index

    def place(b: int, seen: set[int]) -> bool:
        for n, node in enumerate(nodes):
            if n in seen or not node.fits(bundles[b]):
                continue
            seen.add(n)
            if n not in owner or place(owner[n], seen):
                owner[n] = b
                return True
        return False

    return sum(place(b, set()) for b in range(len(bundles)))


def check_satisfiable(request: ResourceRequest, kinds: Sequence[NodeKind]) -> None:
    """Raise if no cluster made of ``kinds`` could ever place ``request``.

    Raises:
        UnsatisfiableResources: with the bundle, the resource and the most any
            node offers, so the reason reads without looking anything up.
    """
    bundles = [_nonzero(b) for b in request.bundles]
    # Describe the nodes by the resources the request is about, plus CPU/GPU.
    shown = {"CPU", "GPU"}.union(*bundles)
    tail = (
        "; the cluster offers: "
        + ", ".join(
            f"{k.name} x{k.max_count} "
            + _fmt({r: v for r, v in k.resources.items() if r in shown})
            for k in kinds
        )
        if kinds
        else "; the cluster has no nodes"
    )
    for i, bundle in enumerate(bundles):
        if not any(k.fits(bundle) for k in kinds):
            which = f"bundle {i} " if len(bundles) > 1 else ""
            raise UnsatisfiableResources(
                f"{request.what} can never be scheduled: {which}{_fmt(bundle)} "
                f"{_why_no_node_fits(bundle, kinds)}{tail}"
            )
    if request.strategy is None:
        return
    total: dict[str, float] = {}
    for bundle in bundles:
        for resource, amount in bundle.items():
            total[resource] = total.get(resource, 0.0) + amount
    if request.strategy is Strategy.STRICT_PACK:
        if not any(k.fits(total) for k in kinds):
            raise UnsatisfiableResources(
                f"{request.what} can never be scheduled: STRICT_PACK puts all "
                f"{len(bundles)} bundles on one node, {_fmt(total)} in all, which "
                f"{_why_no_node_fits(total, kinds)}{tail}"
            )
        return
    if request.strategy is Strategy.STRICT_SPREAD:
        placed = _match_spread(bundles, kinds)
        if placed < len(bundles):
            raise UnsatisfiableResources(
                f"{request.what} can never be scheduled: STRICT_SPREAD needs "
                f"{len(bundles)} different nodes, one per bundle, but at most "
                f"{placed} of its bundles can sit on distinct nodes{tail}"
            )
        return
    for resource, amount in sorted(total.items()):
        capacity = sum(k.resources.get(resource, 0.0) * k.max_count for k in kinds)
        if capacity + _EPS < amount:
            raise UnsatisfiableResources(
                f"{request.what} can never be scheduled: its {len(bundles)} bundles "
                f"need {amount:g} {resource} at once, but the whole cluster can "
                f"offer at most {capacity:g}{tail}"
            )


# ---- the cluster as it is ----------------------------------------------------

_NODE_ID_RESOURCE = re.compile(r"^node:")


def alive_node_kinds(
    nodes: Sequence[Mapping[str, Any]] | None = None,
) -> list[NodeKind]:
    """Each alive node of the connected cluster (``ray.nodes()``) as a kind.

    Resources are the node's totals; Ray's per-node ``node:<ip>`` markers are
    left out.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    from raysys.runtime.local_cluster import HEAD_RESOURCE, PROVIDER_LABEL

    kinds = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = {
            k: float(v)
            for k, v in (node.get("Resources") or {}).items()
            if not _NODE_ID_RESOURCE.match(k)
        }
        labels = node.get("Labels") or {}
        name = labels.get(PROVIDER_LABEL) or (
            "head" if HEAD_RESOURCE in resources else str(node.get("NodeID", "?"))[:12]
        )
        kinds.append(NodeKind(name=name, resources=resources))
    return kinds


# ---- the cluster as its autoscaler may grow it --------------------------------

_QUANTITY = re.compile(r"^([0-9.]+)(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
_SUFFIX = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def _k8s_quantity(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise ConfigError(f"cannot read the Kubernetes quantity {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def _ray_start_resources(params: Mapping[str, Any]) -> dict[str, float]:
    raw = params.get("resources")
    if not raw:
        return {}
    text = str(raw).strip().strip("'\"")
    try:
        return {k: float(v) for k, v in json.loads(text.replace('\\"', '"')).items()}
    except (ValueError, AttributeError) as e:
        raise ConfigError(
            f"rayStartParams resources {raw!r} is not a JSON mapping of name to amount"
        ) from e


def _kuberay_group_kind(group: Mapping[str, Any], name: str, count: int) -> NodeKind:
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers")
    limits = ((containers or [{}])[0].get("resources") or {}).get("limits") or {}
    resources = _ray_start_resources(params)
    cpus = params.get("num-cpus", limits.get("cpu"))
    if cpus is not None:
        resources["CPU"] = math.floor(_k8s_quantity(cpus))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if gpus is not None:
        resources["GPU"] = _k8s_quantity(gpus)
    return NodeKind(
        name=name, resources=resources, max_count=count, source="autoscaler"
    )


def autoscaler_node_kinds(config: Mapping[str, Any]) -> list[NodeKind]:
    """The node types an autoscaler config may launch, with their maximum counts.

    Takes a cluster-launcher config (``available_node_types``) or a KubeRay
    ``RayCluster`` manifest (``workerGroupSpecs``). A launcher config for the
    local provider declares no node types: its machines are all started by
    ``ray up`` and show up as alive nodes instead.
    """
    if config.get("kind") == "RayCluster":
        spec = config.get("spec") or {}
        kinds = [_kuberay_group_kind(spec.get("headGroupSpec") or {}, "head", 1)]
        for group in spec.get("workerGroupSpecs") or []:
            count = int(group.get("maxReplicas", group.get("replicas", 1)))
            count *= int(group.get("numOfHosts", 1))
            kinds.append(_kuberay_group_kind(group, group["groupName"], count))
        return kinds
    global_max = int(config.get("max_workers", 0) or 0)
    head_type = config.get("head_node_type")
    kinds = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        count = 1 if name == head_type else node_type.get("max_workers", global_max)
        resources = {k: float(v) for k, v in (node_type.get("resources") or {}).items()}
        kinds.append(
            NodeKind(
                name=name,
                resources=resources,
                max_count=int(count),
                source="autoscaler",
            )
        )
    return kinds


def known_autoscaler_config() -> dict[str, Any] | None:
    """The autoscaler config of this cluster when one is on disk here.

    ``$RAYSYS_AUTOSCALER_CONFIG`` when set (a launcher YAML or a RayCluster
    manifest), else the launcher's ``~/ray_bootstrap_config.yaml`` on the head.

    Raises:
        ConfigError: ``$RAYSYS_AUTOSCALER_CONFIG`` names a missing or bad file.
    """
    explicit = os.environ.get(AUTOSCALER_CONFIG_ENV)
    path = Path(explicit) if explicit else LAUNCHER_BOOTSTRAP_CONFIG.expanduser()
    if not path.is_file():
        if explicit:
            raise ConfigError(
                f"{AUTOSCALER_CONFIG_ENV}={explicit} is not a file; point it at the "
                "cluster's launcher YAML or RayCluster manifest, or unset it"
            )
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"autoscaler config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"autoscaler config {path} is not a mapping")
    return data


def require_resources(
    bundles: Sequence[Mapping[str, float]],
    *,
    strategy: Strategy | str | None = None,
    what: str = "this job",
    autoscaler_config: Mapping[str, Any] | None = None,
) -> list[NodeKind]:
    """Fail fast when the connected cluster can never run ``bundles``.

    Jobs call this after `init_ray` and before creating tasks, actors or
    placement groups. The cluster is what ``ray.nodes()`` reports plus, when an
    autoscaler config is passed or found (`known_autoscaler_config`), the node
    types it may launch.

    Returns:
        The node kinds the request was checked against.

    Raises:
        UnsatisfiableResources: no cluster of these nodes can place the request.
        ConfigError: the request itself is malformed.
    """
    request = ResourceRequest(
        bundles=tuple(bundles),
        strategy=Strategy(strategy) if strategy is not None else None,
        what=what,
    )
    kinds = alive_node_kinds()
    config = autoscaler_config
    if config is None:
        config = known_autoscaler_config()
    if config is not None:
        kinds += autoscaler_node_kinds(config)
    check_satisfiable(request, kinds)
    logger.info(
        "%s fits the cluster: %d bundle(s) %s, strategy %s, checked against %d "
        "node kind(s)",
        what,
        len(request.bundles),
        ", ".join(_fmt(b) for b in request.bundles),
        request.strategy.value if request.strategy else "none (independent)",
        len(kinds),
    )
    return kinds
