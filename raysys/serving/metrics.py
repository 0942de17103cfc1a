"""What happened to each request, and the SLO numbers computed from it.

The simulator and the real front end both produce `RequestRecord` lists and
`FlipEvent` lists, summarised the same way by `summarize`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from raysys.serving.policy import SloTargets


@dataclass
class RequestRecord:
    """What happened to one request (times in seconds from the replay's start)."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefill_instance: int = -1
    decode_instance: int = -1
    first_token_s: float = math.nan
    finish_s: float = math.nan
    handoff: bool = False  # its KV moved between instances
    failed: bool = False
    error: str = ""
    num_retries: int = 0

    @property
    def ttft_s(self) -> float:
        """Time to first token."""
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for one-token
        outputs: they have no time per output token, so no TPOT to miss)."""
        if self.output_tokens <= 1:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def completed(self) -> bool:
        return not self.failed and math.isfinite(self.finish_s)

    def meets(self, slo: SloTargets) -> bool:
        """Completed within both the TTFT and the TPOT target."""
        return (
            self.completed
            and self.ttft_s <= slo.ttft_s
            and (self.tpot_s is None or self.tpot_s <= slo.tpot_s)
        )


@dataclass
class FlipEvent:
    """A role flip carried out at ``time_s``."""

    time_s: float
    instance_id: int
    from_role: str
    to_role: str
    reason: str


class RequestReport(BaseModel):
    """One request in a report."""

    model_config = ConfigDict(extra="forbid")

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    finish_s: float | None
    prefill_instance: int
    decode_instance: int
    handoff: bool
    met_slo: bool
    failed: bool
    error: str
    num_retries: int


class FlipReport(BaseModel):
    """One role flip in a report."""

    model_config = ConfigDict(extra="forbid")

    time_s: float
    instance_id: int
    from_role: str
    to_role: str
    reason: str


class SloSummary(BaseModel):
    """SLO attainment and latency percentiles over a set of requests."""

    model_config = ConfigDict(extra="forbid")

    num_requests: int
    num_completed: int
    num_failed: int
    slo_attainment: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    num_handoffs: int


def _percentile(values: Sequence[float | None], q: float) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.percentile(values, q)) if values else None


def summarize(records: Sequence[RequestRecord], slo: SloTargets) -> SloSummary:
    """Attainment (share of all requests that met both SLOs) and percentiles of
    the completed requests (TPOT of those with more than one output token)."""
    done = [r for r in records if r.completed]
    return SloSummary(
        num_requests=len(records),
        num_completed=len(done),
        num_failed=sum(r.failed for r in records),
        slo_attainment=(
            sum(r.meets(slo) for r in records) / len(records) if records else 0.0
        ),
        ttft_p50_s=_percentile([r.ttft_s for r in done], 50),
        ttft_p90_s=_percentile([r.ttft_s for r in done], 90),
        tpot_p50_s=_percentile([r.tpot_s for r in done], 50),
        tpot_p90_s=_percentile([r.tpot_s for r in done], 90),
        num_handoffs=sum(r.handoff for r in records),
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def request_reports(
    records: Sequence[RequestRecord], slo: SloTargets
) -> list[RequestReport]:
    """Per-request rows for a report."""
    return [
        RequestReport(
            request_id=r.request_id,
            arrival_s=r.arrival_s,
            prompt_tokens=r.prompt_tokens,
            output_tokens=r.output_tokens,
            ttft_s=_finite_or_none(r.ttft_s),
            tpot_s=(
                _finite_or_none(r.tpot_s)
                if r.completed and r.tpot_s is not None
                else None
            ),
            finish_s=_finite_or_none(r.finish_s),
            prefill_instance=r.prefill_instance,
            decode_instance=r.decode_instance,
            handoff=r.handoff,
            met_slo=r.meets(slo),
            failed=r.failed,
            error=r.error,
            num_retries=r.num_retries,
        )
        for r in records
    ]


def flip_reports(flips: Sequence[FlipEvent]) -> list[FlipReport]:
    return [
        FlipReport(
            time_s=f.time_s,
            instance_id=f.instance_id,
            from_role=f.from_role,
            to_role=f.to_role,
            reason=f.reason,
        )
        for f in flips
    ]
