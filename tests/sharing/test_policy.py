"""Placement and migration policies, driven with hand-built states (no Ray)."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from raysys.runtime.errors import ConfigError
from raysys.sharing.policy import (
    MigrationAction,
    MigrationPolicy,
    Placement,
    PlacementPolicy,
    ProviderState,
    Queued,
    Refusal,
    Request,
)
from raysys.sharing.workload import WorkloadKind, WorkloadSpec

BATCH, INTERACTIVE = WorkloadKind.BATCH, WorkloadKind.INTERACTIVE


def req(wid, gpus, kind=BATCH, group=None, est=5.0):
    return Request(wid, gpus, kind, group, est)


def test_interactive_work_jumps_the_batch_queue():
    policy = PlacementPolicy()
    policy.add_provider("lab-a", 1)
    policy.submit(req("b1", 1), now=0)
    assert [p.workload_id for p in policy.schedule(now=0)] == ["b1"]
    policy.submit(req("b2", 1), now=1)
    policy.submit(req("b3", 1), now=2)
    policy.submit(req("i1", 1, INTERACTIVE), now=3)
    assert policy.schedule(now=3) == []
    assert [e.workload_id for e in policy.queue(now=3)] == ["i1", "b2", "b3"]
    policy.finish("b1")
    placed = policy.schedule(now=4)
    assert [p.workload_id for p in placed] == ["i1"]
    assert [e.workload_id for e in policy.queue(now=4)] == ["b2", "b3"]


def test_waiting_work_shows_why():
    policy = PlacementPolicy()
    policy.add_provider("lab-a", 1)
    policy.submit(req("a", 0.7), now=0)
    policy.submit(req("b", 0.5), now=0)
    policy.schedule(now=0)
    (entry,) = policy.queue(now=1)
    assert entry.workload_id == "b"
    assert "0.30" in entry.reason and "needs 0.5 GPUs" in entry.reason


def test_fractions_go_to_the_best_fitting_gpu():
    policy = PlacementPolicy()
    policy.add_provider("lab-a", 2)
    policy.add_provider("lab-b", 1)
    slots = {}
    for wid, gpus in [("w1", 0.5), ("w2", 0.3), ("w3", 0.6), ("w4", 0.2), ("w5", 0.4)]:
        policy.submit(req(wid, gpus), now=0)
        (placed,) = policy.schedule(now=0)
        slots[wid] = (placed.provider, placed.gpu_slots)
    # w1 opens the whole GPU of the provider with the fewest whole GPUs free
    assert slots["w1"] == ("lab-b", (0,))
    # w2 fits in the 0.5 left on lab-b; w3 needs a fresh GPU; w4 takes the exact
    # 0.2 left on lab-b; w5 takes lab-a GPU 0 where 0.4 is left
    assert slots["w2"] == ("lab-b", (0,))
    assert slots["w3"] == ("lab-a", (0,))
    assert slots["w4"] == ("lab-b", (0,))
    assert slots["w5"] == ("lab-a", (0,))
    assert policy.gpus_in_use == pytest.approx(2.0)


def test_whole_gpus_go_to_the_smallest_provider_that_holds_them():
    policy = PlacementPolicy()
    for name, gpus in [("big", 8), ("mid", 4), ("small", 2)]:
        policy.add_provider(name, gpus)
    policy.submit(req("two", 2), now=0)
    policy.submit(req("three", 3), now=0)
    placed = {p.workload_id: p for p in policy.schedule(now=0)}
    assert placed["two"].provider == "small" and placed["two"].gpu_slots == (0, 1)
    assert placed["three"].provider == "mid"


def _reference_fit(free, gpus):
    """Brute force of the stated rule over {provider: [free units per GPU]}."""
    units = round(gpus * 10_000)
    whole_free = {p: sum(1 for f in fs if f == 10_000) for p, fs in free.items()}
    if gpus < 1:
        partial = [
            (f, p, s)
            for p, fs in free.items()
            for s, f in enumerate(fs)
            if units <= f < 10_000
        ]
        if partial:
            f, p, s = min(partial)
            return p, (s,)
        candidates = sorted((n, p) for p, n in whole_free.items() if n >= 1)
        if not candidates:
            return None
        p = candidates[0][1]
        return p, (free[p].index(10_000),)
    k = int(gpus)
    candidates = sorted((n, p) for p, n in whole_free.items() if n >= k)
    if not candidates:
        return None
    p = candidates[0][1]
    return p, tuple(s for s, f in enumerate(free[p]) if f == 10_000)[:k]


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_matches_a_brute_force_reference(seed):
    rng = random.Random(seed)
    policy = PlacementPolicy()
    free = {}
    for i in range(6):
        gpus = rng.choice([1, 2, 4])
        policy.add_provider(f"p{i}", gpus)
        free[f"p{i}"] = [10_000] * gpus
    running = {}
    for n in range(300):
        if running and rng.random() < 0.4:
            wid = rng.choice(sorted(running))
            p, slots, units = running.pop(wid)
            for s in slots:
                free[p][s] += units
            policy.finish(wid)
            policy.schedule(now=n)
            # anything queued was placed above; keep the mirror in sync
            continue
        gpus = rng.choice([0.1, 0.25, 0.3, 0.5, 0.75, 1, 2, 4])
        expected = _reference_fit(free, gpus)
        wid = f"w{n}"
        policy.submit(req(wid, gpus), now=n)
        placed = policy.schedule(now=n)
        if expected is None:
            assert placed == []
            policy.finish(wid)  # withdraw it so the mirror stays exact
            continue
        assert [(p.provider, p.gpu_slots) for p in placed] == [expected]
        units = 10_000 if gpus >= 1 else round(gpus * 10_000)
        for s in expected[1]:
            free[expected[0]][s] -= units
        running[wid] = (expected[0], expected[1], units)


def test_work_that_can_never_fit_is_refused():
    policy = PlacementPolicy()
    policy.add_provider("lab-a", 2)
    policy.add_provider("lab-b", 4)
    decision = policy.submit(req("huge", 8), now=0)
    assert isinstance(decision, Refusal)
    assert "asks 8 GPUs" in decision.reason and "at most 4" in decision.reason
    assert policy.queue(now=0) == []
    capped = PlacementPolicy(max_provider_gpus=16)
    capped.add_provider("lab-a", 2)
    assert isinstance(capped.submit(req("huge", 8), now=0), Queued)


@pytest.mark.parametrize("gpus", [0, -1, 1.5, 0.00001])
def test_invalid_gpu_needs_are_refused(gpus):
    policy = PlacementPolicy()
    with pytest.raises(ConfigError):
        policy.submit(req("x", gpus), now=0)


def test_owner_reclaim_evacuates_every_tenant_and_takes_no_new_work():
    policy = PlacementPolicy()
    policy.add_provider("lab-a", 2)
    policy.add_provider("lab-b", 2)
    for wid, gpus in [("t1", 0.5), ("t2", 0.5), ("t3", 1), ("t4", 2)]:
        policy.submit(req(wid, gpus), now=0)
    placed = {p.workload_id: p.provider for p in policy.schedule(now=0)}
    on_a = sorted(w for w, p in placed.items() if p == "lab-a")
    assert on_a  # best fit put something there
    evacuations = policy.reclaim("lab-a", now=1, deadline_s=30)
    assert sorted(e.workload_id for e in evacuations) == on_a
    assert all(e.action is MigrationAction.CHECKPOINT_AND_MOVE for e in evacuations)
    assert all(e.graceful and e.provider == "lab-a" for e in evacuations)
    assert policy.provider_state("lab-a") is ProviderState.DRAINING
    # nothing new lands on a provider whose owner reclaims it
    policy.submit(req("late", 0.1), now=2)
    late = policy.schedule(now=2)
    assert all(p.provider != "lab-a" for p in late)
    for e in evacuations:
        policy.requeue(e.workload_id, now=3, reason="checkpointed")
    assert policy.tenants_of("lab-a") == ()
    assert policy.provider_gone("lab-a", now=4, reason="drained") == []
    assert policy.gpus_lent == pytest.approx(2)


def test_reclaim_without_enough_notice_resumes_from_the_last_checkpoint():
    policy = PlacementPolicy(migration=MigrationPolicy(safety_margin_s=1.0))
    policy.add_provider("lab-a", 1)
    policy.submit(req("slow", 1, est=20.0), now=0)
    policy.schedule(now=0)
    (ev,) = policy.reclaim("lab-a", now=1, deadline_s=10)
    assert ev.action is MigrationAction.RESUME_FROM_LAST
    assert ev.time_left_s == pytest.approx(9.0)
    assert "less than the 20.0 s" in ev.reason


def test_sudden_loss_frees_the_gpus_and_requeue_keeps_priority():
    policy = PlacementPolicy()
    policy.add_provider("lab-a", 1)
    policy.submit(req("old", 1), now=0)
    policy.schedule(now=0)
    policy.submit(req("new", 1), now=1)
    (ev,) = policy.provider_gone("lab-a", now=2, reason="node died")
    assert ev.workload_id == "old" and not ev.graceful
    assert ev.action is MigrationAction.RESUME_FROM_LAST
    assert policy.gpus_lent == 0 and policy.gpus_in_use == 0
    policy.requeue("old", now=3, reason="node died")
    policy.add_provider("lab-b", 1)
    (placed,) = policy.schedule(now=4)
    assert placed.workload_id == "old"  # the older work keeps its place


def test_without_checkpoints_evacuees_restart_from_scratch():
    policy = PlacementPolicy(migration=MigrationPolicy(checkpointing=False))
    policy.add_provider("lab-a", 1)
    policy.submit(req("w", 1), now=0)
    policy.schedule(now=0)
    (ev,) = policy.reclaim("lab-a", now=1, deadline_s=100)
    assert ev.action is MigrationAction.RESTART_FROM_SCRATCH


def test_static_allocation_keeps_work_in_its_lab():
    policy = PlacementPolicy(share=False)
    policy.add_provider("a1", 1, group="lab-a")
    policy.add_provider("b1", 1, group="lab-b")
    policy.submit(req("a-job-1", 1, group="lab-a"), now=0)
    policy.submit(req("a-job-2", 1, group="lab-a"), now=0)
    placed = policy.schedule(now=0)
    assert [(p.workload_id, p.provider) for p in placed] == [("a-job-1", "a1")]
    assert [e.workload_id for e in policy.queue(now=0)] == ["a-job-2"]  # b1 stays idle
    shared = PlacementPolicy(share=True)
    shared.add_provider("a1", 1, group="lab-a")
    shared.add_provider("b1", 1, group="lab-b")
    shared.submit(req("a-job-1", 1, group="lab-a"), now=0)
    shared.submit(req("a-job-2", 1, group="lab-a"), now=0)
    assert len(shared.schedule(now=0)) == 2


def test_every_decision_is_logged_with_its_reason(caplog):
    import logging

    policy = PlacementPolicy()
    policy.add_provider("lab-a", 1)
    with caplog.at_level(logging.INFO, logger="raysys.sharing.policy"):
        policy.submit(req("w", 0.5), now=0)
        policy.schedule(now=0)
        policy.reclaim("lab-a", now=1, deadline_s=None)
    assert "queued w:" in caplog.text
    assert "placement w: no partly used GPU holds it" in caplog.text
    assert "evacuation w: owner of lab-a reclaims it" in caplog.text
    kinds = [type(d) for d in policy.recent_decisions()]
    assert kinds[:2] == [Queued, Placement]


def test_reclaim_without_deadline_gives_the_owners_grace():
    policy = PlacementPolicy(migration=MigrationPolicy(immediate_grace_s=10.0))
    policy.add_provider("lab-a", 1)
    policy.submit(req("ckpt-30s", 1, est=30.0), now=0)
    policy.schedule(now=0)
    (ev,) = policy.reclaim("lab-a", now=1, deadline_s=None, grace_s=60.0)
    assert ev.time_left_s == pytest.approx(60.0)
    assert ev.action is MigrationAction.CHECKPOINT_AND_MOVE
    # without the owner's grace the platform's default applies
    policy = PlacementPolicy(migration=MigrationPolicy(immediate_grace_s=10.0))
    policy.add_provider("lab-a", 1)
    policy.submit(req("ckpt-30s", 1, est=30.0), now=0)
    policy.schedule(now=0)
    (ev,) = policy.reclaim("lab-a", now=1, deadline_s=None)
    assert ev.time_left_s == pytest.approx(10.0)
    assert ev.action is MigrationAction.RESUME_FROM_LAST


@pytest.mark.parametrize("gpus", [True, "1", None])
def test_a_workload_spec_takes_only_numbers_as_its_gpu_need(gpus):
    with pytest.raises(ValidationError, match="gpus"):
        WorkloadSpec(tenant="t", name="w", gpus=gpus)
    assert WorkloadSpec(tenant="t", name="w", gpus=1).gpus == 1.0
    assert WorkloadSpec(tenant="t", name="w", gpus=0.25).gpus == 0.25
