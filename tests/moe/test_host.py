"""The checkpoint store and the expert hosts (on the session's Ray cluster)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysys.models.hf import Checkpoint, save_model
from raysys.moe.engine import PRETRAINED
from raysys.moe.host import (
    ExpertFetchError,
    ExpertHost,
    ExpertHostPool,
    pack_expert,
    shard_experts,
    unpack_expert,
)
from raysys.moe.store import ExpertCheckpointStore
from raysys.runtime.errors import ConfigError

TARGET = PRETRAINED / "target"


def test_store_reads_single_experts_like_the_checkpoint():
    reference = Checkpoint(TARGET)
    for uri in (str(TARGET), TARGET.resolve().as_uri()):
        store = ExpertCheckpointStore(uri)
        for layer, expert in [(0, 0), (2, 5), (3, 7)]:
            got = store.read_expert(layer, expert)
            want = reference.read_expert(layer, expert)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    c = store.config
    assert store.expert_nbytes == 3 * c.hidden_size * c.intermediate_size * 2


def test_store_reads_sharded_checkpoints(tmp_path, pair):
    _, target = pair
    save_model(target, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    store = ExpertCheckpointStore(tmp_path)
    got = store.read_expert(1, 3)
    assert torch.equal(got.w2, target.expert_weights(1, 3).w2)


def test_store_refuses_what_it_cannot_serve(tmp_path, pair):
    with pytest.raises(ConfigError, match="holds no config.json"):
        ExpertCheckpointStore(tmp_path)
    save_model(pair[0], tmp_path / "dense")
    with pytest.raises(ConfigError, match="need a Mixtral"):
        ExpertCheckpointStore(tmp_path / "dense")
    broken = tmp_path / "broken"
    shutil.copytree(TARGET, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match="corrupt"):
        ExpertCheckpointStore(broken)
    with pytest.raises(ConfigError, match="cannot open expert store"):
        ExpertCheckpointStore("nosuchscheme://x/y")
    config = json.loads((TARGET / "config.json").read_text())
    assert config["model_type"] == "mixtral"


def test_packing_round_trips():
    store = ExpertCheckpointStore(TARGET)
    weights = store.read_expert(1, 1)
    flat = torch.from_numpy(pack_expert(weights))
    back = unpack_expert(flat, store.config, torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(back, weights, strict=True))


def test_sharding_spreads_every_layer_over_the_hosts():
    keys = [(layer, e) for layer in range(4) for e in range(8)]
    shards = shard_experts(keys, 3)
    assert sorted(k for s in shards for k in s) == keys
    for layer in range(4):
        owners = {h for h, s in enumerate(shards) for k in s if k[0] == layer}
        assert owners == {0, 1, 2}


def test_pool_fetches_and_replaces_a_killed_host(ray_cluster):
    store = ExpertCheckpointStore(TARGET)
    pool = ExpertHostPool(str(TARGET), store.config, num_hosts=2, timeout_s=60)
    try:
        info = pool.host_info()
        num_experts = store.config.num_hidden_layers * store.config.num_local_experts
        assert sum(i["num_experts"] for i in info) == num_experts
        assert sum(i["nbytes"] for i in info) == num_experts * store.expert_nbytes
        key = (2, 3)
        first = pool.fetch(key)
        want = store.read_expert(*key)
        assert torch.equal(first.weights.w3, want.w3.float())
        pid = pool.host_info()[pool.host_of[key]]["pid"]
        pool.kill(pool.host_of[key])
        again = pool.fetch(key)  # the dead host is replaced from the store
        assert torch.equal(again.weights.w1, want.w1.float())
        assert pool.num_replacements[pool.host_of[key]] == 1
        assert pool.host_info()[pool.host_of[key]]["pid"] != pid
    finally:
        pool.close()


def test_pool_reports_a_host_that_cannot_load_its_shard(ray_cluster, tmp_path):
    config = ExpertCheckpointStore(TARGET).config
    with pytest.raises(ExpertFetchError, match="expert host 0 of 1 did not start"):
        ExpertHostPool(str(tmp_path / "gone"), config, num_hosts=1, timeout_s=60)


@ray.remote(num_cpus=0)
class _HostThatDiesStarting:
    """Stands in for a host placed on a node that goes away while it starts."""

    def expert_refs(self) -> None:
        os._exit(1)


class _PoolWithOneDeadStart(ExpertHostPool):
    def _start(self, host_idx: int):
        if host_idx == 1 and not getattr(self, "_died_once", False):
            self._died_once = True
            return _HostThatDiesStarting.remote()
        return super()._start(host_idx)


def test_a_host_that_dies_while_starting_is_started_again(ray_cluster):
    store = ExpertCheckpointStore(TARGET)
    pool = _PoolWithOneDeadStart(str(TARGET), store.config, num_hosts=2, timeout_s=60)
    try:
        assert pool.num_replacements == [0, 1]
        key = pool.shards[1][0]
        got = pool.fetch(key)
        assert torch.equal(got.weights.w2, store.read_expert(*key).w2.float())
    finally:
        pool.close()


def _store_with(tmp_path, edit) -> str:
    # A copy of the bundled target whose tensors ``edit`` changes in place.
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "store"
    shutil.copytree(TARGET, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


EXPERT = "model.layers.2.block_sparse_moe.experts.5."


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # Same bytes as the right matrix: it would be served as a wrong expert.
        (
            lambda t: t.__setitem__(
                EXPERT + "w1.weight", t[EXPERT + "w1.weight"].T.contiguous()
            ),
            r"experts.5.w1.weight has shape \[64, 192\], the config needs \[192, 64\]",
        ),
        (
            lambda t: t.pop(EXPERT + "w3.weight"),
            "holds no tensor model.layers.2.block_sparse_moe.experts.5.w3.weight",
        ),
        (
            lambda t: t.pop("model.layers.0.block_sparse_moe.experts.0.w1.weight"),
            "holds no tensor model.layers.0.block_sparse_moe.experts.0.w1.weight",
        ),
    ],
)
def test_store_refuses_missing_or_misshapen_experts_when_opened(
    tmp_path, edit, message
):
    with pytest.raises(ConfigError, match=message):
        ExpertCheckpointStore(_store_with(tmp_path, edit))


def test_store_refuses_truncated_files_and_bad_config_json(tmp_path):
    folder = tmp_path / "store"
    shutil.copytree(TARGET, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="beyond the file's .* file is truncated"):
        ExpertCheckpointStore(folder)
    (folder / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(ConfigError, match="1 bytes, too short for a safetensors"):
        ExpertCheckpointStore(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json holds a list, not a JSON"):
        ExpertCheckpointStore(folder)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        ExpertCheckpointStore(folder)


def test_a_replacement_that_cannot_load_its_shard_fails_at_once(ray_cluster, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(TARGET, store)
    config = ExpertCheckpointStore(store).config
    pool = ExpertHostPool(str(store), config, num_hosts=1, timeout_s=60)
    try:
        shutil.rmtree(store)  # the store went away while the host served
        pool.kill(0)
        with pytest.raises(
            ExpertFetchError, match="could not load its shard from .*no config.json"
        ):
            pool.fetch((0, 0))
        assert pool.num_replacements == [1]  # not retried max_replacements times
    finally:
        pool.close()


class _PoolStartingOn(ExpertHostPool):
    """Starts its hosts on one node while that node lives; Ray places the rest."""

    def __init__(self, node_id: str, *args, **kwargs) -> None:
        self.node_id = node_id
        super().__init__(*args, **kwargs)

    def _start(self, host_idx: int):
        alive = any(n["NodeID"] == self.node_id and n["Alive"] for n in ray.nodes())
        where = (
            NodeAffinitySchedulingStrategy(self.node_id, soft=False)
            if alive
            else "SPREAD"
        )
        return ExpertHost.options(scheduling_strategy=where).remote(
            self.store_uri, self.shards[host_idx], host_idx
        )


def test_experts_of_a_host_on_another_node_arrive_and_survive_its_node(
    ray_cluster, add_provider
):
    """Gets pull experts from another node; when it goes, its host is replaced."""
    node = add_provider("moe-host-node", num_gpus=0.0)
    store = ExpertCheckpointStore(TARGET)
    pool = _PoolStartingOn(
        node.node_id, str(TARGET), store.config, num_hosts=2, timeout_s=60
    )
    try:
        here = ray.get_runtime_context().get_node_id()
        placed = [i["node_id"] for i in pool.host_info()]
        assert placed == [node.node_id, node.node_id] and node.node_id != here
        host_idx = 1
        *pulled, unpulled = pool.shards[host_idx]
        for key in pulled:  # copied into this node's object store
            got = pool.fetch(key)
            assert torch.equal(got.weights.w1, store.read_expert(*key).w1.float())
        ray_cluster.remove_node(node)
        # Until Ray marks the node dead, it could still take the replacement.
        deadline = time.monotonic() + 60
        while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, "the removed node never died"
            time.sleep(0.2)
        # Never fetched, so only its dead owner had it: the get fails now that
        # Ray knows the node is gone, and a replacement host serves it.
        got = pool.fetch(unpulled)
        assert torch.equal(got.weights.w2, store.read_expert(*unpulled).w2.float())
        assert pool.num_replacements[host_idx] == 1
        info = ray.get(pool.hosts[host_idx].info.remote(), timeout=60)
        assert info["node_id"] not in (node.node_id, None)
        got = pool.fetch(pulled[0])  # from the replacement
        assert torch.equal(got.weights.w3, store.read_expert(*pulled[0]).w3.float())
    finally:
        pool.close()
