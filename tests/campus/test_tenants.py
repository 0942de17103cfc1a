"""The campus tenants on their own, outside the sharing platform."""

from __future__ import annotations

import pytest
import ray
import torch

from raysys.campus import tenants
from raysys.campus.tenants import MoEGeneration
from raysys.moe.host import ExpertFetchError, ExpertHostPool

pytestmark = pytest.mark.slow

NUM_TOKENS = 8


@pytest.fixture
def dying_hosts(monkeypatch):
    """Make the next ``faults["left"]`` expert hosts die before they start, as a
    host placed on a provider that was just switched off does."""
    real_wait = ExpertHostPool._wait_ready
    faults = {"left": 0, "raised": 0}

    def wait_ready(self, host_idx, *args, **kwargs):
        if faults["left"] > 0:
            faults["left"] -= 1
            faults["raised"] += 1
            raise ray.exceptions.ActorDiedError()
        real_wait(self, host_idx, *args, **kwargs)

    monkeypatch.setattr(ExpertHostPool, "_wait_ready", wait_ready)
    monkeypatch.setattr(tenants, "HOST_FAULT_WAIT_S", 0.0)
    return faults


def _greedy(prompt: str) -> list[int]:
    from raysys.models.hf import load_model
    from raysys.models.llama import greedy_generate
    from raysys.models.tokenizer import ByteTokenizer
    from raysys.moe.engine import PRETRAINED

    target = load_model(PRETRAINED / "target", dtype=torch.float32)
    return greedy_generate(target, ByteTokenizer().encode(prompt), NUM_TOKENS)


def test_moe_tenant_survives_expert_hosts_dying_while_they_start(
    ray_cluster, dying_hosts
):
    from raysys.moe.prompts import BUILTIN_PROMPTS

    tenant = MoEGeneration(prompts=BUILTIN_PROMPTS[:1], max_new_tokens=NUM_TOKENS)
    try:
        # the first engine's host dies while starting: the pool starts it again
        dying_hosts["left"] = 1
        tenant.setup(None)
        assert dying_hosts["raised"] == 1 and tenant.engine is not None
        assert tenant.engine.pool.num_replacements[0] == 1
        # during the prompt a host dies and so does its replacement: the pool
        # replaces it once more and the prompt gives the target's own output
        first = tenant.engine
        first.pool.kill(0)
        dying_hosts["left"] = 1
        metrics = tenant.step()
        assert dying_hosts["raised"] == 2 and tenant.engine is first
        # (the faked death leaves that replacement serving, so no third one)
        assert first.pool.num_replacements[0] == 2
    finally:
        tenant._close_engine()
    assert metrics["prompts_done"] == 1.0
    (report,) = tenant.reports
    (output,) = report["outputs"]
    assert output["token_ids"] == _greedy(BUILTIN_PROMPTS[0])


def test_moe_tenant_gives_up_after_its_rebuilds(ray_cluster, dying_hosts):
    from raysys.moe.prompts import BUILTIN_PROMPTS

    tenant = MoEGeneration(prompts=BUILTIN_PROMPTS[:1], max_new_tokens=NUM_TOKENS)
    dying_hosts["left"] = 10**6
    with pytest.raises(ExpertFetchError, match="replaced 5 times"):
        tenant.setup(None)
    # every engine build starts host 0 once and replaces it 5 times; the
    # tenant builds 1 + HOST_FAULT_RETRIES engines
    assert dying_hosts["raised"] == (tenants.HOST_FAULT_RETRIES + 1) * 6
    assert tenant.engine is None


def test_serving_flip_times_are_when_the_flips_happened(ray_cluster, monkeypatch):
    # A flip's time counts from the front's own clock, which starts once its
    # instances are up; the tenant's wall-clock times must not run early by
    # that start-up.
    import time

    import raysys.serving.front as front_module
    from raysys.campus.tenants import ServingFleet
    from raysys.serving.trace import Trace, TraceRequest

    seen = []
    carry_out, replay = (
        front_module.ServingFront._carry_out,
        front_module.ServingFront.replay,
    )

    def carry_and_note(self, flip):
        if flip is not None:
            seen.append(time.time())
        return carry_out(self, flip)

    def flip_first(self, *args, **kwargs):  # an operator flip: the same path
        self.flip(0, "decode" if self.roles[0].value == "prefill" else "prefill")
        return replay(self, *args, **kwargs)

    monkeypatch.setattr(front_module.ServingFront, "_carry_out", carry_and_note)
    monkeypatch.setattr(front_module.ServingFront, "replay", flip_first)
    fleet = ServingFleet(
        num_requests=4, window=4, instances=2, context_tokens=64,
        instance_cpus=0.25, rate_scale=4.0, check_outputs=False,
    )  # fmt: skip
    fleet.trace = Trace(
        name="t", requests=[TraceRequest(i, 0.2 * i, 10, 4) for i in range(4)]
    )
    fleet.step()
    assert len(fleet.flips) == len(seen) == 1
    assert fleet.flips[0]["wall_time"] == pytest.approx(seen[0], abs=0.1)
