"""The runner actor restores committed state and reports tenant failures."""

from __future__ import annotations

import time

import pytest
import ray

from raysys.sharing.examples import Counter, FailsAtStep
from raysys.sharing.runner import RemoteRunner
from raysys.sharing.store import CheckpointStore
from raysys.sharing.workload import WorkloadSpec

pytestmark = pytest.mark.slow


def spec(name: str, num_steps: int, every: int = 5) -> dict:
    return WorkloadSpec(
        tenant="alice",
        name=name,
        gpus=0.5,
        num_steps=num_steps,
        checkpoint={"every_steps": every},
    ).model_dump(mode="json")


def run_to_end(runner, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = ray.get(runner.poll.remote(), timeout=10)
        if (
            answer["state"] in ("done", "failed", "stopped")
            or time.monotonic() > deadline
        ):
            return answer
        time.sleep(0.1)


def test_restarted_runner_resumes_from_the_checkpoint_not_the_constructor(
    ray_cluster, tmp_path
):
    store = CheckpointStore(str(tmp_path))
    # A committed state no constructor call could produce: value 1000 at step 7.
    store.tenant("alice").save(
        "count", 7, {"value": 1000, "num_steps": 7}, incarnation=0
    )
    store.set_fence("alice", "count", 1)
    runner = RemoteRunner.options(num_gpus=0).remote(
        spec("count", 20),
        Counter,
        (),
        {"start": 0, "increment": 3},
        str(tmp_path),
        3,
        1,
    )
    try:
        info = ray.get(runner.start.remote(), timeout=60)
        assert info["ok"] and info["from_checkpoint"]
        assert info["resumed_step"] == 7
        assert info["checkpoint_id"] == "ckpt-000000000007-0000"
        answer = run_to_end(runner)
        assert answer["state"] == "done" and answer["step"] == 20
        assert answer["steps_run"] == 13  # only the steps after the checkpoint
    finally:
        ray.kill(runner)
    final = store.tenant("alice").latest("count")
    assert final.step == 20 and final.metadata["final"] is True
    assert final.state == {"value": 1000 + 13 * 3, "num_steps": 20}


def test_checkpoint_and_stop_commits_the_current_step(ray_cluster, tmp_path):
    runner = RemoteRunner.options(num_gpus=0).remote(
        spec("slow", 10_000, every=1000),
        Counter,
        (),
        {"step_delay_s": 0.01},
        str(tmp_path),
        3,
        0,
    )
    try:
        assert ray.get(runner.start.remote(), timeout=60)["resumed_step"] == 0
        # Stop once it has run a step, however slowly the machine runs it.
        deadline = time.monotonic() + 30.0
        while ray.get(runner.poll.remote(), timeout=10)["step"] < 1:
            assert time.monotonic() < deadline, "the runner ran no step in 30 s"
            time.sleep(0.05)
        answer = ray.get(runner.checkpoint_and_stop.remote(10.0), timeout=20)
    finally:
        ray.kill(runner)
    assert answer["state"] == "stopped" and 0 < answer["step"] < 1000
    assert answer["last_checkpoint_step"] == answer["step"]
    saved = CheckpointStore(str(tmp_path)).tenant("alice").latest("slow")
    assert saved.step == answer["step"] and saved.state["value"] == answer["step"]


def test_a_raising_step_is_reported_as_failed(ray_cluster, tmp_path):
    runner = RemoteRunner.options(num_gpus=0).remote(
        spec("bad", 50), FailsAtStep, (), {"fail_at": 4}, str(tmp_path), 3, 0
    )
    try:
        assert ray.get(runner.start.remote(), timeout=60)["ok"]
        answer = run_to_end(runner)
    finally:
        ray.kill(runner)
    assert answer["state"] == "failed" and answer["step"] == 3
    assert "RuntimeError: deliberate failure at step 4" in answer["error"]


def test_a_stop_whose_bound_ran_out_can_be_asked_again(ray_cluster, tmp_path):
    runner = RemoteRunner.options(num_gpus=0).remote(
        spec("long", 10_000, every=1000),
        Counter,
        (),
        {"step_delay_s": 4.0},
        str(tmp_path),
        3,
        0,
    )
    try:
        assert ray.get(runner.start.remote(), timeout=60)["resumed_step"] == 0
        # A step takes 4 s: a 0.1 s bound runs out while it runs.
        first = ray.get(runner.checkpoint_and_stop.remote(0.1), timeout=20)
        again = ray.get(runner.checkpoint_and_stop.remote(30.0), timeout=40)
    finally:
        ray.kill(runner)
    assert first["state"] == "stopping" and first["step"] == 0
    assert again["state"] == "stopped" and again["step"] == 1
    assert again["last_checkpoint_step"] == 1
    saved = CheckpointStore(str(tmp_path)).tenant("alice").latest("long")
    assert saved.step == 1 and saved.state == {"value": 1, "num_steps": 1}
