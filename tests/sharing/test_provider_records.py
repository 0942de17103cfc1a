"""Provider names and records without a cluster: `raysys provider join` refuses
a name a live node carries before it starts anything, and `raysys down` removes
the records of the providers it took down (and only those)."""

from __future__ import annotations

import json

import pytest
import ray

from raysys.runtime import local_cluster


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSYS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def _write_record(state_dir, name, marker):
    path = state_dir / "providers" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"address": "127.0.0.1:1", "marker": marker}))


def test_down_removes_the_records_of_its_providers_only(state_dir):
    local_cluster.write_state(
        local_cluster.ClusterState(
            cluster_id="c0ffee000001",
            gcs_address="127.0.0.1:1",
            dashboard_url="http://127.0.0.1:2",
            auth=False,
            started_at=0.0,
            nodes=[
                local_cluster.NodeRecord(
                    name="head", kind="head", marker="c0ffee000001/head"
                ),
                local_cluster.NodeRecord(
                    name="lab-a", kind="provider", marker="c0ffee000001/lab-a"
                ),
            ],
        )
    )
    _write_record(state_dir, "lab-a", "c0ffee000001/lab-a")  # in the state
    _write_record(state_dir, "lab-b", "c0ffee000001/lab-b")  # of this cluster
    _write_record(state_dir, "lab-x", "ext-1234abcd/lab-x")  # another cluster
    (state_dir / "providers" / "notes.json").write_text("[1, 2]")  # not a record

    assert local_cluster.down() is True

    assert sorted(p.name for p in (state_dir / "providers").iterdir()) == [
        "lab-x.json",
        "notes.json",
    ]
    assert not local_cluster.state_path().exists()


def test_join_refuses_a_name_a_live_node_carries(state_dir, monkeypatch, capsys):
    from raysys.cli import main
    from raysys.sharing import cli

    _write_record(state_dir, "lab-a", "ext-1234abcd/lab-a")
    before = (state_dir / "providers" / "lab-a.json").read_text()
    node = {
        "NodeID": "9a9e8bf58ae8" + "0" * 44,
        "Alive": True,
        "Labels": {local_cluster.PROVIDER_LABEL: "lab-a"},
    }
    monkeypatch.setattr(cli, "_connect", lambda address, state: None)
    # The join disconnects when it ends; this process's driver must stay (the
    # test session shares it).
    disconnects = []
    monkeypatch.setattr(ray, "shutdown", lambda: disconnects.append(True))
    monkeypatch.setattr(
        cli, "_provider_nodes", lambda name: [node] if name == "lab-a" else []
    )

    def start(*args, **kwargs):
        raise AssertionError("a node was started under a taken name")

    monkeypatch.setattr(local_cluster, "start_provider_node", start)

    argv = ["provider", "join", "--name", "lab-a", "--gpus", "1"]
    assert main([*argv, "--address", "127.0.0.1:1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "error: provider name 'lab-a' is already in use by node 9a9e8bf58ae8 of "
        "the cluster at 127.0.0.1:1; pick another --name, or take that provider "
        "back first with `raysys provider leave --name lab-a`\n"
    )
    assert (state_dir / "providers" / "lab-a.json").read_text() == before
    assert disconnects == [True]
