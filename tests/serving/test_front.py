"""Real serving on Ray instance actors: outputs across handoffs and flips, the whole
decode pool flipped away and back, a prefill instance killed mid-handoff, and
cancellation freeing KV everywhere."""

from __future__ import annotations

import logging

import pytest
import ray
import torch

from raysys.models.llama import greedy_generate
from raysys.runtime.errors import RaysysError
from raysys.serving.batching import EngineConfig
from raysys.serving.front import FrontClosed, FrontConfig, ServingFront
from raysys.serving.instance import InstanceSpec, ModelSource
from raysys.serving.policy import (
    ArrowPolicy,
    ColocatedPolicy,
    Role,
    SloTargets,
    StaticSplitPolicy,
)
from raysys.serving.profile import LatencyProfile
from raysys.serving.trace import Trace, TraceRequest

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


@pytest.mark.parametrize(
    "request_id,tokens,max_new_tokens,match",
    [
        (700, [], 4, "request 700: the prompt is empty"),
        (700, [1, 2, 259], 4, "prompt token 2 is 259, outside the model's vocab"),
        (700, [1, -5], 4, "prompt token 1 is -5"),
        (700, [1, 2], 0, "max_new_tokens=0 must be a whole number >= 1"),
        (700, [1, 2], 2.5, "max_new_tokens=2.5"),
        (7.5, [1, 2], 4, "request id 7.5 is not a whole number"),
        (True, [1, 2], 4, "request id True is not a whole number"),
    ],
)
def test_bad_request_arguments_are_refused_and_nothing_is_recorded(
    arrow_front, request_id, tokens, max_new_tokens, match
):
    # A token outside the vocabulary used to reach an instance's batched step,
    # whose failure failed every request in that step with it.
    before = dict(arrow_front.requests)
    with pytest.raises(ValueError, match=match):
        arrow_front.submit(request_id, tokens, max_new_tokens)
    assert arrow_front.requests == before


def test_duplicate_ids_and_cancels_of_unknown_or_finished_requests(arrow_front, model):
    front = arrow_front
    good = prompt(12, seed=710)
    front.submit(710, good, 3, ignore_eos=True)
    with pytest.raises(ValueError, match="request id 710 was already submitted"):
        front.submit(710, good, 3)
    assert front.run_until_idle(60)
    assert front.outputs()[710] == expected_outputs(model, [good], 3)[0]
    assert front.cancel(710) is False  # finished: left as it was
    assert front.requests[710].phase == "done" and not front.requests[710].record.failed
    with pytest.raises(ValueError, match="request id 711 was never submitted"):
        front.cancel(711)
    front.submit(711, good, 50, ignore_eos=True)
    assert front.cancel(711) is True
    assert front.cancel(711) is False
    assert front.requests[711].record.error == "cancelled"


def test_prompts_at_the_context_length_are_served_or_fail_alone_at_once(
    arrow_front, model
):
    front = arrow_front
    context = SOURCE.max_position_embeddings
    full = prompt(context, seed=720)
    front.submit(720, full, 1, ignore_eos=True)  # its one token takes no position
    front.submit(721, full, 2, ignore_eos=True)
    over = front.requests[721].record
    assert over.failed and over.num_retries == 0
    assert over.error.startswith(f"needs {context + 1} positions")
    assert front.run_until_idle(60)
    assert front.outputs()[720] == expected_outputs(model, [full], 1)[0]


def test_generate_checks_every_prompt_before_sending_any(arrow_front):
    front = arrow_front
    before = set(front.requests)
    with pytest.raises(ValueError, match="prompt token 0 is 300"):
        front.generate([prompt(10, seed=730), [300, 1]], 4)
    assert set(front.requests) == before  # the good first prompt was not sent


def test_operator_flips_are_checked(arrow_front):
    front = arrow_front
    roles = list(front.roles)
    for instance_id, role, match in [
        (4, "decode", "instance id 4 is not one of 0..3"),
        (-1, "decode", "instance id -1 is not one of 0..3"),
        (0, "both", "role 'both' is unknown"),
        (0, Role.MIXED, "only prefill and decode roles flip"),
    ]:
        with pytest.raises(ValueError, match=match):
            front.flip(instance_id, role)
    assert front.roles == roles and all(isinstance(r, Role) for r in roles)
    (i, _) = next((i, r) for i, r in enumerate(roles) if r is Role.PREFILL)
    flips = len(front.flips)
    front.flip(i, "decode")  # a role's name works too
    assert front.roles[i] is Role.DECODE and len(front.flips) == flips + 1
    front.flip(i, Role.PREFILL)
    assert front.roles == roles


def test_replay_fails_a_refused_request_alone(arrow_front, model):
    front = arrow_front
    requests = [
        TraceRequest(800, 0.0, 20, 5),
        TraceRequest(801, 0.01, 20, 0),  # nothing to generate
        TraceRequest(802, 0.02, 30, 5),
    ]
    prompts = {800: prompt(20, seed=800), 801: prompt(20, 801), 802: prompt(30, 802)}
    records = front.replay(Trace("hand", requests), lambda rid, n: prompts[rid])
    assert [r.request_id for r in records] == [800, 801, 802]
    assert records[1].failed and "max_new_tokens=0" in records[1].error
    outputs = front.outputs()
    assert outputs[800] == expected_outputs(model, [prompts[800]], 5)[0]
    assert outputs[802] == expected_outputs(model, [prompts[802]], 5)[0]
    # A trace reusing ids is refused before anything is sent.
    with pytest.raises(ValueError, match=r"\[800\] were already submitted"):
        front.replay(Trace("again", requests[:1]), lambda rid, n: prompts[rid])
    twice = [TraceRequest(810, 0.0, 5, 2), TraceRequest(810, 0.1, 5, 2)]
    with pytest.raises(ValueError, match=r"\[810\] appear more than once"):
        front.replay(Trace("twice", twice), lambda rid, n: [1] * n)
    assert 810 not in front.requests


def test_stop_tokens_end_requests_early_with_their_own_tpot(arrow_front, model):
    front = arrow_front
    # Greedy continuations of these prompts under the test model's weights:
    # a stop token first, and a stop token second.
    first, second = prompt(8, seed=594), prompt(20, seed=89)
    stop = model.config.stop_token_ids
    assert greedy_generate(model, first, 10)[0] in stop
    assert len(greedy_generate(model, second, 10)) == 2
    dispatched = sum(front.policy.counters.dispatch_reasons.values())
    front.submit(820, first, 10)
    front.submit(821, second, 10)
    assert front.run_until_idle(60)
    outputs = front.outputs()
    assert outputs[820] == tuple(greedy_generate(model, first, 10))
    assert outputs[821] == tuple(greedy_generate(model, second, 10))
    ended_at_once, ended_second = (front.requests[r].record for r in (820, 821))
    # The one that ended on its first token had no decode to place.
    assert ended_at_once.decode_instance == -1 and not ended_at_once.handoff
    assert ended_at_once.output_tokens == 1 and ended_at_once.tpot_s is None
    assert ended_second.output_tokens == 2
    assert ended_second.tpot_s == pytest.approx(
        ended_second.finish_s - ended_second.first_token_s
    )
    # Two prefills and one decode placed, not two.
    assert sum(front.policy.counters.dispatch_reasons.values()) == dispatched + 3


def test_shutdown_fails_unfinished_requests_and_keeps_finished_ones(ray_cluster, model):
    front = ServingFront(ColocatedPolicy(PROFILE, SLO), SPEC, 1)
    done = prompt(10, seed=900)
    assert front.generate([done], 3) == expected_outputs(model, [done], 3)
    front.submit(1, prompt(50, seed=901), 400, ignore_eos=True)
    front.poll()
    front.shutdown()
    unfinished = front.requests[1].record
    assert unfinished.failed and "shut down" in unfinished.error
    assert front.outputs() == {0: expected_outputs(model, [done], 3)[0]}
    assert not front.busy()
    for call in (
        lambda: front.submit(2, done, 3),
        lambda: front.poll(),
        lambda: front.cancel(1),
        lambda: front.flip(0, Role.MIXED),
    ):
        with pytest.raises(FrontClosed, match="was shut down"):
            call()
    front.shutdown()  # again: nothing happens


def test_an_instance_that_cannot_start_is_a_clear_error(ray_cluster, tmp_path):
    missing = tmp_path / "no-checkpoint"
    spec = SPEC.model_copy(update={"source": ModelSource(path=str(missing))})
    with pytest.raises(
        RaysysError, match="a serving instance failed to start: .*no-checkpoint"
    ):
        ServingFront(ColocatedPolicy(PROFILE, SLO), spec, 2)


def test_a_handoff_whose_result_is_lost_retries_only_its_request(
    arrow_front, model, monkeypatch
):
    # The Ray object of one accept (a KV handoff) is lost: that request is
    # retried, the others are served as they were, nothing escapes the loop.
    front = arrow_front
    lost_ref, get = object(), ray.get

    def get_or_lose(ref, *args, **kwargs):
        if ref is lost_ref:
            raise ray.exceptions.ObjectLostError("0" * 56, "owner", "accept")
        return get(ref, *args, **kwargs)

    monkeypatch.setattr(ray, "get", get_or_lose)
    on_op, hit = ServingFront._on_op, []

    def lose_first_accept(self, ref, op):
        if op.kind == "accept" and not hit:
            hit.append(op.key)
            ref = lost_ref
        return on_op(self, ref, op)

    monkeypatch.setattr(ServingFront, "_on_op", lose_first_accept)
    prompts = [prompt(n, seed=900 + n) for n in (20, 40, 60)]
    ids = submit_all(front, prompts, 900)
    assert front.run_until_idle(120)
    assert hit, "no handoff was accepted"
    outputs = front.outputs()
    assert [outputs[rid] for rid in ids] == expected_outputs(model, prompts)
    retries = {rid: front.requests[rid].record.num_retries for rid in ids}
    assert sorted(retries.values()) == [0, 0, 1]


def test_instances_cut_chunks_to_a_step_time_with_the_profile_given(ray_cluster, model):
    # The profile travels with the spec to every actor; with a step time limit
    # the prompt chunks beside decodes shrink, and the outputs stay the same.
    engine = SPEC.engine.model_copy(update={"mixed_step_limit_s": 0.0025})
    spec = SPEC.model_copy(update={"engine": engine, "profile": PROFILE})
    prompts = [prompt(n, seed=900 + n) for n in LENGTHS]
    front = ServingFront(ColocatedPolicy(PROFILE, SLO), spec, 1)
    try:
        # The policy learns the limit (Arrow's stay rule depends on it).
        assert front.policy.mixed_step_limit_s == 0.0025
        assert front.generate(prompts, NEW_TOKENS) == expected_outputs(model, prompts)
    finally:
        front.shutdown()
    with pytest.raises(ValueError, match="mixed_step_limit_s=0.0025 needs"):
        InstanceSpec(engine=engine)
    # A spec copied without validation still fails at the actor, alone.
    without = spec.model_copy(update={"profile": None})
    with pytest.raises(
        RaysysError, match="failed to start: .*mixed_step_limit_s=0.0025 needs"
    ):
        ServingFront(ColocatedPolicy(PROFILE, SLO), without, 1)
