"""The local scheduler every instance runs, shared by the real engine and the simulator.

One engine step (continuous batching with chunked prefill, as in vLLM and
Sarathi-Serve, Agrawal et al., OSDI'24):

1. sequences whose KV is on the instance join the decode batch, oldest first,
   up to ``max_num_seqs``;
2. each decoding sequence takes one token of the step's budget
   (``max_step_tokens``); what is left goes to the queued prompts in arrival
   order, a long prompt split into chunks over several steps;
3. a prompt starts only when the instance has KV room for its whole length
   (prompt plus the most tokens it may generate); a prompt that does not fit
   blocks those behind it, so arrival order is kept;
4. optionally (``mixed_step_limit_s``), a step that holds decodes takes prompt
   chunks only up to the tokens its latency profile predicts to fit within
   that time, so decodes sharing a step with a prompt keep their TPOT
   (Sarathi-Serve's stall-free batching, with the budget in seconds instead of
   tokens). At least one prompt token still runs per step, so prompts progress
   however large the decode batch.

`plan_prefill` is steps 2-4 as a pure function over anything that looks like a
queued prompt (`PrefillSlot`); `MixedStepBudget` is step 4's time budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from raysys.serving.profile import LatencyProfile


class EngineConfig(BaseModel):
    """Knobs of the local scheduler (the same on every instance, for every policy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_step_tokens: int = Field(
        2048, ge=1, description="token budget of one step (decode tokens + chunks)"
    )
    max_num_seqs: int = Field(
        512, ge=1, description="most sequences decoding at once on one instance"
    )
    itl_smoothing: float = Field(
        0.3,
        gt=0,
        le=1,
        description="weight of the newest step in the observed inter-token latency",
    )
    mixed_step_limit_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="predicted time a step holding decodes may take: prompt chunks "
        "are cut to fit (needs the instance's latency profile); None: the whole "
        "token budget",
    )


class PrefillSlot(Protocol):
    """What the planner needs of a queued prompt."""

    @property
    def remaining(self) -> int: ...  # prompt tokens still to prefill

    @property
    def admitted(self) -> bool: ...  # KV already reserved

    @property
    def kv_tokens(self) -> int: ...  # KV to reserve when it starts

    @property
    def done(self) -> int: ...  # prompt tokens already prefilled


S = TypeVar("S", bound=PrefillSlot)


@dataclass
class MixedStepBudget:
    """Seconds of prefill work left to a step that holds decodes.

    Built by `MixedStepBudget.for_step` from the instance's profile; each chunk
    `plan_prefill` takes spends its predicted work (``a·pairs + b·tokens``, the
    same terms as `LatencyProfile.prefill_work_s`).
    """

    seconds: float
    profile: LatencyProfile

    @classmethod
    def for_step(
        cls,
        config: EngineConfig,
        profile: LatencyProfile | None,
        batch_tokens: int,
        num_seqs: int,
    ) -> MixedStepBudget | None:
        """The budget of a step with ``num_seqs`` decodes over ``batch_tokens``
        context tokens; None when the step has no limit (no decodes, or
        ``mixed_step_limit_s`` unset).

        Raises:
            ValueError: a limit is set but no profile is given.
        """
        limit = config.mixed_step_limit_s
        if limit is None or num_seqs == 0:
            return None
        if profile is None:
            raise ValueError(
                f"mixed_step_limit_s={limit} needs the instance's latency profile"
            )
        return cls(profile.mixed_step_room_s(limit, batch_tokens, num_seqs), profile)

    def tokens(self, done: int, remaining: int) -> int:
        """The most tokens of a prompt with ``done`` tokens prefilled (at most
        ``remaining``) whose chunk fits the seconds left."""
        a = self.profile.prefill_s_per_token_sq
        b = self.profile.prefill_s_per_token
        # a·((done + n)² − done²) + b·n <= seconds, solved for n in the form
        # that does not subtract nearly equal numbers (a tiny beside b).
        lin = 2 * a * done + b
        if lin > 0:
            n = 2 * self.seconds / (math.sqrt(lin * lin + 4 * a * self.seconds) + lin)
        elif a > 0:
            n = math.sqrt(self.seconds / a)
        else:
            return remaining
        # Capped before rounding: n is inf where the chunk is nearly free.
        n = min(remaining, math.floor(min(n, remaining) * (1 + 1e-12)))
        # Rounding may overshoot by a hair; step back until the chunk fits.
        while n > 0 and self.profile.prefill_work_s(n, done) > self.seconds:
            n -= 1
        return n

    def spend(self, num_tokens: int, done: int) -> None:
        self.seconds = max(
            0.0, self.seconds - self.profile.prefill_work_s(num_tokens, done)
        )


def plan_prefill(
    queue: Iterable[S],
    num_decoding: int,
    kv_free_tokens: int,
    config: EngineConfig,
    time_budget: MixedStepBudget | None = None,
) -> list[tuple[S, int]]:
    """Chunks of queued prompts for one step, in queue order.

    Args:
        queue: prompts in arrival order.
        num_decoding: sequences in this step's decode batch (one token each).
        kv_free_tokens: KV tokens not yet reserved on the instance.
        config: the step's token budget.
        time_budget: seconds of prefill work the step may add to its decodes
            (`MixedStepBudget.for_step`); None: no limit but the token budget.
            The first chunk gets at least one token whatever the budget.

    Returns:
        ``(slot, num_tokens)`` per prompt that runs a chunk; the caller reserves
        ``slot.kv_tokens`` for every slot not yet admitted.
    """
    budget = config.max_step_tokens - num_decoding
    chunks: list[tuple[S, int]] = []
    for slot in queue:
        if budget <= 0:
            break
        if not slot.admitted:
            if slot.kv_tokens > kv_free_tokens:
                break
            kv_free_tokens -= slot.kv_tokens
        num_tokens = min(slot.remaining, budget)
        if time_budget is not None:
            fits = time_budget.tokens(slot.done, num_tokens)
            num_tokens = max(fits, 1) if not chunks else fits
            if num_tokens == 0:
                break
            time_budget.spend(num_tokens, slot.done)
        chunks.append((slot, num_tokens))
        budget -= num_tokens
    return chunks
