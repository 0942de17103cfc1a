"""Speculative decoding: acceptance rules, exactness, stop tokens, budgets."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from raysys.models.llama import Llama, greedy_generate, tiny_llama_config
from raysys.models.mixtral import Mixtral, tiny_mixtral_config
from raysys.models.tokenizer import ByteTokenizer
from raysys.moe import speculative
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


def chain_probs(start: int, num_tokens: int) -> torch.Tensor:
    """``P(t_1 .. t_m)`` of the target's own chain from ``start``, ``(V,) * m``."""
    probs = torch.ones(())
    last = torch.tensor(start)
    for _ in range(num_tokens):
        # (V,) * i x (V,): extend every sequence by every next token.
        probs = probs[..., None] * P_TABLE.double()[last]
        last = torch.arange(V).reshape((1,) * (probs.dim() - 1) + (V,))
    return probs


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_gives_the_target_distribution(k):
    """Chi-square of the first four emitted tokens against the target's chain.

    Later tokens come from the same block or from the next round, so the
    acceptance rule, the correction, the bonus token after a fully accepted
    block (token 4 when k = 3) and the hand-over between rounds are checked.
    """
    gen = torch.Generator().manual_seed(1234 + k)
    num_samples, num_tokens = 8000, 4
    counts = torch.zeros((V,) * num_tokens, dtype=torch.float64)
    for _ in range(num_samples):
        counts[tuple(toy_generate(start=0, num_tokens=num_tokens, k=k, gen=gen))] += 1
    observed, expected = pooled(counts, chain_probs(0, num_tokens) * num_samples)
    assert len(observed) > 100  # most sequences keep their own cell
    result = chisquare(observed, expected)
    assert result.pvalue > 1e-3, result


def pooled(observed: torch.Tensor, expected: torch.Tensor):
    """Cells expecting fewer than 5 counts merged into one (chi-square's rule)."""
    observed, expected = observed.reshape(-1), expected.reshape(-1)
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]).numpy()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).numpy()
    return obs, exp * obs.sum() / exp.sum()


class EnumeratedRandomness:
    """Stands in for `rejection_verify`'s randomness to enumerate its outcomes.

    ``uniform`` answers the scripted coins in turn; ``sample`` records the
    distribution it was asked to draw from and answers token 0 (the caller
    weighs every token by the recorded distribution instead).
    """

    def __init__(self, monkeypatch) -> None:
        self.coins: list[float] = []
        self.drawn_from: torch.Tensor | None = None
        monkeypatch.setattr(speculative, "uniform", lambda gen: self.coins.pop(0))
        monkeypatch.setattr(speculative, "sample", self._sample)

    def _sample(self, probs, gen) -> int:
        self.drawn_from = probs.double()
        return 0

    def run(self, coins, drafted, draft_probs, target_probs):
        self.coins, self.drawn_from = list(coins), None
        n, _ = rejection_verify(drafted, draft_probs, target_probs, None)
        return n, self.drawn_from

    def outcomes(self, drafted, draft_probs, target_probs):
        """``[(n, P(n accepted), distribution of the next token)]`` of one call.

        Every toy probability is positive, so a coin of 0 accepts. The chance
        of accepting ``d_i`` is the share of coins in [0, 1) that accept it:
        the rule accepts below a threshold, found here by bisection to 1e-12.
        """
        k = len(drafted)
        args = (drafted, draft_probs, target_probs)
        assert self.run([0.0] * k, *args)[0] == k
        result, reach = [], 1.0  # reach: P(d_1 .. d_i all accepted)
        for i in range(k):
            low, high = 0.0, 1.0
            if self.run([0.0] * i + [high] + [0.0] * (k - i - 1), *args)[0] > i:
                low = high  # even a coin of 1 accepts: never rejected
            while high - low > 1e-12:
                mid = (low + high) / 2
                coins = [0.0] * i + [mid] + [0.0] * (k - i - 1)
                low, high = (mid, high) if self.run(coins, *args)[0] > i else (low, mid)
            accept = low
            if accept < 1.0:
                n, correction = self.run([0.0] * i + [1.0], *args)
                assert n == i
                result.append((i, reach * (1 - accept), correction))
            reach *= accept
        n, bonus = self.run([0.0] * k, *args)
        result.append((n, reach, bonus))
        return result


def exact_toy_probs(randomness, start: int, num_tokens: int, k: int):
    """``P(t_1 .. t_m)`` of `toy_generate`, from `rejection_verify`'s own outcomes.

    Sums over every drafted block (weighted by the draft's tables), every
    outcome of the verification and every next token, then over the rounds
    that follow a block shorter than what is left.
    """
    memo: dict[tuple[int, int], torch.Tensor] = {}

    def probs(last: int, m: int) -> torch.Tensor:  # (V,) * m
        if m == 0:
            return torch.ones((), dtype=torch.float64)
        if (last, m) in memo:
            return memo[(last, m)]
        total = torch.zeros((V,) * m, dtype=torch.float64)
        for drafted in itertools.product(range(V), repeat=k):
            rows = [last, *drafted]
            q_rows = torch.stack([Q_TABLE[t] for t in rows[:-1]])  # (k, V)
            p_rows = torch.stack([P_TABLE[t] for t in rows])  # (k+1, V)
            drafted_p = float(
                q_rows.double().gather(1, torch.tensor(drafted)[:, None]).prod()
            )
            for n, weight, next_probs in randomness.outcomes(
                list(drafted), q_rows, p_rows
            ):
                for token in range(V):
                    block = [*drafted[:n], token]
                    w = drafted_p * weight * float(next_probs[token])
                    if len(block) >= m:
                        total[tuple(block[:m])] += w
                    else:
                        total[tuple(block)] += w * probs(token, m - len(block))
        memo[(last, m)] = total
        return total

    return probs(start, num_tokens)


# The tables are float32 and so is the residual's normalisation: the exact sums
# agree with the chain to a few 1e-9.


def test_first_token_distribution_is_exactly_the_targets(monkeypatch):
    """Exact, from `rejection_verify` itself: draft choice, acceptance, correction."""
    randomness = EnumeratedRandomness(monkeypatch)
    for start in range(V):
        first = exact_toy_probs(randomness, start, num_tokens=1, k=1)
        torch.testing.assert_close(first, P_TABLE[start].double(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_emitted_tokens_are_exactly_the_targets_chain(monkeypatch, k):
    """Exact joint of k + 2 tokens: a full block, its bonus, and the next round."""
    randomness = EnumeratedRandomness(monkeypatch)
    got = exact_toy_probs(randomness, 0, num_tokens=k + 2, k=k)
    torch.testing.assert_close(got, chain_probs(0, k + 2), atol=1e-7, rtol=0)


# ------------------------------------------------- with a tiny random pair

SMALL_V = 6
TINY = {
    "vocab_size": SMALL_V,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
TINY_PROMPT = [0, 3, 1]
# A draft distribution recorded at temperature 1 instead of T moves the output
# by a chi-square non-centrality of about 0.005 per sample at T = 0.8 (some ten
# thousand samples to show it) and about 0.06 at T = 0.5, where 1500 samples
# show it with p near 1e-12.
SAMPLING_TEMPERATURE = 0.5


@pytest.fixture(scope="module")
def tiny_pair():
    """A random Mixtral target and Llama draft over 6 tokens.

    The target's head is scaled down and the draft's up: the draft is sharper
    than the target and prefers other tokens, so many drafts are rejected and
    both the acceptance ratio and the correction shape the output.
    """
    target = Mixtral(tiny_mixtral_config(**TINY))
    target.init_weights(seed=1, std=0.2)
    draft = Llama(tiny_llama_config(**TINY))
    draft.init_weights(seed=2, std=0.2)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.5)
        draft.lm_head.weight.mul_(1.5)
    return draft, target


def exact_target_probs(target, prompt, num_tokens, temperature):
    """``P(t_1 .. t_m)`` of the target sampling alone, ``(V,) * m``.

    One cache-free forward over every continuation gives each token's
    conditional distribution: ``softmax(logits / T)`` after ``prompt + t_<i``.
    """
    tails = torch.tensor(list(itertools.product(range(SMALL_V), repeat=num_tokens)))
    ids = torch.cat([torch.tensor(prompt).expand(len(tails), -1), tails], 1)
    with torch.no_grad():
        logits = target(ids[:, :-1])[:, len(prompt) - 1 :].double()  # (N, m, V)
    conditional = torch.softmax(logits / temperature, dim=-1)
    probs = conditional.gather(2, tails[:, :, None])[..., 0].prod(1)  # (N,)
    return probs.reshape((SMALL_V,) * num_tokens)


@pytest.mark.parametrize("draft_length", [1, 3])
def test_sampled_speculative_tokens_follow_the_targets_distribution(
    tiny_pair, draft_length
):
    """Chi-square of every pair of consecutive tokens against the exact target.

    The budget is one token from the prefill, one full round of ``draft_length``
    drafted tokens and its bonus, so every drafted position, the corrections,
    the bonus and (after a rejection) the rounds that follow are sampled. Each
    seed is one sequence; the seeds are fixed, so the test is deterministic.
    """
    draft, target = tiny_pair
    num_tokens, num_samples = draft_length + 2, 1500
    counts = torch.zeros((SMALL_V,) * num_tokens, dtype=torch.float64)
    for seed in range(num_samples):
        params = SamplingParams(
            max_new_tokens=num_tokens,
            temperature=SAMPLING_TEMPERATURE,
            generator=torch.Generator().manual_seed(seed),
        )
        trace = generate_speculative(
            target, draft, TINY_PROMPT, params, draft_length=draft_length
        )
        counts[tuple(trace.tokens)] += 1
    want = exact_target_probs(target, TINY_PROMPT, num_tokens, SAMPLING_TEMPERATURE)
    for i in range(num_tokens - 1):
        others = tuple(a for a in range(num_tokens) if a not in (i, i + 1))
        observed, expected = pooled(
            counts.sum(dim=others), want.sum(dim=others) * num_samples
        )
        assert len(observed) > SMALL_V**2 // 2  # most cells keep their own count
        result = chisquare(observed, expected)
        # One test per pair: the level is shared among them.
        assert result.pvalue > 1e-3 / (num_tokens - 1), (i, result)


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
