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
