"""The deadline an owner's leave puts in Ray's drain list, on the session
cluster: the controller caps an owner's end at a drain's deadline when the
drain is seen before the owner's wish, so the drain must carry the real end."""

from __future__ import annotations

import time

import pytest
import ray

from raysys.sharing.agent import ensure_agent
from raysys.sharing.drain import draining_nodes

pytestmark = pytest.mark.slow


def test_a_leave_without_deadline_drains_by_the_end_of_its_grace(add_provider):
    node = add_provider("lab-g", num_gpus=1)
    agent = ensure_agent("lab-g", node.node_id, controller_name="raysys-no-such")
    try:
        wish = ray.get(agent.leave.remote(None, 30.0), timeout=60)
        assert wish["deadline_at"] is None and wish["grace_s"] == 30.0
        assert wish["ends_at"] == wish["requested_at"] + 30.0
        drained = draining_nodes()[node.node_id]
        # Ray keeps the deadline in whole milliseconds, taken just after the wish.
        assert wish["ends_at"] - 0.001 <= drained <= wish["ends_at"] + 5.0
        assert drained > time.time() + 20.0  # not "now"
    finally:
        ray.kill(agent, no_restart=True)
