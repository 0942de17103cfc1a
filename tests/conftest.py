"""Test fixtures shared by the whole suite.

One Ray instance serves the whole test session: a `ray.cluster_utils.Cluster`
with a head node, to which tests that need providers (nodes declaring logical
GPUs) add nodes and remove them again. Starting Ray once keeps the suite fast
on two cores.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# Never let a test join a cluster the developer started with `raysys up`.
os.environ["RAYSYS_STATE_DIR"] = tempfile.mkdtemp(prefix="raysys-test-state-")
atexit.register(shutil.rmtree, os.environ["RAYSYS_STATE_DIR"], ignore_errors=True)
os.environ.pop("RAY_ADDRESS", None)

from support import SHARED_DATA, shared_data  # noqa: E402,F401  (re-exported)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """The session's Ray cluster: a head with 4 logical CPUs, no GPUs."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={
            "num_cpus": 4,
            "num_gpus": 0,
            "resources": {"raysys_head": 1},
            "object_store_memory": 256 * 1024 * 1024,
            "include_dashboard": False,
        },
    )
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def add_provider(ray_cluster):
    """Add provider nodes to the session cluster; they are removed after the test.

    ``add_provider(name, num_gpus=1.0, num_cpus=2)`` returns the node handle, which
    ``ray_cluster.remove_node(node)`` takes away without warning.
    """
    from raysys.runtime.local_cluster import PROVIDER_LABEL, PROVIDER_RESOURCE

    added = []

    def add(name: str, num_gpus: float = 1.0, num_cpus: int = 2):
        node = ray_cluster.add_node(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources={
                PROVIDER_RESOURCE: max(num_gpus, 1.0),
                f"{PROVIDER_RESOURCE}:{name}": 1.0,
            },
            labels={PROVIDER_LABEL: name},
            object_store_memory=128 * 1024 * 1024,
        )
        added.append(node)
        return node

    yield add
    alive = set(ray_cluster.list_all_nodes())
    for node in added:
        if node in alive:
            ray_cluster.remove_node(node)
