"""The prefetch cutoff policy on hand-built profiles."""

from __future__ import annotations

import pytest

from raysys.moe.policy import CutoffPolicy, RoundProfile


def profile(**overrides) -> RoundProfile:
    layers = overrides.pop("num_layers", 4)
    fields = {
        "num_draft_tokens": 5,
        "draft_layer_ms": [1.0] * layers,
        "verify_layer_ms": [2.0] * layers,
        "fetch_ms": 3.0,
        "needed": [4.0] * layers,
        "missing": [3.0] * layers,
        "predicted": [4.0] * layers,
        "recall": [1.0] * layers,
        "capacity": 32,
    }
    fields.update(overrides)
    return RoundProfile(**fields)


def test_no_prefetch_is_drafting_plus_serial_fetch_and_compute():
    p = profile()
    # 5 tokens x 4 ms drafting, then per layer 3 misses x 3 ms + 2 ms compute.
    assert CutoffPolicy().round_ms(p, 0) == pytest.approx(20 + 4 * (9 + 2))


def test_perfect_prediction_with_room_hides_all_transfers():
    p = profile()
    policy = CutoffPolicy()
    # 12 missing experts (36 ms of link) start moving while drafting (20 ms):
    # the round can never beat drafting + compute (28 ms) and must beat the
    # serial 64 ms by hiding at least the drafting window.
    full = policy.round_ms(p, 4)
    assert 28 <= full <= 64 - 20 + 1e-9
    decision = policy.decide(p)
    assert decision.cutoff >= 3
    assert len(decision.round_ms) == 5
    assert decision.round_ms[decision.cutoff] == min(decision.round_ms)


def test_free_transfers_need_no_prefetch():
    decision = CutoffPolicy().decide(profile(fetch_ms=0.0))
    assert decision.cutoff == 0  # ties go to the smaller cutoff


def test_wrong_deep_predictions_make_the_cost_u_shaped():
    # Deep layers are predicted badly and the cache is small: prefetching them
    # spends the link on experts the pass never uses.
    p = profile(
        recall=[1.0, 0.9, 0.2, 0.1],
        predicted=[4.0, 4.0, 8.0, 8.0],
        capacity=8,
        fetch_ms=4.0,
    )
    times = [CutoffPolicy().round_ms(p, c) for c in range(5)]
    best = min(range(5), key=times.__getitem__)
    assert 0 < best < 4
    assert times[0] > times[best] < times[4]


def test_profile_lists_must_agree():
    with pytest.raises(ValueError, match="differ in length"):
        CutoffPolicy().decide(profile(recall=[1.0, 1.0]))
