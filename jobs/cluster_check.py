"""Check a cluster before trusting it with work: nodes, providers, a request.

Submit it to a freshly deployed cluster (or run it directly)::

    raysys submit -- python jobs/cluster_check.py --num-gpus 1 --out /tmp/check.json

Steps:

1. connect (`raysys.runtime.init_ray`) and list the nodes and providers;
2. check that the request (``--num-bundles`` bundles of ``--num-cpus``,
   ``--num-gpus`` and ``--set resources.NAME=AMOUNT``, placed with
   ``--strategy``) can ever be satisfied by this cluster and, if known, its
   autoscaler; a request that never can fails here with its reason instead of
   waiting forever;
3. place the request as a placement group and wait for it, at most
   ``--timeout-s``;
4. run one probe task on every provider, pinned by its ``provider:<name>``
   resource, which reports its host and the GPUs Ray gave it;
5. write the JSON report (``--out``).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from raysys.runtime import Config, Report, init_ray, run_job
from raysys.runtime.config import OutputFile
from raysys.runtime.errors import ClusterError
from raysys.runtime.local_cluster import PROVIDER_LABEL, PROVIDER_RESOURCE
from raysys.runtime.ray_env import bounded_get
from raysys.runtime.resources import alive_node_kinds, require_resources

logger = logging.getLogger("jobs.cluster_check")


class ClusterCheckConfig(Config):
    """Options of the cluster check."""

    num_bundles: int = Field(1, ge=1, description="bundles in the request, >= 1")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per bundle, >= 0")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per bundle, >= 0")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom resources per bundle: NAME=AMOUNT[,NAME=AMOUNT], "
        "e.g. provider=1",
    )
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="placement-group strategy of the request"
    )
    autoscaler_config: Path | None = Field(
        None,
        description="launcher YAML or RayCluster manifest of the cluster's "
        "autoscaler (default: ~/ray_bootstrap_config.yaml when present)",
    )
    timeout_s: float = Field(
        60.0, gt=0, description="bound on each wait (placement, probes), > 0"
    )
    out: OutputFile = Field(
        Path("out/cluster_check/report.json"), description="JSON report path"
    )

    @field_validator("resources", mode="before")
    @classmethod
    def _parse_resources(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs = [p.partition("=") for p in value.split(",") if p.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError("write NAME=AMOUNT[,NAME=AMOUNT], e.g. provider=1")
        return {name.strip(): amount.strip() for name, _, amount in pairs}

    @model_validator(mode="after")
    def _bundle_not_empty(self) -> ClusterCheckConfig:
        if (
            self.num_cpus == 0
            and self.num_gpus == 0
            and not any(self.resources.values())
        ):
            raise ValueError(
                "a bundle must ask for something: set --num-cpus, --num-gpus or "
                "--set resources.NAME=AMOUNT above 0"
            )
        return self

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: v for k, v in bundle.items() if v > 0}


class NodeInfo(BaseModel):
    name: str
    resources: dict[str, float]
    labels: dict[str, str]


class ProbeResult(BaseModel):
    provider: str
    answered: bool
    hostname: str | None = None
    pid: int | None = None
    gpu_ids: list[str] = Field(default_factory=list)
    python: str | None = None


class ClusterCheckReport(Report):
    ray_version: str
    connection: str
    auth_mode: str
    nodes: list[NodeInfo]
    num_providers: int
    bundles: list[dict[str, float]]
    strategy: str
    placement_wait_s: float
    probes: list[ProbeResult]
    all_providers_answered: bool


def probe() -> dict[str, object]:
    import ray

    return {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "python": platform.python_version(),
    }


def describe_nodes() -> list[NodeInfo]:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = []
    for node, kind in zip(alive, alive_node_kinds(alive), strict=True):
        labels = {
            k: str(v)
            for k, v in (node.get("Labels") or {}).items()
            if not k.startswith("ray.io/")
        }
        nodes.append(
            NodeInfo(name=kind.name, resources=dict(kind.resources), labels=labels)
        )
    return nodes


def place(cfg: ClusterCheckConfig, bundles: list[dict[str, float]]) -> float:
    """Reserve the request as a placement group, then release it; seconds waited."""
    from ray.util.placement_group import placement_group, remove_placement_group

    start = time.monotonic()
    group = placement_group(bundles, strategy=cfg.strategy)
    try:
        bounded_get(
            group.ready(),
            cfg.timeout_s,
            f"placement of {len(bundles)} bundle(s) {bundles[0]} ({cfg.strategy}); "
            "the cluster can hold it but other work holds the resources",
        )
    finally:
        remove_placement_group(group)
    return time.monotonic() - start


def run_probes(cfg: ClusterCheckConfig, providers: list[str]) -> list[ProbeResult]:
    import ray

    remote_probe = ray.remote(num_cpus=0)(probe)
    refs = {
        name: remote_probe.options(
            resources={f"{PROVIDER_RESOURCE}:{name}": 0.001}
        ).remote()
        for name in providers
    }
    ready, _ = ray.wait(
        list(refs.values()), num_returns=len(refs), timeout=cfg.timeout_s
    )
    results = []
    for name, ref in refs.items():
        if ref in ready:
            results.append(ProbeResult(provider=name, answered=True, **ray.get(ref)))
        else:
            logger.warning(
                "provider %s did not answer within %g s", name, cfg.timeout_s
            )
            ray.cancel(ref, force=True)
            results.append(ProbeResult(provider=name, answered=False))
    return results


def main(cfg: ClusterCheckConfig) -> None:
    import ray
    import yaml

    connection = init_ray()
    nodes = describe_nodes()
    providers = sorted(
        n.labels[PROVIDER_LABEL] for n in nodes if PROVIDER_LABEL in n.labels
    )
    logger.info("cluster: %d nodes, providers %s", len(nodes), providers)

    autoscaler = None
    if cfg.autoscaler_config is not None:
        if not cfg.autoscaler_config.is_file():
            raise ClusterError(f"autoscaler config {cfg.autoscaler_config} is missing")
        autoscaler = yaml.safe_load(cfg.autoscaler_config.read_text())
    bundles = [cfg.bundle() for _ in range(cfg.num_bundles)]
    require_resources(
        bundles,
        strategy=cfg.strategy,
        what="cluster_check",
        autoscaler_config=autoscaler,
    )
    wait_s = place(cfg, bundles)
    logger.info("placed %d bundle(s) in %.2f s", len(bundles), wait_s)

    probes = run_probes(cfg, providers)
    report = ClusterCheckReport(
        ray_version=ray.__version__,
        connection=connection,
        auth_mode=os.environ.get("RAY_AUTH_MODE", "unset"),
        nodes=nodes,
        num_providers=len(providers),
        bundles=bundles,
        strategy=cfg.strategy,
        placement_wait_s=wait_s,
        probes=probes,
        all_providers_answered=all(p.answered for p in probes),
    )
    path = report.write(cfg.out)
    answered = sum(p.answered for p in probes)
    print(
        f"cluster_check: {len(nodes)} nodes, {answered}/{len(probes)} providers "
        f"answered, request placed in {wait_s:.2f} s; report: {path}"
    )
    if not report.all_providers_answered:
        raise ClusterError(
            f"{len(probes) - answered} provider(s) did not answer; see {path}"
        )


if __name__ == "__main__":
    sys.exit(run_job(ClusterCheckConfig, main, description=__doc__.splitlines()[0]))
