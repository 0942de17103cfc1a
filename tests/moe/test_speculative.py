"""Speculative decoding: acceptance rules, exactness, stop tokens, budgets."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from raysys.models.llama import greedy_generate
from raysys.models.tokenizer import ByteTokenizer
from raysys.moe.prompts import BUILTIN_PROMPTS
from raysys.moe.speculative import (
    DecodeHooks,
    SamplingParams,
    generate_autoregressive,
    generate_speculative,
    greedy_verify,
    probs_from_logits,
    rejection_verify,
    residual_distribution,
)

TOKENIZER = ByteTokenizer()


# --------------------------------------------------------------- the rules


def test_greedy_verify_keeps_the_agreeing_prefix():
    logits = torch.zeros(4, 6)
    for row, best in enumerate([2, 5, 1, 3]):
        logits[row, best] = 1.0
    assert greedy_verify([2, 5, 1], logits) == (3, 3)  # all accepted + bonus
    assert greedy_verify([2, 4, 1], logits) == (1, 5)  # correction at 2nd
    assert greedy_verify([0, 5, 1], logits) == (0, 2)


def test_residual_is_the_normalised_excess_of_the_target():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.5, 0.2, 0.1])
    expected = torch.tensor([0.3, 0.0, 0.0, 0.0]) / 0.3
    torch.testing.assert_close(residual_distribution(p, q), expected)
    torch.testing.assert_close(residual_distribution(p, p), p)


# A toy pair over 4 tokens whose next-token tables depend on the last token.
V = 4
P_TABLE = torch.tensor(
    [
        [0.10, 0.40, 0.30, 0.20],
        [0.50, 0.05, 0.25, 0.20],
        [0.25, 0.25, 0.25, 0.25],
        [0.05, 0.15, 0.60, 0.20],
    ]
)
Q_TABLE = torch.tensor(
    [
        [0.30, 0.30, 0.20, 0.20],
        [0.40, 0.20, 0.20, 0.20],
        [0.10, 0.50, 0.30, 0.10],
        [0.20, 0.20, 0.20, 0.40],
    ]
)


def toy_generate(start: int, num_tokens: int, k: int, gen: torch.Generator):
    """Speculative sampling with the toy tables, rounds of k drafted tokens."""
    out: list[int] = []
    last = start
    while len(out) < num_tokens:
        drafted, draft_probs = [], []
        prev = last
        for _ in range(k):
            q = Q_TABLE[prev]
            token = int(torch.multinomial(q, 1, generator=gen))
            drafted.append(token)
            draft_probs.append(q)
            prev = token
        target_probs = torch.stack([P_TABLE[t] for t in [last, *drafted]])
        n, nxt = rejection_verify(drafted, torch.stack(draft_probs), target_probs, gen)
        block = [*drafted[:n], nxt]
        out.extend(block)
        last = block[-1]
    return out[:num_tokens]


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_gives_the_target_distribution(k):
    """Chi-square of the first two emitted tokens against the target's chain.

    The second token comes from the same block or from the next round, so both
    the acceptance rule and the hand-over between rounds are checked.
    """
    gen = torch.Generator().manual_seed(1234 + k)
    num_samples = 8000
    counts = torch.zeros(V, V, dtype=torch.float64)
    for _ in range(num_samples):
        a, b = toy_generate(start=0, num_tokens=2, k=k, gen=gen)
        counts[a, b] += 1
    expected = P_TABLE[0][:, None].double() * P_TABLE.double()  # (V, V)
    observed = counts.reshape(-1).numpy()
    exp = expected.reshape(-1).numpy() * num_samples
    exp *= observed.sum() / exp.sum()
    assert exp.min() >= 5  # the chi-square approximation holds
    result = chisquare(observed, exp)
    assert result.pvalue > 1e-3, result


def test_first_token_distribution_is_exactly_the_targets():
    """Exact: P(first emitted = t) summed over the draft's choice and acceptance."""
    p, q = P_TABLE[3], Q_TABLE[3]
    accept = torch.minimum(torch.ones(V), p / q)
    first = q * accept + (q * (1 - accept)).sum() * residual_distribution(p, q)
    torch.testing.assert_close(first, p)


# --------------------------------------------------------- with the real pair


def prompt_ids(i: int) -> list[int]:
    return TOKENIZER.encode(BUILTIN_PROMPTS[i])


@pytest.fixture(scope="module")
def resident_pair(pair, expert_store):
    draft, target = pair
    target.set_expert_source(None)
    return draft, target


@pytest.fixture(scope="module")
def references(resident_pair):
    _, target = resident_pair
    return {
        i: greedy_generate(target, prompt_ids(i), 200)
        for i in range(len(BUILTIN_PROMPTS))
    }


@pytest.mark.parametrize("draft_length", [1, 2, 3, 4, 5, 6])
def test_greedy_speculative_equals_target_greedy_over_200_tokens(
    resident_pair, references, draft_length
):
    draft, target = resident_pair
    for i, reference in references.items():
        trace = generate_speculative(
            target,
            draft,
            prompt_ids(i),
            SamplingParams(max_new_tokens=200),
            draft_length=draft_length,
            extra_draft_step=draft_length % 2 == 0,
        )
        assert trace.tokens == reference, (i, draft_length)
        assert trace.num_accepted > 0


def test_budget_is_never_exceeded(resident_pair, references):
    draft, target = resident_pair
    for budget in range(1, 9):
        trace = generate_speculative(
            target,
            draft,
            prompt_ids(0),
            SamplingParams(max_new_tokens=budget),
            draft_length=4,
        )
        assert trace.tokens == references[0][:budget]


class BlockRecorder(DecodeHooks):
    def __init__(self):
        self.rounds = 0

    def round_started(self):
        self.rounds += 1


def test_stop_token_inside_an_accepted_block_ends_generation(resident_pair):
    draft, target = resident_pair
    newline = ord("\n")
    ids = prompt_ids(1)
    reference = greedy_generate(target, ids, 200, stop_ids=[newline])
    hooks = BlockRecorder()
    trace = generate_speculative(
        target,
        draft,
        ids,
        SamplingParams(max_new_tokens=200, stop_ids=[newline]),
        draft_length=6,
        hooks=hooks,
    )
    assert trace.tokens == reference and trace.tokens[-1] == newline
    assert newline not in trace.tokens[:-1] and trace.stopped
    # Rounds produced more tokens (accepted + one each) than were kept: the
    # block went on past the stop token and was cut there.
    produced = 1 + trace.num_accepted + trace.num_rounds
    assert produced > len(trace.tokens)


def test_sampling_respects_budget_and_is_reproducible(resident_pair):
    draft, target = resident_pair

    def run(seed):
        params = SamplingParams(
            max_new_tokens=30,
            temperature=0.8,
            generator=torch.Generator().manual_seed(seed),
        )
        return generate_speculative(
            target, draft, prompt_ids(2), params, draft_length=3
        )

    first, again, other = run(5), run(5), run(6)
    assert len(first.tokens) == 30 and first.tokens == again.tokens
    assert first.tokens != other.tokens
    assert 0 < first.num_accepted <= first.num_drafted


def test_autoregressive_loop_equals_reference(resident_pair, references):
    _, target = resident_pair
    trace = generate_autoregressive(
        target, prompt_ids(3), SamplingParams(max_new_tokens=50)
    )
    assert trace.tokens == references[3][:50]
    assert trace.tpot_s is not None and trace.ttft_s > 0


def test_draft_length_must_be_positive(resident_pair):
    draft, target = resident_pair
    with pytest.raises(ValueError, match="draft_length must be >= 1"):
        generate_speculative(
            target,
            draft,
            prompt_ids(0),
            SamplingParams(max_new_tokens=3),
            draft_length=0,
        )


@pytest.mark.parametrize("temperature", [1e-38, 1e-300])
def test_a_vanishing_temperature_samples_the_greedy_tokens(resident_pair, temperature):
    draft, target = resident_pair
    want = greedy_generate(target, prompt_ids(1), 12)
    for generate in (
        lambda p: generate_autoregressive(target, prompt_ids(1), p),
        lambda p: generate_speculative(target, draft, prompt_ids(1), p, draft_length=3),
    ):
        params = SamplingParams(max_new_tokens=12, temperature=temperature)
        assert generate(params).tokens == want


@pytest.mark.parametrize("speculative", [False, True])
def test_a_budget_below_one_token_is_refused(resident_pair, speculative):
    draft, target = resident_pair
    params = SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        if speculative:
            generate_speculative(target, draft, prompt_ids(0), params, draft_length=2)
        else:
            generate_autoregressive(target, prompt_ids(0), params)


def test_each_row_is_its_own_distribution_and_minus_inf_is_no_overflow():
    # Unlikely tokens masked with -inf keep the softmax of the others, and a
    # row that overflows (here a +inf logit) takes its limit alone: the other
    # rows of a verification pass keep their own distributions.
    inf = float("inf")
    logits = torch.tensor([[0.0, 1.0, -inf], [0.0, inf, 2.0], [0.0, 1.0, 2.0]])
    got = probs_from_logits(logits, 1.0)
    assert torch.allclose(got[0], torch.softmax(torch.tensor([0.0, 1.0, -inf]), 0))
    assert torch.equal(got[1], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(got[2], torch.softmax(logits[2], 0))
    # Logits that all underflow to -inf once scaled still sample their largest.
    tiny = probs_from_logits(torch.tensor([-1.0, -2.0, -inf]), 1e-46)
    assert torch.equal(tiny, torch.tensor([1.0, 0.0, 0.0]))


def test_nan_logits_are_an_error_not_a_silent_choice():
    # A NaN target probability would make the acceptance test always accept.
    logits = torch.tensor([[0.0, float("nan"), 2.0], [0.0, 1.0, 0.5]])
    with pytest.raises(ValueError, match=r"logits hold NaN \(1 of 6\)"):
        probs_from_logits(logits, 1.0)
