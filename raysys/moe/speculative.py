"""Speculative decoding: draft k tokens, verify them in one target pass.

Leviathan et al., "Fast Inference from Transformers via Speculative Decoding"
(2023) and Chen et al., "Accelerating Large Language Model Decoding with
Speculative Sampling" (2023). One round, with ``x`` the last emitted token (not
yet in either cache):

1. the draft runs on ``x``, then on each token it drafts, producing
   ``d_1 .. d_k`` with distributions ``q_1 .. q_k`` (with ``extra_draft_step``
   it also runs on ``d_k``, so its attention outputs cover every verified token);
2. the target runs once on ``[x, d_1 .. d_k]``, giving ``p_1 .. p_{k+1}``;
3. the longest acceptable prefix ``d_1 .. d_n`` is kept, then one more token
   from the target (the correction at the first rejection, or a bonus token
   after ``d_k``); both caches are truncated to the kept tokens.

So a round emits between 1 and k+1 tokens, every one distributed as the target
alone would have produced it. ``k`` shrinks near the end so ``max_new_tokens``
is never exceeded, and a stop token anywhere in the emitted block ends the
sequence right there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from raysys.models.llama import KVCache, Transformer, prefill
from raysys.models.mixtral import Mixtral, Routing

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- rules


def probs_from_logits(logits: Tensor, temperature: float) -> Tensor:
    """Sampling distribution of ``logits (..., V)`` at ``temperature`` (> 0), float32.

    A row whose ``logits / temperature`` overflows (a temperature so small it
    rounds to 0 in float32, or a ``+inf`` logit) gives the distribution it tends
    to instead of NaN: all the mass, shared evenly, on its largest logits. Each
    row is its own distribution: the other rows, and ``-inf`` logits (tokens
    that cannot be drawn), are softmaxed as they are.

    Raises:
        ValueError: the logits hold NaN (a broken forward); sampling or
            accepting tokens from them would go on silently.
    """
    logits = logits.float()
    if torch.isnan(logits).any():
        raise ValueError(
            f"logits hold NaN ({int(torch.isnan(logits).sum())} of "
            f"{logits.numel()}); the model's forward is broken, so no token can "
            "be sampled from them"
        )
    scaled = logits / temperature
    # softmax is NaN where a row's largest scaled logit is not finite (+inf:
    # overflow or a +inf logit; -inf: every logit underflowed) or holds 0 / 0
    # (a temperature rounded to 0): there it takes the limit as T -> 0. Rows
    # of only -inf logits have no limit and stay NaN.
    peak = scaled.amax(dim=-1, keepdim=True)  # NaN if any 0 / 0
    drawable = logits.amax(dim=-1, keepdim=True) > -torch.inf
    degenerate = ~torch.isfinite(peak) & drawable
    if degenerate.any():
        top = logits == logits.amax(dim=-1, keepdim=True)
        limit = torch.where(top, 0.0, -torch.inf)
        scaled = torch.where(degenerate, limit, scaled)
    return torch.softmax(scaled, dim=-1)


def sample(probs: Tensor, generator: torch.Generator) -> int:
    """One token id drawn from ``probs (V,)``."""
    return int(torch.multinomial(probs, 1, generator=generator))


def uniform(generator: torch.Generator) -> float:
    """One number drawn from U[0, 1): the acceptance test's coin."""
    return float(torch.rand((), generator=generator))


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """``norm(max(0, p - q))``: where the target has more mass than the draft.

    When ``p == q`` (no excess anywhere; a rejection then has probability 0)
    the target's own ``p`` is returned so the result is always a distribution.
    """
    excess = torch.clamp(p - q, min=0)  # (V,)
    total = excess.sum()
    return excess / total if total > 0 else p


def greedy_verify(drafted: Sequence[int], target_logits: Tensor) -> tuple[int, int]:
    """Greedy acceptance: keep drafted tokens while each is the target's argmax.

    Args:
        drafted: ``d_1 .. d_k``.
        target_logits: ``(k+1, V)``; row i scores the token after ``d_i``
            (row 0: after ``x``).

    Returns:
        (number accepted n, the target's token after ``d_n``).
    """
    best = target_logits.argmax(-1).tolist()  # (k+1,)
    n = 0
    while n < len(drafted) and drafted[n] == best[n]:
        n += 1
    return n, best[n]


def rejection_verify(
    drafted: Sequence[int],
    draft_probs: Tensor,
    target_probs: Tensor,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Speculative sampling's acceptance; emitted tokens are distributed as the target's.

    Args:
        drafted: ``d_1 .. d_k``, with ``d_i ~ q_i``.
        draft_probs: ``q_1 .. q_k``, ``(k, V)``.
        target_probs: ``p_1 .. p_{k+1}``, ``(k+1, V)``.

    Returns:
        (number accepted n, the next token: the correction or the bonus).

    Its only randomness is one `uniform` per drafted token examined and one
    `sample`, so its exact output distribution can be enumerated.
    """
    # Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
    # rejection emit a draw from norm(max(0, p_i - q_i)), else a bonus from p_{k+1}.
    for i, token in enumerate(drafted):
        p, q = float(target_probs[i, token]), float(draft_probs[i, token])
        u = uniform(generator)
        if u * q >= p:  # u >= p / q without dividing by a tiny q
            return i, sample(
                residual_distribution(target_probs[i], draft_probs[i]), generator
            )
    return len(drafted), sample(target_probs[len(drafted)], generator)


# --------------------------------------------------------------------------- hooks


class DecodeHooks:
    """What an engine adds around the decoding steps (no-ops here)."""

    def target_pass_done(self, kind: str) -> None:
        """A target forward finished (``kind``: "prefill", "decode", "verify")."""

    def round_started(self) -> None:
        """A speculative round begins drafting."""

    def draft_hook(self, skip_rows: int) -> Callable[[int, Tensor], None] | None:
        """The draft's attention hook for its next forward, ignoring its first
        ``skip_rows`` positions (tokens already verified)."""
        return None

    def round_verified(self, routings: Sequence[Routing | None]) -> None:
        """The verification pass routed as ``routings`` (one per layer)."""


@dataclass
class GenerationTrace:
    """One sequence's output and timings."""

    tokens: list[int]
    ttft_s: float
    total_s: float
    num_rounds: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    draft_s: float = 0.0  # time in draft forwards
    verify_s: float = 0.0  # time in verification passes (fetch waits included)
    num_draft_forwards: int = 0
    stopped: bool = False  # ended on a stop token

    @property
    def decode_s(self) -> float:
        """Time after the first token."""
        return self.total_s - self.ttft_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for a single token."""
        n = len(self.tokens) - 1
        return self.decode_s / n if n > 0 else None


@dataclass
class SamplingParams:
    """How tokens are chosen."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    stop_ids: Sequence[int] = ()
    generator: torch.Generator = field(default_factory=torch.Generator)

    def choose(self, logits: Tensor) -> int:
        """The next token from ``logits (V,)``."""
        if self.temperature == 0:
            return int(logits.argmax())
        return sample(probs_from_logits(logits, self.temperature), self.generator)


def _emit(out: list[int], block: Sequence[int], params: SamplingParams) -> bool:
    """Append ``block`` up to the first stop token / the budget; True when done."""
    for token in block:
        out.append(token)
        if token in params.stop_ids or len(out) >= params.max_new_tokens:
            return True
    return False


# --------------------------------------------------------------------------- loops


def _check_max_new_tokens(params: SamplingParams) -> None:
    # The first token is emitted before the budget is looked at, so a budget
    # below one would still produce a token.
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")


@torch.no_grad()
def generate_autoregressive(
    target: Transformer,
    prompt: Sequence[int],
    params: SamplingParams,
    hooks: DecodeHooks | None = None,
) -> GenerationTrace:
    """The target alone, one token per forward."""
    _check_max_new_tokens(params)
    hooks = hooks or DecodeHooks()
    start = time.perf_counter()
    cache = target.new_cache()
    logits = prefill(target, torch.tensor(prompt), cache)
    hooks.target_pass_done("prefill")
    out: list[int] = []
    done = _emit(out, [params.choose(logits)], params)
    trace = GenerationTrace(out, time.perf_counter() - start, 0.0)
    while not done:
        step = time.perf_counter()
        logits = target(torch.tensor([[out[-1]]]), [cache], last_only=True)[0]
        hooks.target_pass_done("decode")
        trace.verify_s += time.perf_counter() - step
        done = _emit(out, [params.choose(logits)], params)
    trace.stopped = out[-1] in params.stop_ids
    trace.total_s = time.perf_counter() - start
    return trace


@torch.no_grad()
def generate_speculative(
    target: Mixtral | Transformer,
    draft: Transformer,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    draft_length: int,
    extra_draft_step: bool = False,
    hooks: DecodeHooks | None = None,
) -> GenerationTrace:
    """Speculative decoding of ``prompt`` (see the module docstring)."""
    if draft_length < 1:
        raise ValueError(f"draft_length must be >= 1, got {draft_length}")
    _check_max_new_tokens(params)
    hooks = hooks or DecodeHooks()
    start = time.perf_counter()
    t_cache = target.new_cache()
    logits = prefill(target, torch.tensor(prompt), t_cache)
    hooks.target_pass_done("prefill")
    out: list[int] = []
    done = _emit(out, [params.choose(logits)], params)
    trace = GenerationTrace(out, time.perf_counter() - start, 0.0)
    if not done:
        d_cache = draft.new_cache()
        prefill(draft, torch.tensor(prompt), d_cache)
    pending = [out[-1]] if out else []  # emitted tokens not yet in the draft cache
    while not done:
        k = min(draft_length, params.max_new_tokens - len(out) - 1)
        if k == 0:  # one token left: a plain target step
            step = time.perf_counter()
            logits = target(torch.tensor([[out[-1]]]), [t_cache], last_only=True)[0]
            hooks.target_pass_done("decode")
            trace.verify_s += time.perf_counter() - step
            done = _emit(out, [params.choose(logits)], params)
            break
        block = _speculative_round(
            target,
            draft,
            t_cache,
            d_cache,
            pending,
            k,
            params,
            extra_draft_step,
            hooks,
            trace,
        )
        done = _emit(out, block, params)
    trace.stopped = bool(out) and out[-1] in params.stop_ids
    trace.total_s = time.perf_counter() - start
    return trace


def _speculative_round(
    target: Transformer,
    draft: Transformer,
    t_cache: KVCache,
    d_cache: KVCache,
    pending: list[int],
    k: int,
    params: SamplingParams,
    extra_draft_step: bool,
    hooks: DecodeHooks,
    trace: GenerationTrace,
) -> list[int]:
    """Draft k tokens, verify, truncate the caches; returns the emitted block.

    ``pending`` (updated in place) holds the emitted tokens the draft has not
    seen; its last element is ``x``, the last emitted token.
    """
    x = pending[-1]
    t_start, d_start = t_cache.num_tokens, d_cache.num_tokens
    hooks.round_started()

    # 1. Draft d_1 .. d_k (and feed d_k too with extra_draft_step).
    drafted: list[int] = []
    draft_probs: list[Tensor] = []
    inputs = list(pending)
    skip = len(pending) - 1
    step = time.perf_counter()
    for i in range(k + (1 if extra_draft_step else 0)):
        logits = draft(
            torch.tensor([inputs]),
            [d_cache],
            last_only=True,
            on_attention=hooks.draft_hook(skip),
        )[0]  # (V,)
        trace.num_draft_forwards += 1
        skip = 0
        if i == k:
            break
        if params.temperature == 0:
            token = int(logits.argmax())
        else:
            q = probs_from_logits(logits, params.temperature)
            token = sample(q, params.generator)
            draft_probs.append(q)
        drafted.append(token)
        inputs = [token]
    trace.draft_s += time.perf_counter() - step

    # 2. Verify [x, d_1 .. d_k] in one target pass.
    step = time.perf_counter()
    target_logits = target(torch.tensor([[x, *drafted]]), [t_cache])[0]  # (k+1, V)
    hooks.target_pass_done("verify")
    trace.verify_s += time.perf_counter() - step
    if isinstance(target, Mixtral):
        hooks.round_verified(target.last_routing())

    # 3. Accept a prefix, add the target's next token, truncate both caches.
    if params.temperature == 0:
        n, next_token = greedy_verify(drafted, target_logits)
    else:
        n, next_token = rejection_verify(
            drafted,
            torch.stack(draft_probs),
            probs_from_logits(target_logits, params.temperature),
            params.generator,
        )
    trace.num_rounds += 1
    trace.num_drafted += k
    trace.num_accepted += n
    t_cache.truncate(t_start + 1 + n)
    kept = d_start + len(pending) + n  # draft positions for ... x, d_1 .. d_n
    if kept <= d_cache.num_tokens:
        d_cache.truncate(kept)
        pending[:] = [next_token]
    else:  # all k accepted without the extra step: the draft has not seen d_k
        pending[:] = [drafted[-1], next_token]
    return [*drafted[:n], next_token]
