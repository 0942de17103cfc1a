"""The controller's bookkeeping, driven in-process with stand-in runners (no
Ray actors): unknown ids, duplicates, cancels racing the end of a workload,
and an owner's repeated or graceful leave."""

from __future__ import annotations

import asyncio
import time

import pytest

from raysys.runtime.errors import ConfigError
from raysys.sharing.controller import SharingController, _Provider
from raysys.sharing.examples import Counter
from raysys.sharing.workload import WorkloadSpec


class _Method:
    def __init__(self, answer):
        self.answer = answer

    def remote(self, *args):
        async def reply():
            return self.answer

        return reply()


class StoppedRunner:
    """A runner whose checkpoint-and-stop reports ``answer``."""

    def __init__(self, answer):
        self.checkpoint_and_stop = _Method(answer)


def spec(name: str) -> dict:
    return WorkloadSpec(
        tenant="t", name=name, gpus=0.5, num_steps=3, checkpoint={"every_steps": 1}
    ).model_dump(mode="json")


@pytest.fixture
def controller(tmp_path):
    return SharingController({"store": str(tmp_path / "ckpt")})


def running(controller, name: str, answer: dict):
    controller.submit(spec(name), Counter, (), {})
    w = controller.workloads[f"t/{name}"]
    w.state, w.runner = "running", StoppedRunner(answer)
    return w


def answer(state: str, step: int, error: str | None = None) -> dict:
    return {
        "state": state,
        "step": step,
        "steps_run": step,
        "error": error,
        "last_checkpoint_step": step,
        "metrics": [],
    }


def test_cancel_of_work_that_ended_meanwhile_keeps_how_it_ended(controller):
    done = running(controller, "done", answer("done", 3))
    failed = running(controller, "failed", answer("failed", 2, "ValueError: boom"))
    stopped = running(controller, "stopped", answer("stopped", 1))
    assert asyncio.run(controller.cancel("t/done")) == "done"
    assert asyncio.run(controller.cancel("t/failed")) == "failed"
    assert asyncio.run(controller.cancel("t/stopped")) == "cancelled"
    assert done.step == 3 and failed.error == "ValueError: boom"
    assert stopped.step == 1 and stopped.last_checkpoint_step == 1
    # an ended workload keeps its state
    assert asyncio.run(controller.cancel("t/done")) == "done"


def test_unknown_ids_are_refused_and_an_empty_list_means_none(controller):
    with pytest.raises(ConfigError, match="unknown workload 't/nope'"):
        asyncio.run(controller.cancel("t/nope"))
    with pytest.raises(ConfigError, match="unknown workload 't/nope'"):
        controller.result("t/nope")
    controller.submit(spec("a"), Counter, (), {})
    assert controller.workload_states([]) == {}
    assert list(controller.workload_states(None)) == ["t/a"]


def test_a_duplicate_submission_is_flagged_and_leaves_the_first_alone(controller):
    first = controller.submit(spec("a"), Counter, (), {})
    original = controller.workloads["t/a"]
    again = controller.submit(spec("a"), Counter, (), {})
    assert first["accepted"] and not again["accepted"] and again["duplicate"]
    assert "already submitted and queued" in again["reason"]
    assert controller.workloads["t/a"] is original


def test_owner_grace_and_an_earlier_second_leave_are_honoured(controller):
    async def scenario():
        now = time.time()
        for name in ("lab-a", "lab-b"):
            controller.providers[name] = _Provider(name, f"node-{name}", 1.0, now)
            controller.policy.add_provider(name, 1.0, now=now)
        # no deadline: the owner's grace, not immediate_grace_s (10 s)
        # the wish as the agent sends it: its own clock, a little before the
        # controller sees it
        wish = {"leave": True, "deadline_at": None, "grace_s": 45.0,
                "requested_at": now - 0.5, "ends_at": now - 0.5 + 45.0}  # fmt: skip
        controller.heartbeat("lab-a", "node-lab-a", wish, now)
        a = controller.providers["lab-a"]
        assert a.phase == "draining"
        assert a.leave_deadline_at - now == pytest.approx(45.0, abs=1.0)
        # every heartbeat repeats the wish: that is no new, earlier end
        first = a.leave_deadline_at
        controller.heartbeat("lab-a", "node-lab-a", dict(wish), now + 1)
        assert a.leave_deadline_at == first

        wish = {"leave": True, "deadline_at": now + 60, "ends_at": now + 60,
                "requested_at": now}  # fmt: skip
        controller.heartbeat("lab-b", "node-lab-b", wish, now)
        b = controller.providers["lab-b"]
        # a later end changes nothing, an earlier one wins
        later = dict(wish, deadline_at=now + 90, ends_at=now + 90, requested_at=now + 1)
        controller.heartbeat("lab-b", "node-lab-b", later, now)
        assert b.leave_deadline_at == pytest.approx(now + 60)
        earlier = dict(wish, deadline_at=now + 5, ends_at=now + 5, requested_at=now + 2)
        controller.heartbeat("lab-b", "node-lab-b", earlier, now)
        assert b.leave_deadline_at == pytest.approx(now + 5)
        await controller.shutdown()

    asyncio.run(scenario())


# -- an owner's first wish arriving after Ray's drain list began the leave ----
#
# Driven through `_discover` with Ray's node list and drain list stood in, and
# the controller's clock frozen, so every deadline and bound is exact.

T0 = 1_000_000.0


class Clock:
    """Stands in for the controller's `time` module: a wall clock set by hand."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


class StoppingRunner:
    """A runner whose checkpoint-and-stop calls answer ``answers`` in turn,
    recording each bound; the first answer waits for ``gate`` when given."""

    def __init__(self, *answers: dict, gate: asyncio.Event | None = None):
        self.answers, self.gate, self.bounds = list(answers), gate, []
        self.checkpoint_and_stop = self

    def remote(self, bound: float):
        self.bounds.append(bound)
        answer = self.answers.pop(0)
        gate = self.gate if len(self.bounds) == 1 else None

        async def reply():
            if gate is not None:
                await gate.wait()
            return answer

        return reply()


@pytest.fixture
def clock(monkeypatch):
    import raysys.sharing.controller as controller_module

    clock = Clock(T0)
    monkeypatch.setattr(controller_module, "time", clock)
    return clock


def drain_list(monkeypatch, node_id: str, deadline_at: float | None) -> None:
    """Ray shows provider lab-a's node alive and draining by ``deadline_at``."""
    import ray

    import raysys.sharing.controller as controller_module
    from raysys.runtime.local_cluster import PROVIDER_LABEL

    node = {
        "NodeID": node_id,
        "Alive": True,
        "Labels": {PROVIDER_LABEL: "lab-a"},
        "Resources": {"GPU": 1.0},
    }
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    monkeypatch.setattr(
        controller_module, "draining_nodes", lambda: {node_id: deadline_at}
    )


def on_lab_a(controller, runners: dict[str, StoppingRunner], est: dict[str, float]):
    """Workloads running on provider lab-a (1 GPU), each with its stand-in runner."""
    for name in runners:
        body = WorkloadSpec(
            tenant="t", name=name, gpus=0.5, est_checkpoint_s=est[name]
        ).model_dump(mode="json")
        controller.submit(body, Counter, (), {})  # no provider yet: queued
    controller.providers["lab-a"] = _Provider("lab-a", "node-a", 1.0, T0)
    controller.policy.add_provider("lab-a", 1.0, now=T0)
    placed = controller.policy.schedule(now=T0)
    assert sorted(p.workload_id for p in placed) == sorted(f"t/{n}" for n in runners)
    for name, runner in runners.items():
        w = controller.workloads[f"t/{name}"]
        w.state, w.provider, w.runner, w.incarnation = "running", "lab-a", runner, 0
        w.step = w.max_step_seen = 4
    return controller.providers["lab-a"]


def stopped(step: int) -> dict:
    return dict(answer("stopped", step), state="stopped")


def grace_wish(requested_at: float, grace_s: float) -> dict:
    """The wish an agent sends for a leave without deadline."""
    return {"leave": True, "deadline_at": None, "grace_s": grace_s,
            "requested_at": requested_at, "ends_at": requested_at + grace_s}  # fmt: skip


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_an_owners_grace_arriving_after_a_drain_without_deadline_applies(
    controller, clock, monkeypatch
):
    async def scenario():
        # "soon" needs 15 s to checkpoint, "slow" 50 s: the drain's 10 s of
        # immediate_grace_s are too little for both, so both keep running.
        soon, slow = StoppingRunner(stopped(7)), StoppingRunner(stopped(9))
        a = on_lab_a(controller, {"soon": soon, "slow": slow}, {"soon": 15, "slow": 50})
        drain_list(monkeypatch, "node-a", None)
        controller._discover(T0)
        await settle()
        assert a.phase == "draining" and a.leave_deadline_at == T0 + 10.0
        assert soon.bounds == [] and slow.bounds == []

        # The owner's wish (45 s of grace, asked 0.5 s before the drain was
        # seen) arrives 1 s later: its end applies, and "soon" now has the
        # 44.5 s left to checkpoint and move.
        clock.now = T0 + 1.0
        wish = grace_wish(T0 - 0.5, 45.0)
        controller.heartbeat("lab-a", "node-a", wish, clock.now)
        controller.heartbeat("lab-a", "node-a", dict(wish), clock.now)  # repeated
        assert a.leave_deadline_at == T0 + 44.5
        assert a.reason == "its owner asked to leave (after Ray's drain)"
        await settle()
        assert soon.bounds == [43.5] and slow.bounds == []
        (move,) = controller.migrations
        assert (move.workload_id, move.kind, move.stop_step, move.fell_back) == (
            "t/soon",
            "graceful",
            7,
            False,
        )
        assert controller.workloads["t/soon"].state == "queued"
        assert controller.workloads["t/slow"].state == "running"

        # A new wish after the first only moves the end earlier.
        later = grace_wish(T0 + 2.0, 90.0)
        controller.heartbeat("lab-a", "node-a", later, clock.now)
        assert a.leave_deadline_at == T0 + 44.5
        earlier = grace_wish(T0 + 3.0, 5.0)
        controller.heartbeat("lab-a", "node-a", earlier, clock.now)
        assert a.leave_deadline_at == T0 + 8.0
        await settle()
        assert soon.bounds == [43.5] and slow.bounds == []
        await controller.shutdown()

    asyncio.run(scenario())


def test_an_owners_first_wish_never_ends_past_the_drains_deadline(
    controller, clock, monkeypatch
):
    async def scenario():
        # Ray's drain says the node goes in 20 s; a checkpoint takes 19 s, more
        # than the 18 s the drain leaves before its safety margin.
        runner = StoppingRunner(stopped(7))
        a = on_lab_a(controller, {"c": runner}, {"c": 19})
        drain_list(monkeypatch, "node-a", T0 + 20.0)
        controller._discover(T0)
        await settle()
        assert a.leave_deadline_at == T0 + 20.0 and runner.bounds == []
        # The owner asks for 45 s of grace: the drain's deadline stands, so
        # the tenant still has too little time and waits for the end.
        controller.heartbeat("lab-a", "node-a", grace_wish(T0, 45.0), T0)
        await settle()
        assert a.leave_deadline_at == T0 + 20.0 and runner.bounds == []
        await controller.shutdown()

    asyncio.run(scenario())


def test_an_owners_first_deadline_after_a_drain_applies_earlier_too(
    controller, clock, monkeypatch
):
    async def scenario():
        runner = StoppingRunner(stopped(7))
        a = on_lab_a(controller, {"c": runner}, {"c": 5})
        drain_list(monkeypatch, "node-a", None)
        controller._discover(T0)
        await settle()
        assert runner.bounds == [10.0]  # immediate_grace_s
        wish = {"leave": True, "deadline_at": T0 + 6.0, "grace_s": 10.0,
                "requested_at": T0, "ends_at": T0 + 6.0}  # fmt: skip
        controller.heartbeat("lab-a", "node-a", wish, T0)
        assert a.leave_deadline_at == T0 + 6.0
        await settle()
        assert runner.bounds == [10.0]  # already stopped: not asked again
        await controller.shutdown()

    asyncio.run(scenario())


def test_a_stop_in_flight_uses_the_longer_end_of_the_owners_first_wish(
    controller, clock, monkeypatch
):
    async def scenario():
        # The drain (no deadline) gives the tenant immediate_grace_s to stop;
        # its step outlasts that bound, but the owner's wish has meanwhile
        # given 45 s: the stop is asked again with what that leaves.
        gate = asyncio.Event()
        runner = StoppingRunner(answer("stopping", 5), stopped(6), gate=gate)
        on_lab_a(controller, {"c": runner}, {"c": 5})
        drain_list(monkeypatch, "node-a", None)
        controller._discover(T0)
        await settle()
        assert runner.bounds == [10.0]
        controller.heartbeat("lab-a", "node-a", grace_wish(T0, 45.0), T0)
        gate.set()
        await settle()
        # 45 s left less the 2 s safety margin
        assert runner.bounds == [10.0, 43.0]
        (move,) = controller.migrations
        assert (move.stop_step, move.fell_back, move.note) == (6, False, "")
        assert controller.workloads["t/c"].state == "queued"
        await controller.shutdown()

    asyncio.run(scenario())


def test_the_agents_own_drain_for_a_grace_keeps_the_owners_grace(
    controller, clock, monkeypatch
):
    async def scenario():
        # The agent reads its clock (T0 + 0.0007), then drains by the end of
        # the 45 s grace, which Ray keeps in whole milliseconds: T0 + 45.000,
        # just before the wish's end. That is the same end, still a grace: the
        # tenant gets the 45 s (no safety margin) as when the wish comes first.
        runner = StoppingRunner(stopped(7))
        a = on_lab_a(controller, {"c": runner}, {"c": 44})
        drain_list(monkeypatch, "node-a", T0 + 45.0)
        controller._discover(T0)
        await settle()
        assert runner.bounds == []  # 43 s before the margin: too little
        controller.heartbeat("lab-a", "node-a", grace_wish(T0 + 0.0007, 45.0), T0)
        assert a.leave_deadline_at == T0 + 45.0  # never past the drain's
        await settle()
        assert runner.bounds == [45.0]
        (move,) = controller.migrations
        assert (move.kind, move.stop_step, move.fell_back) == ("graceful", 7, False)
        await controller.shutdown()

    asyncio.run(scenario())
