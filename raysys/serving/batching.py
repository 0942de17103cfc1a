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
   blocks those behind it, so arrival order is kept.

`plan_prefill` is step 2-3 as a pure function over anything that looks like a
queued prompt (`PrefillSlot`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field


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


class PrefillSlot(Protocol):
    """What the planner needs of a queued prompt."""

    @property
    def remaining(self) -> int: ...  # prompt tokens still to prefill

    @property
    def admitted(self) -> bool: ...  # KV already reserved

    @property
    def kv_tokens(self) -> int: ...  # KV to reserve when it starts


S = TypeVar("S", bound=PrefillSlot)


def plan_prefill(
    queue: Iterable[S],
    num_decoding: int,
    kv_free_tokens: int,
    config: EngineConfig,
) -> list[tuple[S, int]]:
    """Chunks of queued prompts for one step, in queue order.

    Args:
        queue: prompts in arrival order.
        num_decoding: sequences in this step's decode batch (one token each).
        kv_free_tokens: KV tokens not yet reserved on the instance.
        config: the step's token budget.

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
        chunks.append((slot, num_tokens))
        budget -= num_tokens
    return chunks
