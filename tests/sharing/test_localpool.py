"""The local pool a job starts for itself cleans up after itself."""

from __future__ import annotations

import os

import pytest

from raysys.sharing import localpool
from raysys.sharing.localpool import LocalPool


@pytest.fixture(autouse=True)
def _keep_the_session_connected(monkeypatch):
    # close() disconnects the driver; the test session's Ray stays connected.
    monkeypatch.setattr("ray.shutdown", lambda: None)


def test_an_own_cluster_takes_its_state_folder_with_it(tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr(localpool.local_cluster, "down", lambda: stopped.append(1))
    state = tmp_path / "raysys-pool-x"
    (state).mkdir()
    (state / "local-cluster.json").write_text("{}")
    monkeypatch.setenv("RAYSYS_STATE_DIR", str(state))
    pool = LocalPool()
    pool.own, pool.state_dir = True, str(state)
    pool._state_dir_before = "/the/users/own"
    pool.close()
    assert stopped == [1] and not state.exists()
    assert os.environ["RAYSYS_STATE_DIR"] == "/the/users/own"  # restored


def test_a_joined_cluster_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(
        localpool.local_cluster, "down", lambda: (_ for _ in ()).throw(AssertionError)
    )
    pool = LocalPool()  # joined, not started: nothing of it is ours to remove
    pool.close()
    assert pool.state_dir is None
