"""The local scheduler's step plan: token budget, KV admission and the time
budget of steps that hold decodes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from raysys.serving.batching import EngineConfig, MixedStepBudget, plan_prefill
from raysys.serving.profile import LatencyProfile
from serving.test_simulator import PROFILE  # the simulator tests' profile


@dataclass
class Slot:
    remaining: int
    done: int = 0
    admitted: bool = False
    kv_tokens: int = 0


def chunk_work(n: int, done: int) -> float:
    """a·((done+n)² − done²) + b·n, written out from the profile's numbers."""
    return 1e-7 * ((done + n) ** 2 - done**2) + 1e-3 * n


def most_tokens_within(seconds: float, done: int, remaining: int) -> int:
    """The largest n <= remaining with chunk_work(n, done) <= seconds, by search."""
    n = 0
    while n < remaining and chunk_work(n + 1, done) <= seconds:
        n += 1
    return n


@pytest.mark.parametrize("done", [0, 1, 700, 50_000])
@pytest.mark.parametrize("seconds", [0.0, 0.0005, 0.001, 0.0371, 0.25, 3.0])
def test_time_budget_takes_the_most_tokens_that_fit(done, seconds):
    budget = MixedStepBudget(seconds, PROFILE)
    assert budget.tokens(done, 10_000) == most_tokens_within(seconds, done, 10_000)


def test_budget_of_a_step_subtracts_its_fixed_cost_and_decodes():
    config = EngineConfig(mixed_step_limit_s=0.2)
    budget = MixedStepBudget.for_step(config, PROFILE, 3000, 4)
    # max(20 ms, 10 ms) fixed + 3000 batch tokens x 10 us + 4 seqs x 100 us.
    assert budget.seconds == pytest.approx(0.2 - 0.02 - 0.03 - 0.0004)
    assert MixedStepBudget.for_step(config, PROFILE, 0, 0) is None  # no decodes
    assert MixedStepBudget.for_step(EngineConfig(), PROFILE, 3000, 4) is None
    over = MixedStepBudget.for_step(config, PROFILE, 10**6, 4)
    assert over.seconds == 0.0
    with pytest.raises(ValueError, match="mixed_step_limit_s=0.2 needs"):
        MixedStepBudget.for_step(config, None, 3000, 4)


def test_time_budget_cuts_chunks_across_prompts_in_order():
    config = EngineConfig(max_step_tokens=2048)
    queue = [Slot(100, done=50, admitted=True), Slot(500), Slot(500)]
    seconds = 0.4
    chunks = plan_prefill(queue, 3, 10_000, config, MixedStepBudget(seconds, PROFILE))
    first = 100  # 100 tokens after 50 cost 0.10 + 0.0000175 s
    left = seconds - chunk_work(first, 50)
    second = most_tokens_within(left, 0, 500)
    assert [(s, n) for s, n in chunks] == [(queue[0], first), (queue[1], second)]
    assert second < 500
    total = chunk_work(first, 50) + chunk_work(second, 0)
    assert total <= seconds < total + chunk_work(1, second)


def test_a_spent_time_budget_still_moves_the_first_prompt_by_one_token():
    queue = [Slot(300), Slot(10)]
    chunks = plan_prefill(
        queue, 5, 10_000, EngineConfig(), MixedStepBudget(0.0, PROFILE)
    )
    assert chunks == [(queue[0], 1)]


def test_without_a_time_budget_the_token_budget_alone_applies():
    queue = [Slot(1500), Slot(1500)]
    chunks = plan_prefill(queue, 48, 10_000, EngineConfig(max_step_tokens=2048))
    assert [n for _, n in chunks] == [1500, 2048 - 48 - 1500]


def test_a_prompt_without_kv_room_blocks_those_behind_it():
    queue = [Slot(10, kv_tokens=600), Slot(10, kv_tokens=100)]
    assert plan_prefill(queue, 0, 500, EngineConfig()) == []


def linear_profile(a: float, b: float) -> LatencyProfile:
    return PROFILE.model_copy(
        update={"prefill_s_per_token_sq": a, "prefill_s_per_token": b}
    )


@pytest.mark.parametrize(
    ("seconds", "done", "expected"),
    [(0.05, 0, 499), (0.0371, 0, 370), (0.0371, 4000, 370), (0.0123, 0, 122)],
)
def test_time_budget_keeps_its_tokens_when_the_square_term_is_tiny(
    seconds, done, expected
):
    # A fit of nearly linear prefill times leaves a ~1e-22 beside b = 1e-4:
    # the chunk costs 1e-4 s a token, so 0.05 s holds 499 tokens (500 cost a
    # hair over 0.05 s in floating point), 0.0371 s 370 and 0.0123 s 122.
    budget = MixedStepBudget(seconds, linear_profile(1e-22, 1e-4))
    assert budget.tokens(done, 1000) == expected


def test_time_budget_of_a_nearly_free_chunk_takes_all_it_may():
    # seconds / b overflows to inf: every remaining token fits.
    assert MixedStepBudget(1.0, linear_profile(0.0, 1e-310)).tokens(0, 300) == 300
    assert MixedStepBudget(1.0, linear_profile(1e-300, 0.0)).tokens(7, 300) == 300


@pytest.mark.parametrize(("seconds", "expected"), [(0.0, 0), (0.01, 316), (0.1, 1000)])
def test_time_budget_of_a_prompt_start_without_a_linear_term(seconds, expected):
    # b = 0 and nothing prefilled: n² x 1e-7 s <= seconds, n = floor(sqrt(s / a)).
    budget = MixedStepBudget(seconds, linear_profile(1e-7, 0.0))
    assert budget.tokens(0, 1000) == expected


def test_an_infinite_step_limit_is_refused():
    from pydantic import ValidationError

    from raysys.serving.realrun import RealRunSettings

    with pytest.raises(ValidationError, match="finite number"):
        EngineConfig(mixed_step_limit_s=float("inf"))
    with pytest.raises(ValidationError, match="finite number"):
        RealRunSettings(mixed_step_limit_s=float("inf"))
