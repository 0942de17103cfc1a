"""The prefetch cutoff policy: how many layers to prefetch during drafting.

A plain object with no Ray in it. Its input is a `RoundProfile` measured on the
running engine (per-layer draft and verification compute, the time of one
expert transfer, how many experts a pass needs and finds cached, how many the
predictor names and how many of the needed ones it gets right); its output is a
`CutoffDecision`. It predicts the time of one speculative round for every
cutoff with a small event model of one round and picks the fastest:

- drafting takes ``num_draft_tokens x sum(draft_layer_ms)``; the predictions of
  layer l arrive spread over it, and are transferred one at a time over the
  link, shallow layers first, as long as the prefetched experts fit in the
  cache (a prefetch waits for the pass to consume a layer when they do not);
- verification computes layer by layer: layer l waits for its prefetched
  transfers, then fetches on demand what is still missing (the predictor's
  misses below the cutoff, every missing expert above it), then computes;
- wrong predictions cost link time and cache room all the same.

Prefetching deeper layers hides more of the on-demand transfers but spends
link time and cache room on predictions that grow less accurate with depth,
and the cache holds only so many: the predicted round time is U-shaped in the
cutoff, and a sweep of the real engine shows the same shape. Ties (within
``tie_tolerance``) go to the smaller cutoff, which moves fewer bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundProfile:
    """Measured costs of one speculative round on this engine.

    Per-layer lists have one value per layer. Counts are means per
    verification pass.
    """

    num_draft_tokens: int  # draft forwards per round
    draft_layer_ms: list[float]  # one draft token through one layer
    verify_layer_ms: list[float]  # one verification pass through one layer
    fetch_ms: float  # one expert transfer
    needed: list[float]  # experts the pass routes to
    missing: list[float]  # of those, not cached when the layer starts (no prefetch)
    predicted: list[float]  # experts the predictor names
    recall: list[float]  # share of the needed experts the predictor names
    capacity: int  # cache capacity in experts

    @property
    def num_layers(self) -> int:
        return len(self.verify_layer_ms)

    def check(self) -> None:
        """Raise ValueError when the per-layer lists disagree in length."""
        lengths = {
            len(x)
            for x in (
                self.draft_layer_ms,
                self.verify_layer_ms,
                self.needed,
                self.missing,
                self.predicted,
                self.recall,
            )
        }
        if len(lengths) != 1:
            raise ValueError(f"per-layer profile lists differ in length: {lengths}")


@dataclass(frozen=True)
class CutoffDecision:
    """The chosen cutoff and the predicted round time of every cutoff.

    Attributes:
        cutoff: layers ``0 .. cutoff - 1`` are prefetched during drafting.
        round_ms: predicted round time for cutoff 0, 1, .., L.
        reason: one line with the numbers behind the choice.
    """

    cutoff: int
    round_ms: list[float]
    reason: str


@dataclass
class _Transfer:
    layer: int
    known_ms: float
    amount: float  # experts (fractional: expected counts)
    useful: float  # share of ``amount`` the pass will use


class CutoffPolicy:
    """Chooses the prefetch cutoff from a measured `RoundProfile`."""

    def __init__(self, tie_tolerance: float = 0.01) -> None:
        self.tie_tolerance = tie_tolerance

    def decide(self, profile: RoundProfile) -> CutoffDecision:
        """The cutoff with the smallest predicted round time."""
        profile.check()
        times = [self.round_ms(profile, c) for c in range(profile.num_layers + 1)]
        best = min(times)
        cutoff = next(
            c for c, t in enumerate(times) if t <= best * (1 + self.tie_tolerance)
        )
        reason = (
            f"predicted round {times[cutoff]:.1f} ms at cutoff {cutoff} vs "
            f"{times[0]:.1f} ms without prefetch and {times[-1]:.1f} ms prefetching "
            f"all {profile.num_layers} layers (expert transfer {profile.fetch_ms:.2f} "
            f"ms, drafting {profile.num_draft_tokens * sum(profile.draft_layer_ms):.1f}"
            f" ms, cache {profile.capacity} experts)"
        )
        return CutoffDecision(cutoff, times, reason)

    def round_ms(self, profile: RoundProfile, cutoff: int) -> float:
        """Predicted time of one round when layers below ``cutoff`` are prefetched."""
        p = profile
        f = p.fetch_ms
        token_ms = sum(p.draft_layer_ms)
        drafting_ms = p.num_draft_tokens * token_ms
        queue = self._prefetch_transfers(p, cutoff, token_ms)

        link_free = 0.0
        held = 0.0  # prefetched experts occupying cache room
        held_by_layer = [0.0] * p.num_layers
        ready = [0.0] * p.num_layers  # when layer l's started prefetches are done
        useful_started = [0.0] * p.num_layers

        def serve(until: float, min_layer: int) -> None:
            # Start transfers before ``until``: of those already predicted,
            # the shallowest layer first, as the fetch thread does.
            nonlocal link_free, held
            queue[:] = [t for t in queue if t.layer >= min_layer]
            while queue:
                begin = max(link_free, min(t.known_ms for t in queue))
                t = min(
                    (t for t in queue if t.known_ms <= begin),
                    key=lambda t: (t.layer, t.known_ms),
                )
                if begin >= until or held + t.amount > p.capacity + 1e-9:
                    return
                queue.remove(t)
                link_free = begin + t.amount * f
                held += t.amount
                held_by_layer[t.layer] += t.amount
                ready[t.layer] = link_free
                useful_started[t.layer] += t.amount * t.useful

        now = drafting_ms
        for layer in range(p.num_layers):
            serve(now, layer)
            queue[:] = [t for t in queue if t.layer != layer]  # now demand misses
            demand = max(0.0, p.missing[layer] - useful_started[layer])
            start = max(now, ready[layer])
            if demand > 1e-9:
                link_free = max(start, link_free) + demand * f
                start = link_free
            now = start + p.verify_layer_ms[layer]
            held -= held_by_layer[layer]
        return now

    @staticmethod
    def _prefetch_transfers(
        p: RoundProfile, cutoff: int, token_ms: float
    ) -> list[_Transfer]:
        transfers = []
        for layer in range(min(cutoff, p.num_layers)):
            missing_share = p.missing[layer] / p.needed[layer] if p.needed[layer] else 1
            useful = p.recall[layer] * p.missing[layer]
            wrong = max(0.0, p.predicted[layer] - p.recall[layer] * p.needed[layer])
            amount = useful + wrong * missing_share
            if amount <= 0:
                continue
            # Predictions of a layer arrive with each drafted token.
            layer_ms = sum(p.draft_layer_ms[: layer + 1])
            chunk = amount / p.num_draft_tokens
            for j in range(p.num_draft_tokens):
                transfers.append(
                    _Transfer(layer, j * token_ms + layer_ms, chunk, useful / amount)
                )
        transfers.sort(key=lambda t: (t.layer, t.known_ms))
        return transfers
