"""Checkpoint store: atomic commits, fallbacks, pruning, fences, tenant scoping."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from raysys.runtime.errors import ConfigError
from raysys.sharing import store as store_mod
from raysys.sharing.names import InvalidName
from raysys.sharing.store import (
    COMMIT_FILE,
    MANIFEST_FILE,
    TENSOR_FILE,
    CheckpointError,
    CheckpointStore,
    StaleIncarnation,
)


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(str(tmp_path / "ckpt"), keep_last=3)


def state_at(step: int) -> dict:
    return {"step": step, "w": np.full(4, step, dtype=np.float32)}


def test_latest_is_the_newest_commit_and_only_k_are_kept(store, tmp_path):
    alice = store.tenant("alice")
    for step in (0, 10, 20, 30, 40):
        alice.save("train", step, state_at(step))
    assert [c.step for c in alice.list("train")] == [20, 30, 40]
    latest = alice.latest("train")
    assert latest.step == 40 and latest.state["step"] == 40
    assert np.array_equal(latest.state["w"], np.full(4, 40, dtype=np.float32))
    dirs = sorted(p.name for p in (tmp_path / "ckpt" / "alice" / "train").iterdir())
    assert dirs == [
        "ckpt-000000000020-0000",
        "ckpt-000000000030-0000",
        "ckpt-000000000040-0000",
    ]


def test_checkpoint_torn_between_data_and_commit_is_ignored(store, monkeypatch, caplog):
    alice = store.tenant("alice")
    alice.save("train", 10, state_at(10))
    real_write = store_mod._Files.write

    def crash_at_commit(self, path, data):
        if path.endswith(COMMIT_FILE):
            raise OSError("machine lost power")
        real_write(self, path, data)

    monkeypatch.setattr(store_mod._Files, "write", crash_at_commit)
    with pytest.raises(CheckpointError, match="machine lost power"):
        alice.save("train", 20, state_at(20))
    monkeypatch.setattr(store_mod._Files, "write", real_write)

    torn = store.tenant("alice")._workload_dir("train") + "/ckpt-000000000020-0000"
    assert store_mod._Files(store._fs).exists(f"{torn}/{TENSOR_FILE}")
    assert store_mod._Files(store._fs).exists(f"{torn}/{MANIFEST_FILE}")
    with caplog.at_level(logging.WARNING, logger="raysys.sharing.store"):
        latest = alice.latest("train")
    assert latest.step == 10 and latest.state["step"] == 10
    assert "no commit marker" in caplog.text and "ckpt-000000000020-0000" in caplog.text
    assert [c.step for c in alice.list("train")] == [10]


def test_corrupt_checksum_falls_back_to_the_previous_checkpoint(
    store, tmp_path, caplog
):
    alice = store.tenant("alice")
    alice.save("train", 10, state_at(10))
    alice.save("train", 20, state_at(20))
    blob = tmp_path / "ckpt/alice/train/ckpt-000000000020-0000" / TENSOR_FILE
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor payload
    blob.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="raysys.sharing.store"):
        latest = alice.latest("train")
    assert latest.step == 10
    assert np.array_equal(latest.state["w"], np.full(4, 10, dtype=np.float32))
    assert "ckpt-000000000020-0000" in caplog.text and "sha256" in caplog.text
    with pytest.raises(CheckpointError, match="sha256"):
        alice.load("train", "ckpt-000000000020-0000")


def test_manifest_changed_after_commit_is_refused(store, tmp_path):
    alice = store.tenant("alice")
    alice.save("train", 10, state_at(10))
    alice.save("train", 20, state_at(20))
    manifest = tmp_path / "ckpt/alice/train/ckpt-000000000020-0000" / MANIFEST_FILE
    doc = json.loads(manifest.read_text())
    doc["step"] = 99
    manifest.write_text(json.dumps(doc))
    assert alice.latest("train").step == 10


def test_no_checkpoint_gives_none(store):
    assert store.tenant("alice").latest("nothing-yet") is None


def test_stale_incarnation_cannot_commit(store):
    alice = store.tenant("alice")
    alice.save("train", 10, state_at(10), incarnation=0)
    store.set_fence("alice", "train", 1)
    with pytest.raises(StaleIncarnation, match="incarnation 1 has taken over"):
        alice.save("train", 20, state_at(20), incarnation=0)
    assert alice.latest("train").step == 10
    alice.save("train", 20, state_at(20), incarnation=1)
    assert alice.latest("train").info.incarnation == 1


@pytest.mark.parametrize("bad", ["../bob", "/abs", "a/b", "..", "a\\b", ""])
def test_tenant_and_workload_names_cannot_escape(store, bad):
    with pytest.raises(InvalidName):
        store.tenant(bad)
    alice = store.tenant("alice")
    with pytest.raises(InvalidName):
        alice.save(bad, 0, {"x": 1})
    with pytest.raises(InvalidName):
        alice.latest(bad)


def test_a_tenant_cannot_see_another_tenants_checkpoints(store):
    store.tenant("bob").save("secret", 5, {"token": "bob's"})
    alice = store.tenant("alice")
    assert alice.workloads() == []
    assert alice.latest("secret") is None
    assert alice.list("secret") == []
    with pytest.raises(CheckpointError):
        alice.load("secret", "ckpt-000000000005-0000")
    with pytest.raises(CheckpointError, match="not of the form"):
        alice.load("secret", "../../bob/secret/ckpt-000000000005-0000")


def test_bad_locations_and_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unsupported scheme"):
        CheckpointStore("ftp://host/dir")
    with pytest.raises(ConfigError, match="keep_last"):
        CheckpointStore(str(tmp_path), keep_last=0)
    with pytest.raises(ConfigError, match="empty"):
        CheckpointStore("")


def test_non_finite_numpy_float_commits_a_readable_checkpoint(store):
    alice = store.tenant("alice")
    alice.save("run", 10, {"loss": np.float64("nan"), "best": np.float64("inf")})
    got = alice.latest("run")
    assert got is not None and got.step == 10
    assert np.isnan(got.state["loss"]) and got.state["best"] == float("inf")


def test_checkpoints_past_the_id_widths_are_still_found(store):
    alice = store.tenant("alice")
    alice.save("run", 5, state_at(5), incarnation=9999)
    alice.save("run", 6, state_at(6), incarnation=10_000)
    alice.save("run", 10**12, state_at(7), incarnation=10_001)
    assert [c.step for c in alice.list("run")] == [5, 6, 10**12]
    latest = alice.latest("run")
    assert latest.step == 10**12 and latest.info.incarnation == 10_001


@pytest.mark.parametrize(
    "store_value, message",
    [
        ("http://host/dir", "unsupported scheme"),
        ("", "empty"),
        ("FILE", "is a file"),
    ],
)
def test_platform_config_refuses_a_bad_store_up_front(tmp_path, store_value, message):
    from raysys.sharing.records import PlatformConfig

    if store_value == "FILE":
        store_value = str(tmp_path / "a-file")
        (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=message):
        PlatformConfig(store=store_value)


@pytest.mark.parametrize("name", ["", "two words"])
def test_platform_config_refuses_an_unusable_controller_name(tmp_path, name):
    from raysys.sharing.records import PlatformConfig

    with pytest.raises(ValueError, match="controller_name"):
        PlatformConfig(store=str(tmp_path), controller_name=name)


def test_store_on_a_path_with_spaces_and_unicode(tmp_path):
    where = tmp_path / "lab store" / "prüfung"
    alice = CheckpointStore(str(where)).tenant("alice")
    alice.save("run", 3, state_at(3))
    assert alice.latest("run").state["step"] == 3
    assert (where / "alice" / "run").is_dir()
