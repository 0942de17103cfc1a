"""Reports of the NOWS jobs: per-instance results, summaries, benchmark records."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raysys.runtime import Report


class InstanceResult(BaseModel):
    """One instance solved cold (x0 = 0) and warm (x0 = a guess), same stopping rule.

    ``matvecs_warm`` includes the post-processing of the guess (the two-grid
    refinement or the smoothing sweeps, in units of one product with A; that
    share alone is ``matvecs_refinement``) and the product the warm-start
    policy needs; ``time_warm_s`` includes post-processing (with the
    refinement's setup), policy and solve; producing the guess (inference
    share, coarse solve) is ``time_guess_s``.

    A result with ``error`` failed. When its cold solve ran and only the warm
    side failed (no guess could be made, for instance because the operator's
    prediction failed, or the warm solve raised), it keeps the cold solve's
    numbers (``iterations_cold``, ``matvecs_cold``, ``time_cold_s``,
    ``residual_cold``, ``threshold``, ``converged_cold``) and has no warm
    ones; otherwise (refused, timed out, the cold solve failed) it has no
    numbers. `ok` and `summarise` count only results without an error.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    resolution: int | None = None
    solver: str
    rtol: float
    guess: str = "operator"
    iterations_cold: int | None = None
    iterations_warm: int | None = None
    matvecs_cold: int | None = None
    matvecs_warm: int | None = None
    matvecs_refinement: int | None = None
    time_cold_s: float | None = None
    time_warm_s: float | None = None
    time_guess_s: float | None = None
    residual_cold: float | None = None
    residual_warm: float | None = None
    threshold: float | None = None
    converged_cold: bool | None = None
    converged_warm: bool | None = None
    fallback: bool | None = None
    decision: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the instance was solved (with or without convergence)."""
        return self.error is None


class SolveSummary(BaseModel):
    """Totals over the instances of one (solver, rtol, guess) setting."""

    model_config = ConfigDict(extra="forbid")

    num_instances: int
    num_failed: int
    num_fallbacks: int
    num_converged_cold: int
    num_converged_warm: int
    median_matvec_reduction: float | None = Field(
        description="median over solved instances of 1 - matvecs_warm / matvecs_cold"
    )
    time_reduction: float | None = Field(
        description="1 - (total warm time + total guess time) / total cold time"
    )
    time_reduction_without_guess: float | None = Field(
        None,
        description="1 - total warm time / total cold time: the saving when the "
        "guess comes for free (a GPU's inference, or amortised)",
    )
    median_iterations_cold: float | None = None
    median_iterations_warm: float | None = None
    total_time_cold_s: float = 0.0
    total_time_warm_s: float = 0.0
    total_time_guess_s: float = 0.0


def summarise(results: Sequence[InstanceResult]) -> SolveSummary:
    """Summary of ``results`` (all of one solver, rtol and guess kind).

    A result with an error counts as failed, even one that kept its cold solve.
    """
    done = [r for r in results if r.ok]
    reductions = [
        1.0 - r.matvecs_warm / r.matvecs_cold
        for r in done
        if r.matvecs_cold  # a cold solve with zero products has nothing to reduce
    ]
    cold = sum(r.time_cold_s for r in done)
    warm = sum(r.time_warm_s for r in done)
    guess = sum(r.time_guess_s or 0.0 for r in done)
    return SolveSummary(
        num_instances=len(results),
        num_failed=len(results) - len(done),
        num_fallbacks=sum(bool(r.fallback) for r in done),
        num_converged_cold=sum(bool(r.converged_cold) for r in done),
        num_converged_warm=sum(bool(r.converged_warm) for r in done),
        median_matvec_reduction=statistics.median(reductions) if reductions else None,
        time_reduction=1.0 - (warm + guess) / cold if cold > 0 else None,
        time_reduction_without_guess=1.0 - warm / cold if cold > 0 else None,
        median_iterations_cold=(
            statistics.median(r.iterations_cold for r in done) if done else None
        ),
        median_iterations_warm=(
            statistics.median(r.iterations_warm for r in done) if done else None
        ),
        total_time_cold_s=cold,
        total_time_warm_s=warm,
        total_time_guess_s=guess,
    )


class SolveReport(Report):
    """Report of ``jobs/nows_solve.py``."""

    config: dict[str, Any]
    model: str | None
    family: str
    solver: str
    rtol: float
    atol: float
    num_smoothing_sweeps: int
    refinement: dict[str, int] | None = None
    instances: list[InstanceResult]
    summary: SolveSummary
    inference_time_s: float
    wall_time_s: float


class TrainReport(Report):
    """Report of ``jobs/nows_train.py``, also stored in the model's config metadata."""

    config: dict[str, Any]
    family: str
    resolution: int
    num_train: int
    num_test: int
    num_parameters: int
    num_epochs: int
    train_time_s: float
    train_relative_l2: float
    test_relative_l2: float
    train_relative_energy: float | None = None
    test_relative_energy: float | None = None
    epoch_losses: list[float]
    epoch_test_relative_l2: list[float]
    model_dir: str


class BenchRecord(BaseModel):
    """One line of the benchmark: a resolution, solver, tolerance and guess kind."""

    model_config = ConfigDict(extra="forbid")

    resolution: int
    solver: str
    rtol: float
    guess: str
    median_matvec_reduction: float | None
    time_reduction: float | None
    time_reduction_without_guess: float | None
    num_instances: int
    num_failed: int
    num_fallbacks: int
    num_converged_warm: int
    num_converged_cold: int
    median_iterations_cold: float | None
    median_iterations_warm: float | None
    median_matvecs_cold: float | None
    median_matvecs_warm: float | None
    median_matvecs_refinement: float | None = None
    time_guess_per_instance_s: float | None


class ThroughputRecord(BaseModel):
    """Cold+warm solves per second with a given number of concurrent workers."""

    model_config = ConfigDict(extra="forbid")

    resolution: int
    num_workers: int
    num_solves: int
    solves_per_s: float


class BenchReport(Report):
    """Report of ``jobs/bench_nows.py``."""

    config: dict[str, Any]
    model: str
    results: list[BenchRecord]
    throughput: list[ThroughputRecord]
    relative_energy_error: dict[str, float]
    wall_time_s: float
    errors: list[str] = Field(
        default_factory=list, description="runs that failed, one line each"
    )
