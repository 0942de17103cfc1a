"""Real serving on Ray instance actors: outputs across handoffs and flips, the whole
decode pool flipped away and back, a prefill instance killed mid-handoff, and
cancellation freeing KV everywhere."""

from __future__ import annotations

import logging

import pytest
import ray
import torch

from raysys.models.llama import greedy_generate
from raysys.serving.batching import EngineConfig
from raysys.serving.front import FrontConfig, ServingFront
from raysys.serving.instance import InstanceSpec, ModelSource
from raysys.serving.policy import ArrowPolicy, Role, SloTargets, StaticSplitPolicy
from raysys.serving.profile import LatencyProfile

pytestmark = pytest.mark.slow

SOURCE = ModelSource(seed=7)
CHUNK = 64  # step budget, also the KV cache's block size
SPEC = InstanceSpec(
    source=SOURCE,
    engine=EngineConfig(max_step_tokens=CHUNK, max_num_seqs=32),
    kv_capacity_tokens=8192,
    num_cpus=0.25,
)
PROFILE = LatencyProfile(
    name="tiny",
    prefill_s_per_token_sq=0.0,
    prefill_s_per_token=2e-5,
    prefill_overhead_s=0.002,
    decode_s_per_batch_token=1e-6,
    decode_overhead_s=0.002,
    kv_capacity_tokens=8192,
    kv_bytes_per_token=512,
    kv_transfer_bytes_per_s=1e9,
)
SLO = SloTargets(ttft_s=30.0, tpot_s=5.0)
LENGTHS = (1, 63, 64, 65, 127, 128, 129, 30)
NEW_TOKENS = 10


def prompt(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=generator).tolist()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return SOURCE.build()


@pytest.fixture(scope="module")
def arrow_front(ray_cluster):
    front = ServingFront(ArrowPolicy(PROFILE, SLO), SPEC, 4)
    yield front
    front.shutdown()


def expected_outputs(model, prompts, new_tokens=NEW_TOKENS):
    return [tuple(greedy_generate(model, p, new_tokens, stop_ids=())) for p in prompts]


def submit_all(front, prompts, first_id, new_tokens=NEW_TOKENS):
    ids = list(range(first_id, first_id + len(prompts)))
    for rid, p in zip(ids, prompts, strict=True):
        front.submit(rid, p, new_tokens, ignore_eos=True)
    return ids


def test_outputs_across_handoff_and_flip_equal_serving_alone(arrow_front, model):
    front = arrow_front
    prompts = [prompt(n, seed=n) for n in LENGTHS]
    expected = expected_outputs(model, prompts)

    # The first prompt's prefill instance turns into a decode instance before
    # its first token is seen: its decode stays there (no handoff).
    (flipped_id,) = submit_all(front, prompts[:1], 0)
    flipped = front.requests[flipped_id].record.prefill_instance
    assert front.roles[flipped] is Role.PREFILL
    front.flip(flipped, Role.DECODE)
    ids = [flipped_id, *submit_all(front, prompts[1:], 1)]
    assert front.run_until_idle(120)
    front.flip(flipped, Role.PREFILL)

    outputs = front.outputs()
    assert [outputs[rid] for rid in ids] == expected
    stayed = front.requests[flipped_id].record
    assert stayed.decode_instance == stayed.prefill_instance == flipped
    assert not stayed.handoff
    handed = [front.requests[rid].record for rid in ids[1:]]
    assert all(r.handoff for r in handed)
    assert all(r.prefill_instance != r.decode_instance for r in handed)
    assert all(r.num_retries == 0 for r in handed)


def test_whole_decode_pool_flipped_away_and_back_loses_nothing(
    arrow_front, model, caplog
):
    front = arrow_front
    decode_pool = [i for i, r in enumerate(front.roles) if r is Role.DECODE]
    assert decode_pool
    fallbacks_before = front.num_fallbacks
    prompts = [prompt(20 + 7 * k, seed=200 + k) for k in range(18)]
    expected = expected_outputs(model, prompts)
    ids = []
    caplog.set_level(logging.WARNING, logger="raysys.serving")
    for k, p in enumerate(prompts):
        if k == 6:
            for i in decode_pool:
                front.flip(i, Role.PREFILL)
        if k == 12:
            for i in decode_pool:
                front.flip(i, Role.DECODE)
        ids += submit_all(front, [p], 100 + k)
        for _ in range(3):
            front.poll()
        if k == 11:
            front.run_until_idle(60)  # so every later first token sees the pool back
    assert front.run_until_idle(120)

    outputs = front.outputs()
    assert [outputs.get(rid) for rid in ids] == expected
    records = [front.requests[rid].record for rid in ids]
    assert all(r.completed and not r.failed for r in records)
    # Requests whose first token came while no decode instance existed decode
    # where they were prefilled: each such fallback is counted and logged. All
    # of requests 6-11 are among them; none after the pool came back.
    in_place = [r for r in records if r.decode_instance == r.prefill_instance]
    assert all(not r.handoff for r in in_place)
    assert all(r.decode_instance == r.prefill_instance for r in records[6:12])
    assert front.num_fallbacks - fallbacks_before == len(in_place)
    assert sum("by fallback" in m for m in caplog.messages) == len(in_place)
    assert all(r.handoff for r in records[12:])


def test_request_beyond_the_kv_capacity_fails_alone_at_once(arrow_front, model):
    front = arrow_front
    good = prompt(40, seed=40)
    too_long = prompt(SPEC.kv_capacity_tokens - NEW_TOKENS + 1, seed=41)
    front.submit(500, too_long, NEW_TOKENS, ignore_eos=True)
    front.submit(501, good, NEW_TOKENS, ignore_eos=True)
    bad = front.requests[500].record
    assert bad.failed and bad.num_retries == 0
    assert "needs 8193 KV tokens" in bad.error and "capacity of 8192" in bad.error
    assert front.run_until_idle(60)
    assert front.outputs()[501] == expected_outputs(model, [good])[0]


def test_cancelled_request_frees_its_kv_everywhere(arrow_front, model):
    front = arrow_front
    long_prompts = [prompt(100, seed=300 + k) for k in range(4)]
    ids = submit_all(front, long_prompts, 400, new_tokens=120)
    # Cancel one request while its KV is on the way, another once it decodes,
    # and one more before anything happened to it.
    in_handoff = []

    def note_handoff(request_id, source, target):
        if not in_handoff:
            in_handoff.append(request_id)

    front.on_handoff = note_handoff
    try:
        front.cancel(ids[3])
        while not in_handoff:
            front.poll()
        front.cancel(in_handoff[0])  # its export and accept orders are out
        while not any(front.requests[rid].phase == "decode" for rid in ids[:3]):
            front.poll()
        decoding = next(rid for rid in ids[:3] if front.requests[rid].phase == "decode")
        front.cancel(decoding)
        assert front.run_until_idle(120)
    finally:
        front.on_handoff = None

    cancelled = {decoding, ids[3], in_handoff[0]}
    assert len(cancelled) == 3
    for _ in range(20):  # let the last release/cancel orders land
        front.poll()
    holds = ray.get([a.holds.remote() for a in front.actors], timeout=30)
    keys = {front.requests[rid].key for rid in cancelled}
    assert all(not (keys & set(h)) for h in holds)
    reports = ray.get([a.ready.remote() for a in front.actors], timeout=30)
    assert [r.load.kv_used_tokens for r in reports] == [0] * len(front.actors)
    finished = [rid for rid in ids if rid not in cancelled]
    outputs = front.outputs()
    for rid in finished:
        expected = tuple(
            greedy_generate(model, long_prompts[rid - 400], 120, stop_ids=())
        )
        assert outputs[rid] == expected
    assert all(front.requests[rid].record.error == "cancelled" for rid in cancelled)


def test_handoff_reported_after_the_request_finished_frees_the_sender(
    arrow_front, model
):
    """Under load the receiver's end of a request can reach the front before the
    report that it accepted the KV; the sender's copy must still be freed."""
    front = arrow_front
    prompts = [prompt(n, seed=500 + n) for n in (40, 70)]
    held = []
    deliver = front._op_done

    def hold_accepts(op, report):
        if op.kind == "accept":
            held.append((op, report))
        else:
            deliver(op, report)

    front._op_done = hold_accepts
    try:
        ids = submit_all(front, prompts, 600)
        assert front.run_until_idle(120)
        assert all(front.requests[rid].phase == "done" for rid in ids)
        assert held, "no request was handed over"
        for op, report in held:  # the late reports
            deliver(op, report)
    finally:
        front._op_done = deliver
    for _ in range(20):  # let the release orders land
        front.poll()
    assert [front.outputs()[rid] for rid in ids] == expected_outputs(model, prompts)
    records = [front.requests[rid].record for rid in ids]
    assert all(r.handoff for r in records if r.prefill_instance != r.decode_instance)
    reports = ray.get([a.ready.remote() for a in front.actors], timeout=30)
    assert [r.load.kv_used_tokens for r in reports] == [0] * len(front.actors)


def test_killing_a_prefill_instance_mid_handoff_retries_only_its_requests(
    ray_cluster, model
):
    killed = []

    def kill_source(request_id, source, target):
        if not killed and source == 0:
            killed.append(request_id)
            ray.kill(front.actors[0], no_restart=True)

    front = ServingFront(
        StaticSplitPolicy(PROFILE, SLO, num_prefill=2),
        SPEC,
        3,
        FrontConfig(max_retries=1, request_timeout_s=90),
        on_handoff=kill_source,
    )
    try:
        prompts = [prompt(40 + 9 * k, seed=500 + k) for k in range(10)]
        expected = expected_outputs(model, prompts)
        ids = submit_all(front, prompts, 0)
        first_placement = {
            rid: front.requests[rid].record.prefill_instance for rid in ids
        }
        assert set(first_placement.values()) == {0, 1}
        assert front.run_until_idle(90)

        assert killed and front.alive == [False, True, True]
        assert front.num_instance_failures == 1
        records = {rid: front.requests[rid].record for rid in ids}
        retried = {rid for rid, r in records.items() if r.num_retries}
        assert killed[0] in retried
        assert retried <= {rid for rid, i in first_placement.items() if i == 0}
        assert all(
            records[rid].num_retries == 0 for rid in ids if first_placement[rid] == 1
        )
        assert all(r.completed for r in records.values())
        outputs = front.outputs()
        assert [outputs[rid] for rid in ids] == expected
        # The survivors keep serving.
        assert front.generate([prompts[0]], NEW_TOKENS, timeout_s=60) == [expected[0]]
    finally:
        front.shutdown()
