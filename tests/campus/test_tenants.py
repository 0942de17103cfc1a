"""The campus tenants on their own, outside the sharing platform."""

from __future__ import annotations

import pytest
import ray
import torch

from raysys.campus import tenants
from raysys.campus.tenants import MoEGeneration
from raysys.moe.host import ExpertHostPool

pytestmark = pytest.mark.slow

NUM_TOKENS = 8


@pytest.fixture
def dying_hosts(monkeypatch):
    """Make the next ``faults["left"]`` expert hosts die before they start, as a
    host placed on a provider that was just switched off does."""
    real_wait = ExpertHostPool._wait_ready
    faults = {"left": 0, "raised": 0}

    def wait_ready(self, host_idx):
        if faults["left"] > 0:
            faults["left"] -= 1
            faults["raised"] += 1
            raise ray.exceptions.ActorDiedError()
        real_wait(self, host_idx)

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


def test_moe_tenant_rebuilds_its_engine_when_expert_hosts_die(ray_cluster, dying_hosts):
    from raysys.moe.prompts import BUILTIN_PROMPTS

    tenant = MoEGeneration(prompts=BUILTIN_PROMPTS[:1], max_new_tokens=NUM_TOKENS)
    try:
        # the first engine's host dies while starting: setup builds another
        dying_hosts["left"] = 1
        tenant.setup(None)
        assert dying_hosts["raised"] == 1 and tenant.engine is not None
        # during the prompt a host dies and so does its replacement: the prompt
        # is redone on a new engine and gives the target's own greedy output
        first = tenant.engine
        first.pool.kill(0)
        dying_hosts["left"] = 1
        metrics = tenant.step()
        assert dying_hosts["raised"] == 2 and tenant.engine is not first
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
    with pytest.raises(ray.exceptions.ActorDiedError):
        tenant.setup(None)
    assert dying_hosts["raised"] == tenants.HOST_FAULT_RETRIES + 1
    assert tenant.engine is None
