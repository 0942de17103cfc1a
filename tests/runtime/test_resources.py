"""Requests the cluster can never satisfy fail up front, with their reason."""

from __future__ import annotations

import pytest

from raysys.runtime.errors import ConfigError, UnsatisfiableResources
from raysys.runtime.resources import (
    NodeKind,
    ResourceRequest,
    Strategy,
    alive_node_kinds,
    autoscaler_node_kinds,
    check_satisfiable,
    require_resources,
)

HEAD = NodeKind("head", {"CPU": 2, "raysys_head": 1})


def provider(name: str, gpus: float = 1, cpus: float = 2, count: int = 1) -> NodeKind:
    return NodeKind(
        name,
        {"CPU": cpus, "GPU": gpus, "provider": max(gpus, 1), f"provider:{name}": 1},
        max_count=count,
    )


def refused(request: ResourceRequest, kinds) -> str:
    with pytest.raises(UnsatisfiableResources) as info:
        check_satisfiable(request, kinds)
    return str(info.value)


def test_eight_gpus_on_a_one_gpu_cluster_names_the_gap():
    reason = refused(
        ResourceRequest(({"GPU": 8, "CPU": 1},), what="the job"),
        [HEAD, provider("lab-1")],
    )
    assert reason.startswith("the job can never be scheduled")
    assert "8 GPU, the most any node offers is 1 (lab-1)" in reason


@pytest.mark.parametrize("gpus", [0.5, 1, 4])
def test_a_bundle_fitting_the_largest_node_passes(gpus):
    check_satisfiable(
        ResourceRequest(({"GPU": gpus, "CPU": 2},)),
        [HEAD, provider("small", 1), provider("big", 4)],
    )


def test_resources_split_over_nodes_do_not_make_one_bundle_fit():
    reason = refused(
        ResourceRequest(({"GPU": 1, "raysys_head": 1},)), [HEAD, provider("lab-1")]
    )
    assert "no node has all of them" in reason


def test_unknown_custom_resource_is_refused():
    reason = refused(
        ResourceRequest(({"provider:gone": 1},)), [HEAD, provider("lab-1")]
    )
    assert "1 provider:gone, the most any node offers is 0" in reason


def test_independent_bundles_need_only_fit_one_at_a_time():
    kinds = [HEAD, provider("lab-1")]
    check_satisfiable(ResourceRequest(({"GPU": 1},) * 8), kinds)


def test_a_gang_needs_the_cluster_total():
    kinds = [HEAD, provider("lab-1"), provider("lab-2")]
    check_satisfiable(ResourceRequest(({"GPU": 1},) * 2, Strategy.PACK), kinds)
    reason = refused(ResourceRequest(({"GPU": 1},) * 3, Strategy.SPREAD), kinds)
    assert "need 3 GPU at once, but the whole cluster can offer at most 2" in reason


def test_strict_pack_needs_one_node_for_the_sum():
    kinds = [HEAD, provider("lab-1", gpus=2), provider("lab-2", gpus=2)]
    check_satisfiable(ResourceRequest(({"GPU": 1},) * 2, Strategy.STRICT_PACK), kinds)
    reason = refused(ResourceRequest(({"GPU": 1},) * 3, Strategy.STRICT_PACK), kinds)
    assert "{GPU: 3} in all" in reason


def test_strict_spread_matches_bundles_to_distinct_nodes():
    kinds = [HEAD, provider("lab-1"), provider("lab-2")]
    # 3 CPU bundles: head, lab-1, lab-2 -> fits
    check_satisfiable(ResourceRequest(({"CPU": 1},) * 3, Strategy.STRICT_SPREAD), kinds)
    # 3 GPU bundles: only two nodes have a GPU
    reason = refused(ResourceRequest(({"GPU": 1},) * 3, Strategy.STRICT_SPREAD), kinds)
    assert "at most 2 of its bundles can sit on distinct nodes" in reason


def test_strict_spread_needs_a_matching_not_a_count():
    # Two bundles each fit only lab-1 (the only 4-CPU node); the head also fits
    # a 1-CPU bundle, so counting nodes that fit "some" bundle would say 2 >= 2.
    kinds = [HEAD, provider("lab-1", cpus=4)]
    request = ResourceRequest(({"CPU": 4},) * 2, Strategy.STRICT_SPREAD)
    assert "at most 1 of its bundles" in refused(request, kinds)


def test_autoscaler_types_count_up_to_max_workers():
    config = {
        "max_workers": 10,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 8, "GPU": 0}, "node_config": {}},
            "gpu": {
                "min_workers": 0,
                "max_workers": 3,
                "resources": {"CPU": 4, "GPU": 1},
                "node_config": {},
            },
            "cpu": {"resources": {"CPU": 16}, "node_config": {}},
        },
    }
    kinds = {k.name: k for k in autoscaler_node_kinds(config)}
    assert (kinds["head"].max_count, kinds["gpu"].max_count) == (1, 3)
    assert kinds["cpu"].max_count == 10  # the global max_workers
    check_satisfiable(
        ResourceRequest(({"GPU": 1},) * 3, Strategy.SPREAD), list(kinds.values())
    )
    refused(ResourceRequest(({"GPU": 1},) * 4, Strategy.SPREAD), list(kinds.values()))


def test_raycluster_groups_read_limits_and_ray_start_params():
    manifest = {
        "kind": "RayCluster",
        "spec": {
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0"},
                "template": {"spec": {"containers": [{"name": "h"}]}},
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu",
                    "maxReplicas": 4,
                    "numOfHosts": 2,
                    "rayStartParams": {"resources": '"{\\"provider\\": 2}"'},
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "w",
                                    "resources": {
                                        "limits": {"cpu": "7500m", "nvidia.com/gpu": 2}
                                    },
                                }
                            ]
                        }
                    },
                }
            ],
        },
    }
    head, gpu = autoscaler_node_kinds(manifest)
    assert head.resources == {"CPU": 0}
    assert gpu.resources == {"provider": 2.0, "CPU": 7, "GPU": 2.0}
    assert gpu.max_count == 8


@pytest.mark.parametrize(
    "bundle, complaint",
    [
        ({"GPU": -1}, ">= 0"),
        ({"GPU": 1.5}, "whole number"),
        ({"CPU": float("nan")}, "finite"),
    ],
)
def test_malformed_requests_are_config_errors(bundle, complaint):
    with pytest.raises(ConfigError, match=complaint):
        ResourceRequest((bundle,))


def test_live_cluster_refuses_eight_gpus_unless_its_autoscaler_could_grow(
    ray_cluster, add_provider
):
    add_provider("lab-solo", num_gpus=1)
    ray_cluster.wait_for_nodes()
    kinds = require_resources([{"GPU": 1}], what="one GPU", autoscaler_config={})
    names = {k.name for k in alive_node_kinds()}
    assert "lab-solo" in names and {k.name for k in kinds} == names
    with pytest.raises(UnsatisfiableResources) as info:
        require_resources([{"GPU": 8}], what="eight GPUs", autoscaler_config={})
    assert "8 GPU, the most any node offers is 1 (lab-solo)" in str(info.value)

    config = {
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 2}, "node_config": {}},
            "big": {"max_workers": 1, "resources": {"GPU": 8}, "node_config": {}},
        },
    }
    kinds = require_resources([{"GPU": 8}], autoscaler_config=config)
    assert any(k.source == "autoscaler" and k.name == "big" for k in kinds)
