"""Policies driven on CPU with hand-built instance states."""

from __future__ import annotations

import math

import pytest

from raysys.runtime.errors import ConfigError
from raysys.serving.policy import (
    ArrowConfig,
    ArrowPolicy,
    ColocatedPolicy,
    DispatchReason,
    FlipReason,
    InstanceState,
    PrefillWork,
    RequestInfo,
    Role,
    SloTargets,
    StaticSplitPolicy,
    make_policy,
)
from raysys.serving.profile import LatencyProfile

P, D = Role.PREFILL, Role.DECODE

# Prefill: 10 ms + 1 ms per token (no attention term, to keep sums readable).
# Decode: 10 ms + 10 us per batch token; with TPOT 50 ms, MT = 4000 tokens.
PROFILE = LatencyProfile(
    name="hand",
    prefill_s_per_token_sq=0.0,
    prefill_s_per_token=1e-3,
    prefill_overhead_s=0.01,
    decode_s_per_batch_token=1e-5,
    decode_overhead_s=0.01,
    kv_capacity_tokens=10_000,
    kv_bytes_per_token=1,
    kv_transfer_bytes_per_s=1e9,
)
SLO = SloTargets(ttft_s=1.0, tpot_s=0.05)
MT = 4000


def arrow(**kwargs) -> ArrowPolicy:
    return ArrowPolicy(PROFILE, SLO, ArrowConfig(**kwargs))


def queued(*prompts: int) -> list[PrefillWork]:
    return [PrefillWork(i, n, n) for i, n in enumerate(prompts)]


def test_loads_are_ratios_to_the_slos():
    policy = arrow()
    state = InstanceState.of(
        0,
        P,
        prefill=[PrefillWork(1, 300, 300), PrefillWork(2, 500, 200)],
        decode_context_tokens=[1000, 1000],
        observed_itl_s=0.02,
    )
    # Two prompts: 2 x 10 ms overhead + 500 tokens x 1 ms = 0.52 s over 1 s.
    assert policy.prefill_load(state) == pytest.approx(0.52)
    # A step's room is the 50 ms target less its 10 ms fixed cost:
    # max((20 - 10) ms / 40 ms, 2000 / 4000) = 0.5
    assert policy.decode_load(state) == pytest.approx(0.5)
    slow = InstanceState.of(0, D, decode_context_tokens=[100], observed_itl_s=0.04)
    assert policy.decode_load(slow) == pytest.approx(0.75)  # 30 ms of 40
    assert policy.max_batch_tokens(0) == MT


def test_decode_load_counts_only_the_room_a_tight_tpot_leaves():
    # TPOT 12 ms against a 10 ms fixed step cost: a nearly empty decode
    # instance steps in 10.2 ms, which ITL / TPOT would call 85% loaded.
    policy = ArrowPolicy(PROFILE, SloTargets(ttft_s=1.0, tpot_s=0.012))
    light = InstanceState.of(0, D, decode_context_tokens=[20], observed_itl_s=0.0102)
    assert policy.decode_load(light) == pytest.approx(0.1)  # 0.2 ms of 2 ms
    full = InstanceState.of(0, D, decode_context_tokens=[150], observed_itl_s=0.012)
    assert policy.decode_load(full) == pytest.approx(1.0)
    assert policy.decode_load(InstanceState.of(1, D)) == 0.0  # never stepped
    # A target at or below the fixed cost leaves no room at all.
    none = ArrowPolicy(PROFILE, SloTargets(ttft_s=1.0, tpot_s=0.01))
    assert none.decode_load(light) == math.inf


def test_quadratic_term_counts_only_attention_left_to_do():
    profile = PROFILE.model_copy(update={"prefill_s_per_token_sq": 1e-6})
    policy = ArrowPolicy(profile, SLO)
    state = InstanceState.of(0, P, prefill=[PrefillWork(1, 1000, 400)])
    # 600 tokens done: pairs left = 1000^2 - 600^2 = 640_000.
    expected = 0.01 + 400 * 1e-3 + 640_000 * 1e-6
    assert policy.queued_prefill_s(state) == pytest.approx(expected)


def test_prefill_goes_to_the_feasible_instance_with_least_interference():
    policy = arrow()
    states = [
        # Fast but has decodes resident: interference first.
        InstanceState.of(0, P, decode_context_tokens=[500]),
        # Busier (0.31 s queued) but no decodes: wins.
        InstanceState.of(1, P, prefill=queued(300)),
        # No decodes and more queued: loses on predicted TTFT.
        InstanceState.of(2, P, prefill=queued(600)),
        InstanceState.of(3, D),
    ]
    d = policy.dispatch_prefill(RequestInfo(7, 100), states, now_s=0.0)
    assert d.instance_id == 1
    assert d.reason is DispatchReason.FEASIBLE
    assert d.flip is None
    assert d.cost == pytest.approx((0.0, 0.31 + 0.11))


def test_infeasible_prefill_flips_a_lightly_loaded_decode_instance():
    policy = arrow()
    states = [
        InstanceState.of(0, P, prefill=queued(2000)),
        InstanceState.of(1, D, decode_context_tokens=[300]),
        InstanceState.of(2, D, decode_context_tokens=[100]),
        InstanceState.of(3, D, prefill=queued(10), decode_context_tokens=[900]),
    ]
    d = policy.dispatch_prefill(RequestInfo(7, 100), states, now_s=5.0)
    # Decode load is low (< shrink): flip. Instance 3 already holds prefill work,
    # which Algorithm 3 prefers over holding fewer decode tokens.
    assert d.reason is DispatchReason.FLIPPED
    assert d.instance_id == 3
    assert (d.flip.from_role, d.flip.to_role) == (D, P)
    assert d.flip.reason is FlipReason.DISPATCH_PREFILL
    # Without prefill work anywhere in the pool: the least resident decode work.
    states[3] = InstanceState.of(3, D, decode_context_tokens=[900])
    d = policy.dispatch_prefill(RequestInfo(8, 100), states, now_s=5.0)
    assert d.instance_id == 2


def test_no_decode_to_prefill_flip_while_decode_load_is_high():
    policy = arrow(shrink_threshold=0.5)
    busy = [2500]  # 2500 / 4000 = 0.625 >= 0.5
    states = [
        InstanceState.of(0, P, prefill=queued(2000)),
        InstanceState.of(1, P, prefill=queued(1500)),
        InstanceState.of(2, D, decode_context_tokens=busy),
        InstanceState.of(3, D, decode_context_tokens=busy),
    ]
    d = policy.dispatch_prefill(RequestInfo(7, 100), states, now_s=0.0)
    assert d.reason is DispatchReason.CHEAPEST
    assert d.instance_id == 1
    assert d.flip is None


def test_decode_pool_is_never_emptied_by_a_prefill_flip():
    policy = arrow()
    states = [
        InstanceState.of(0, P, prefill=queued(2000)),
        InstanceState.of(1, D),
    ]
    d = policy.dispatch_prefill(RequestInfo(7, 100), states, now_s=0.0)
    assert d.flip is None
    assert d.instance_id == 0
    assert d.reason is DispatchReason.CHEAPEST


def test_decode_stays_on_a_prefill_instance_that_flipped_to_decode():
    policy = arrow()
    states = [
        InstanceState.of(0, D, decode_context_tokens=[3900]),  # was prefill
        InstanceState.of(1, D),
        InstanceState.of(2, P),
    ]
    d = policy.dispatch_decode(RequestInfo(7, 100), 0, states, now_s=0.0)
    assert d.instance_id == 0
    assert d.reason is DispatchReason.STAY_ON_FLIPPED
    # Had instance 0 stayed a prefill instance, the decode would move.
    states[0] = InstanceState.of(0, P)
    d = policy.dispatch_decode(RequestInfo(7, 100), 0, states, now_s=0.0)
    assert d.instance_id == 1
    assert d.reason is DispatchReason.FEASIBLE


def test_decode_stays_on_its_prefill_instance_when_the_handoff_would_stall():
    # 1 byte per token at 20 kB/s: 1000 tokens take 0.05 s = one TPOT target.
    slow_link = PROFILE.model_copy(update={"kv_transfer_bytes_per_s": 2e4})
    policy = ArrowPolicy(slow_link, SLO, ArrowConfig())
    states = [
        InstanceState.of(0, P, prefill=queued(50)),
        InstanceState.of(1, D),
    ]
    # 1500 + 1 tokens: 0.075 s > 0.05 s, instance 0 has room under MT, and
    # its queued prompt (10 ms + 50 ms) interferes for less than the stall.
    d = policy.dispatch_decode(RequestInfo(7, 1500), 0, states, now_s=0.0)
    assert d.instance_id == 0
    assert d.reason is DispatchReason.STAY_AVOIDS_HANDOFF
    assert d.cost == pytest.approx((50.0, 1501 - MT))
    # 900 + 1 tokens: 0.045 s, within one TPOT target: handed over.
    d = policy.dispatch_decode(RequestInfo(8, 900), 0, states, now_s=0.0)
    assert (d.instance_id, d.reason) == (1, DispatchReason.FEASIBLE)
    # A queue of 0.51 s on instance 0 would slow the decode's steps for longer
    # than the 0.075 s handoff: handed over.
    states[0] = InstanceState.of(0, P, prefill=queued(500))
    d = policy.dispatch_decode(RequestInfo(11, 1500), 0, states, now_s=0.0)
    assert (d.instance_id, d.reason) == (1, DispatchReason.FEASIBLE)
    # Unless the local scheduler keeps the steps it shares within the TPOT
    # target (50 ms); a limit above the target does not.
    policy.mixed_step_limit_s = 0.06
    d = policy.dispatch_decode(RequestInfo(12, 1500), 0, states, now_s=0.0)
    assert (d.instance_id, d.reason) == (1, DispatchReason.FEASIBLE)
    policy.mixed_step_limit_s = 0.05
    d = policy.dispatch_decode(RequestInfo(13, 1500), 0, states, now_s=0.0)
    assert (d.instance_id, d.reason) == (0, DispatchReason.STAY_AVOIDS_HANDOFF)
    # ... and only if the limit leaves room beside the fixed cost and the
    # decodes: 45 ms + 15 ms of decode work is past the 50 ms limit.
    slow_start = slow_link.model_copy(update={"prefill_overhead_s": 0.045})
    policy = ArrowPolicy(slow_start, SLO, ArrowConfig())
    policy.mixed_step_limit_s = 0.05
    d = policy.dispatch_decode(RequestInfo(14, 1500), 0, states, now_s=0.0)
    assert (d.instance_id, d.reason) == (1, DispatchReason.FEASIBLE)
    # No room left on instance 0 under MT: handed over despite the stall.
    states[0] = InstanceState.of(0, P, decode_context_tokens=[3000])
    d = policy.dispatch_decode(RequestInfo(9, 1500), 0, states, now_s=0.0)
    assert (d.instance_id, d.reason) == (1, DispatchReason.FEASIBLE)
    # A limit of 0 turns the rule off; a limit of 2 TPOT targets tolerates 0.075 s.
    states[0] = InstanceState.of(0, P)
    for limit in (0.0, 2.0):
        off = ArrowPolicy(slow_link, SLO, ArrowConfig(handoff_limit_tpot=limit))
        d = off.dispatch_decode(RequestInfo(10, 1500), 0, states, now_s=0.0)
        assert (d.instance_id, d.reason) == (1, DispatchReason.FEASIBLE)


def test_decode_goes_to_feasible_instance_without_prefill_work_first():
    policy = arrow()
    states = [
        InstanceState.of(0, P),
        InstanceState.of(1, D, prefill=queued(5), decode_context_tokens=[100]),
        InstanceState.of(2, D, decode_context_tokens=[3000]),
        InstanceState.of(3, D, decode_context_tokens=[3950]),  # 3950+101 > MT
    ]
    d = policy.dispatch_decode(RequestInfo(7, 100), 0, states, now_s=0.0)
    assert d.instance_id == 2
    assert d.cost == pytest.approx((0.0, 3000 + 101 - MT))


def test_infeasible_decode_flips_prefill_instance_then_respects_cooldown():
    policy = arrow(cooldown_s=10.0)
    full = [MT]
    states = [
        InstanceState.of(0, P, prefill=queued(900)),
        InstanceState.of(1, P, prefill=queued(50)),
        InstanceState.of(2, P, prefill=queued(10), decode_context_tokens=[20]),
        InstanceState.of(3, D, decode_context_tokens=full),
    ]
    d = policy.dispatch_decode(RequestInfo(7, 100), 0, states, now_s=100.0)
    # Instance 2 already decodes: preferred although its queue is not the least.
    assert d.reason is DispatchReason.FLIPPED
    assert d.instance_id == 2
    assert (d.flip.from_role, d.flip.to_role) == (P, D)
    assert d.flip.reason is FlipReason.DISPATCH_DECODE

    states[2] = InstanceState.of(2, D, decode_context_tokens=full)
    d = policy.dispatch_decode(RequestInfo(8, 100), 0, states, now_s=105.0)
    assert d.reason is DispatchReason.CHEAPEST  # within the cooldown: no flip
    assert d.flip is None
    d = policy.dispatch_decode(RequestInfo(9, 100), 0, states, now_s=110.5)
    assert d.reason is DispatchReason.FLIPPED
    assert d.instance_id == 1  # no decode work anywhere: least queued prefill


def test_decode_fallback_when_decode_pool_is_gone_is_counted():
    policy = arrow()
    states = [InstanceState.of(0, P), InstanceState.of(1, P)]
    d = policy.dispatch_decode(RequestInfo(7, 100), 1, states, now_s=0.0)
    assert d.reason is DispatchReason.FALLBACK
    assert d.instance_id == 1  # stays where its KV is
    assert policy.counters.num_fallbacks == 1


def test_dead_instances_are_never_chosen():
    policy = arrow()
    states = [
        InstanceState.of(0, P, alive=False),
        InstanceState.of(1, P, prefill=queued(400)),
        InstanceState.of(2, D, alive=False),
        InstanceState.of(3, D, decode_context_tokens=[100]),
    ]
    assert policy.dispatch_prefill(RequestInfo(7, 10), states, 0.0).instance_id == 1
    assert policy.dispatch_decode(RequestInfo(7, 10), 1, states, 0.0).instance_id == 3
    dead = [InstanceState.of(i, P, alive=False) for i in range(2)]
    assert policy.dispatch_prefill(RequestInfo(8, 10), dead, 0.0) is None


def monitor_states(decode_tokens: int, prefill_queue: int = 0) -> list[InstanceState]:
    return [
        InstanceState.of(0, P, prefill=queued(prefill_queue) if prefill_queue else []),
        InstanceState.of(1, P, prefill=queued(200)),
        InstanceState.of(2, P, prefill=queued(100)),
        InstanceState.of(3, D, decode_context_tokens=[decode_tokens]),
    ]


def test_monitor_flips_only_after_consecutive_overloaded_ticks():
    policy = arrow(num_intervals=3, cooldown_s=0.0, shrink_threshold=0.5)
    # Prefill load mean(1.51, 0.21, 0.11) = 0.61 stays above shrink.
    overloaded = monitor_states(decode_tokens=MT, prefill_queue=1500)  # load 1.0
    calm = monitor_states(decode_tokens=100, prefill_queue=1500)
    assert policy.monitor(overloaded, 1.0) == []
    assert policy.monitor(overloaded, 2.0) == []
    assert policy.monitor(calm, 3.0) == []  # the streak resets
    assert policy.monitor(overloaded, 4.0) == []
    assert policy.monitor(overloaded, 5.0) == []
    flips = policy.monitor(overloaded, 6.0)
    assert len(flips) == 1
    flip = flips[0]
    assert flip.reason is FlipReason.DECODE_OVERLOAD
    assert flip.instance_id == 2  # least resident prefill work (0.11 s)
    assert (flip.from_role, flip.to_role) == (P, D)


def test_monitor_flips_idle_prefill_when_decode_is_busier():
    policy = arrow(shrink_threshold=0.5, expand_threshold=1.0, num_intervals=3)
    # Prefill load: mean(0, 0.21, 0.11) = 0.107 <= 0.5 <= decode 0.6, for
    # three ticks in a row.
    states = monitor_states(decode_tokens=2400)
    assert policy.monitor(states, 18.0) == []
    assert policy.monitor(states, 19.0) == []
    flips = policy.monitor(states, 20.0)
    assert [f.reason for f in flips] == [FlipReason.PREFILL_IDLE]
    assert flips[0].instance_id == 0
    # Both lightly loaded: nothing to do.
    calm = arrow(num_intervals=1)
    assert calm.monitor(monitor_states(decode_tokens=100), 20.0) == []


def test_an_idle_prefill_flip_starts_the_idle_count_again():
    policy = arrow(shrink_threshold=0.5, num_intervals=3, cooldown_s=0.0)
    states = monitor_states(decode_tokens=2400)  # idle prefill, busy decode
    flipped = [t for t in range(1, 10) if policy.monitor(states, float(t))]
    assert flipped == [3, 6, 9]


def test_monitor_keeps_a_prefill_instance_a_prefill_burst_just_asked_for():
    policy = arrow(shrink_threshold=0.5, num_intervals=1, cooldown_s=10.0)
    # No prefill instance meets TTFT and decode is light: a decode instance
    # flips to prefill at 50 s.
    burst = [
        InstanceState.of(0, P, prefill=queued(1200)),
        InstanceState.of(1, D, decode_context_tokens=[100]),
        InstanceState.of(2, D, decode_context_tokens=[100]),
    ]
    d = policy.dispatch_prefill(RequestInfo(7, 100), burst, now_s=50.0)
    assert d.flip.reason is FlipReason.DISPATCH_PREFILL
    # Then the prefill queue empties and decode gets busier: the idle rule
    # holds, but gives no instance back within the cooldown of that flip.
    states = [
        InstanceState.of(0, P),
        InstanceState.of(1, P),
        InstanceState.of(2, D, decode_context_tokens=[2400]),
    ]
    assert policy.monitor(states, 55.0) == []
    assert policy.monitor(states, 59.9) == []
    flips = policy.monitor(states, 60.0)
    assert [f.reason for f in flips] == [FlipReason.PREFILL_IDLE]


def test_monitor_respects_cooldown_after_any_expansion():
    policy = arrow(cooldown_s=10.0, num_intervals=1)
    busy = monitor_states(decode_tokens=MT)
    assert len(policy.monitor(busy, 20.0)) == 1
    assert policy.monitor(busy, 25.0) == []
    assert policy.monitor(busy, 29.9) == []
    assert len(policy.monitor(busy, 30.0)) == 1


def test_monitor_never_empties_the_prefill_pool():
    policy = arrow(num_intervals=1, cooldown_s=0.0)
    states = [
        InstanceState.of(0, P),
        InstanceState.of(1, D, decode_context_tokens=[MT]),
        InstanceState.of(2, D, decode_context_tokens=[MT]),
    ]
    for t in range(5):
        assert policy.monitor(states, float(t)) == []


def test_arrow_config_checks_threshold_order():
    with pytest.raises(ValueError, match="shrink_threshold"):
        ArrowConfig(shrink_threshold=2.0, expand_threshold=1.0)


def test_static_split_keeps_its_roles_and_never_flips():
    policy = StaticSplitPolicy(PROFILE, SLO, num_prefill=3)
    assert policy.initial_roles(5) == [P, P, P, D, D]
    states = [
        InstanceState.of(0, P, prefill=queued(3000)),
        InstanceState.of(1, P, prefill=queued(2000)),
        InstanceState.of(2, D, decode_context_tokens=[MT]),
    ]
    d = policy.dispatch_prefill(RequestInfo(7, 100), states, 0.0)
    assert (d.instance_id, d.reason, d.flip) == (1, DispatchReason.CHEAPEST, None)
    d = policy.dispatch_decode(RequestInfo(7, 100), 1, states, 0.0)
    assert (d.instance_id, d.reason, d.flip) == (2, DispatchReason.CHEAPEST, None)
    assert policy.monitor(states, 100.0) == []
    with pytest.raises(ConfigError, match="num_prefill"):
        StaticSplitPolicy(PROFILE, SLO, num_prefill=5).initial_roles(5)


def test_colocated_keeps_both_phases_on_one_instance():
    policy = ColocatedPolicy(PROFILE, SLO)
    assert policy.initial_roles(3) == [Role.MIXED] * 3
    states = [
        InstanceState.of(0, Role.MIXED, prefill=queued(500)),
        InstanceState.of(1, Role.MIXED, decode_context_tokens=[3000]),
        InstanceState.of(2, Role.MIXED, prefill=queued(100)),
    ]
    d = policy.dispatch_prefill(RequestInfo(7, 100), states, 0.0)
    assert d.instance_id == 1  # smallest predicted TTFT
    d = policy.dispatch_decode(RequestInfo(7, 100), 2, states, 0.0)
    assert (d.instance_id, d.reason) == (2, DispatchReason.COLOCATED)


@pytest.mark.parametrize("num_instances,expected", [(2, 1), (8, 4), (5, 2)])
def test_arrow_starts_with_half_prefill(num_instances, expected):
    roles = arrow().initial_roles(num_instances)
    assert roles.count(P) == expected
    assert roles.count(D) == num_instances - expected


def test_make_policy_names():
    assert make_policy("arrow", PROFILE, SLO).name == "arrow"
    assert make_policy("static", PROFILE, SLO, num_prefill=2).num_prefill == 2
    with pytest.raises(ConfigError, match="num_prefill"):
        make_policy("static", PROFILE, SLO)
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("random", PROFILE, SLO)


def test_per_sequence_decode_cost_lowers_mt_for_short_sequences():
    profile = PROFILE.model_copy(update={"decode_s_per_seq": 1e-3})
    policy = ArrowPolicy(profile, SLO)
    # 40 ms of room: 10 sequences of 100 tokens cost 10 x (100 x 1e-5 + 1e-3).
    short = InstanceState.of(0, D, decode_context_tokens=[100] * 10)
    # per token: 1e-5 + 1e-3 / 100 = 2e-5 -> MT = 2000, load = 1000 / 2000
    assert policy.decode_load(short) == pytest.approx(0.5)
    long = InstanceState.of(0, D, decode_context_tokens=[1000])
    # per token: 1e-5 + 1e-6 = 1.1e-5 -> MT = 3636
    assert policy.decode_load(long) == pytest.approx(1000 / 3636)
    # A decode of 101 tokens joining `short`: 1101 tokens over 11 sequences.
    per_token = 1e-5 + 1e-3 / (1101 / 11)
    mt = int(0.04 / per_token + 1e-6)
    assert policy.decode_cost(short, 101) == pytest.approx((0.0, 1101 - mt))


def test_ttft_margin_tightens_prefill_feasibility():
    states = [
        InstanceState.of(0, P, prefill=queued(500)),  # predicts 0.51 + 0.11 s
        InstanceState.of(1, D),
        InstanceState.of(2, D),
    ]
    request = RequestInfo(7, 100)
    assert arrow().dispatch_prefill(request, states, 0.0).reason is (
        DispatchReason.FEASIBLE
    )
    d = arrow(ttft_margin=0.5).dispatch_prefill(request, states, 0.0)
    assert d.reason is DispatchReason.FLIPPED  # 0.62 s > 0.5 x 1 s
    assert d.instance_id == 1
