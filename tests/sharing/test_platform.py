"""The platform on a Ray cluster: providers leave with and without notice, every
tenant finishes with the state a fault-free run reaches."""

from __future__ import annotations

import time
import uuid

import pytest
import ray
import torch

from raysys.runtime.errors import RemoteTimeout, UnsatisfiableResources
from raysys.sharing import SharingClient, WorkloadSpec
from raysys.sharing.controller import WorkloadUnavailable
from raysys.sharing.examples import Counter, FailsAtStep, TinyTrainer, run_reference

pytestmark = pytest.mark.slow

NUM_STEPS = 300
INTERVAL = 10
STEP_DELAY_S = 0.08
# Bounds of this test's own waits (the platform's are in its config).
PHASE_TIMEOUT_S = 240.0
# The platform's bounds on its own remote calls in these tests.
START_TIMEOUT_S = 150.0
POLL_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 20.0


def start_platform(tmp_path, **overrides) -> SharingClient:
    settings = dict(
        store=str(tmp_path / "checkpoints"),
        controller_name=f"sharing-test-{uuid.uuid4().hex[:8]}",
        poll_interval_s=0.2,
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=5.0,
        start_timeout_s=START_TIMEOUT_S,
        poll_timeout_s=POLL_TIMEOUT_S,
        stop_timeout_s=STOP_TIMEOUT_S,
    )
    settings.update(overrides)
    return SharingClient.start(**settings)


def wait_until(client, predicate, what: str, timeout_s: float = PHASE_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status()
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            states = {
                w.workload_id: (w.state, w.provider, w.step) for w in status.workloads
            }
            raise AssertionError(f"timed out waiting for {what}: {states}")
        time.sleep(0.2)


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def test_six_workloads_survive_a_drain_and_a_kill(ray_cluster, add_provider, tmp_path):
    nodes = {
        name: add_provider(name, num_gpus=2) for name in ("lab-a", "lab-b", "lab-c")
    }
    client = start_platform(tmp_path)
    try:
        client.wait_for_providers(3, timeout_s=60)
        counters = {f"count-{i}": dict(start=10 * i, increment=i + 1) for i in range(4)}
        trainers = {f"train-{i}": dict(seed=i) for i in range(2)}
        checkpoint = {"every_steps": INTERVAL}
        wids = []
        for name, kwargs in counters.items():
            spec = WorkloadSpec(
                tenant="lab-x",
                name=name,
                gpus=0.25,
                num_steps=NUM_STEPS,
                checkpoint=checkpoint,
            )
            wids.append(
                client.submit(Counter, spec, step_delay_s=STEP_DELAY_S, **kwargs)
            )
        for name, kwargs in trainers.items():
            spec = WorkloadSpec(
                tenant="lab-y",
                name=name,
                gpus=0.5,
                kind="interactive",
                num_steps=NUM_STEPS,
                checkpoint=checkpoint,
            )
            wids.append(
                client.submit(TinyTrainer, spec, step_delay_s=STEP_DELAY_S, **kwargs)
            )

        # Phase 1: all six run; best fit packs them onto one provider.
        status = wait_until(
            client,
            lambda s: all(w.state == "running" and w.step >= 15 for w in s.workloads),
            "all six running",
        )
        busiest = max(status.providers, key=lambda p: len(p.tenants))
        assert len(busiest.tenants) == 6 and busiest.gpus_in_use == pytest.approx(2.0)

        # Phase 2: its owner leaves with a 30 s deadline (Ray drain).
        drained = busiest.name
        deadline_s = 30.0
        wish = client.leave(drained, deadline_s=deadline_s)
        assert wish["leave"] and wish["deadline_at"] > time.time()
        status = wait_until(
            client,
            lambda s: all(
                w.state in ("running", "done")
                and w.provider != drained
                and w.restarts >= 1
                for w in s.workloads
            ),
            "every tenant moved off the drained provider",
        )
        left = next(p for p in status.providers if p.name == drained)
        assert left.tenants == [] and left.phase in ("draining", "gone")
        # The drained node goes away by Ray's drain, within its deadline.
        drained_node = nodes[drained].node_id
        t0 = time.monotonic()
        while node_alive(drained_node) and time.monotonic() - t0 < deadline_s + 10:
            time.sleep(0.5)
        assert not node_alive(drained_node)

        # Phase 3: the provider that took them in vanishes without warning.
        status = wait_until(
            client,
            lambda s: all(
                w.state == "done"
                or (w.state == "running" and w.step >= w.last_checkpoint_step + 3)
                for w in s.workloads
            ),
            "tenants making progress after the move",
        )
        receivers = [p for p in status.providers if p.phase == "active" and p.tenants]
        victim = max(receivers, key=lambda p: len(p.tenants))
        victims = set(victim.tenants)
        ray_cluster.remove_node(nodes[victim.name], allow_graceful=False)

        final = client.wait(wids, timeout_s=PHASE_TIMEOUT_S)
        status = client.status()
        results = {wid: client.result(wid) for wid in wids}
    finally:
        client.shutdown()

    assert {w.state for w in final.values()} == {"done"}

    # Final states equal a fault-free run (computed here, in-process).
    for name, kwargs in counters.items():
        state = results[f"lab-x/{name}"].final_state
        assert state == {
            "value": kwargs["start"] + NUM_STEPS * kwargs["increment"],
            "num_steps": NUM_STEPS,
        }
    for name, kwargs in trainers.items():
        reference_state, reference_metrics = run_reference(
            TinyTrainer(**kwargs), NUM_STEPS
        )
        result = results[f"lab-y/{name}"]
        got = result.final_state
        assert got["num_steps"] == NUM_STEPS
        for key, value in reference_state["model"].items():
            assert torch.equal(got["model"][key], value), key
        assert torch.equal(
            got["optimizer"]["state"][0]["exp_avg"],
            reference_state["optimizer"]["state"][0]["exp_avg"],
        )
        # The loss curve is continuous across migrations: every step's loss
        # equals the uninterrupted run's.
        assert sorted(result.metrics) == list(range(1, NUM_STEPS + 1))
        assert [result.metrics[k]["loss"] for k in range(1, NUM_STEPS + 1)] == [
            m["loss"] for m in reference_metrics
        ]

    # Every migration succeeded: graceful ones lost nothing, sudden ones at
    # most one checkpoint interval.
    migrations = status.migrations
    graceful = [m for m in migrations if m.kind == "graceful"]
    sudden = [m for m in migrations if m.kind == "sudden"]
    assert sorted(m.workload_id for m in graceful) == sorted(wids)
    assert all(m.from_provider == drained for m in graceful)
    assert sudden and {m.workload_id for m in sudden} <= victims
    assert all(m.from_provider == victim.name for m in sudden)
    for m in migrations:
        assert m.succeeded, m
        assert m.to_provider not in (None, m.from_provider)
    for m in graceful:
        assert not m.fell_back, m
        assert m.lost_steps == 0 and m.resumed_step == m.stop_step
    for m in sudden:
        assert 0 <= m.lost_steps <= INTERVAL, m
    metrics = status.metrics
    assert (
        metrics["migrations_attempted"]
        == metrics["migrations_succeeded"]
        == len(migrations)
    )

    # Every kind of remote wait the migrations need was made under the bound
    # configured for it, and none outlasted its bound. The 5 s of slack allow
    # for the controller's event loop, on two cores shared with the cluster and
    # six workloads, coming back late to a wait it has already cut off.
    waits = {wait.what: wait for wait in status.waits}
    assert {"runner start", "runner poll", "checkpoint-and-stop"} <= set(waits)
    assert waits["runner start"].bound_s == START_TIMEOUT_S
    assert waits["runner poll"].bound_s == POLL_TIMEOUT_S
    # checkpoint-and-stop: the notice left (at most the stop timeout) + 2 s
    assert 2.0 < waits["checkpoint-and-stop"].bound_s <= STOP_TIMEOUT_S + 2.0
    for wait in waits.values():
        assert wait.max_s <= wait.bound_s + 5.0, wait
    assert 0 < metrics["gpu_utilization"] <= 1.0


def test_failing_and_oversized_workloads_fail_alone(
    ray_cluster, add_provider, tmp_path
):
    add_provider("lab-f", num_gpus=1)
    client = start_platform(tmp_path)
    try:
        client.wait_for_providers(1, timeout_s=60)
        with pytest.raises(UnsatisfiableResources, match="asks 4 GPUs"):
            client.submit(Counter, dict(tenant="t", name="huge", gpus=4, num_steps=5))
        bad = client.submit(
            FailsAtStep,
            dict(tenant="t", name="bad", gpus=0.25, num_steps=50),
            fail_at=6,
        )
        good = client.submit(
            Counter, dict(tenant="t", name="good", gpus=0.5, num_steps=40), increment=2
        )
        # open-ended (no num_steps): runs until cancelled
        forever = client.submit(
            Counter, dict(tenant="t", name="forever", gpus=0.25), step_delay_s=0.01
        )
        with pytest.raises(RemoteTimeout, match="have not finished"):
            client.wait([bad, good], timeout_s=0.01)
        final = client.wait([bad, good], timeout_s=PHASE_TIMEOUT_S)
        good_result = client.result(good)
        refused = client.workloads(["t/huge"])["t/huge"]
        wait_until(
            client,
            lambda s: any(w.workload_id == forever and w.step > 5 for w in s.workloads),
            "the open-ended workload running",
        )
        # a running workload's public methods can be called from outside
        assert client.call(forever, "peek") > 5
        with pytest.raises(AttributeError, match="workload contract"):
            client.call(forever, "step")
        with pytest.raises(WorkloadUnavailable, match="is done, not running"):
            client.call(good, "peek")
        assert client.cancel(forever) == "cancelled"
        cancelled = client.result(forever)
    finally:
        client.shutdown()
    assert final[bad].state == "failed"
    assert "RuntimeError: deliberate failure at step 6" in final[bad].error
    assert final[good].state == "done"
    assert good_result.final_state == {"value": 80, "num_steps": 40}
    assert refused.state == "refused" and "could never be placed" in refused.reason
    # cancel commits the state it stopped at
    assert cancelled.state == "cancelled" and cancelled.step > 5
    assert cancelled.final_state == {
        "value": cancelled.step,
        "num_steps": cancelled.step,
    }


def test_bad_calls_fail_alone_and_an_owner_can_leave_at_once(
    ray_cluster, add_provider, tmp_path
):
    from raysys.runtime.errors import ConfigError
    from raysys.sharing.names import InvalidName

    with pytest.raises(ConfigError, match="unsupported scheme"):
        SharingClient.start(store="http://host/ckpt")
    add_provider("lab-q", num_gpus=1)
    client = start_platform(tmp_path)
    try:
        client.wait_for_providers(1, timeout_s=60)
        wid = client.submit(
            Counter,
            dict(tenant="t", name="keep", gpus=0.5, checkpoint={"every_steps": 5}),
            step_delay_s=0.02,
        )
        # a second submission of a running name is a caller's error, not a
        # resource refusal, and leaves the first one running
        with pytest.raises(ConfigError, match="already submitted"):
            client.submit(Counter, dict(tenant="t", name="keep", gpus=0.5))
        with pytest.raises(ConfigError, match="unknown workload 't/nope'"):
            client.cancel("t/nope")
        with pytest.raises(ConfigError, match="unknown workload 't/nope'"):
            client.result("t/nope")
        # An empty list is answered at once, not at the end of its timeout (half
        # of which is left as slack for a busy machine).
        t0 = time.monotonic()
        assert client.wait([], timeout_s=60) == {}  # not every workload
        assert time.monotonic() - t0 < 30
        with pytest.raises(ConfigError, match="nan"):
            client.leave("lab-q", float("nan"))
        with pytest.raises(InvalidName, match="'../x'"):
            client.leave("../x", 10)
        wait_until(
            client,
            lambda s: any(
                w.workload_id == wid and (w.last_checkpoint_step or 0) >= 10
                for w in s.workloads
            ),
            "the workload running with a few commits",
        )
        # The owner leaves with notice, then changes to now: both answer (a
        # deadline of 0 used to end the agent before it replied).
        first = client.leave("lab-q", 30)
        assert client.leave("lab-q", 60) == first  # later: nothing changes
        now = client.leave("lab-q", 0)
        assert now["ends_at"] < first["ends_at"]
        status = wait_until(
            client,
            lambda s: (
                any(w.workload_id == wid and w.state == "queued" for w in s.workloads)
                and any(p.name == "lab-q" and p.phase == "gone" for p in s.providers)
            ),
            "the provider gone and its tenant back in the queue (no other provider)",
            timeout_s=60,
        )
        committed = next(w for w in status.workloads if w.workload_id == wid)
        assert client.cancel(wid) == "cancelled"
        result = client.result(wid)
    finally:
        client.shutdown()
    # nothing committed was lost on the way
    assert result.step >= committed.last_checkpoint_step >= 10
    assert result.final_state == {"value": result.step, "num_steps": result.step}
