"""Warm-started solves: smooth a guess, let the policy judge it, run the solver.

The solver itself is unchanged (`raysys.solvers.krylov`); only its x0 changes.
The same post-processing applies to every kind of guess (the neural operator's
prediction and the coarse-grid baseline), and all its work is counted:

- each Gauss-Seidel sweep on the guess counts as one product with A (a sweep
  reads every nonzero of A once, as a product does);
- the product ``A x0`` the policy needs counts as one, and its residual is
  handed to the solver, which therefore spends no second product on it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from pyamg.relaxation.relaxation import gauss_seidel

from raysys.solvers.families import Instance, PDEFamily
from raysys.solvers.fields import resample
from raysys.solvers.krylov import KrylovSolver, SolveResult, threshold
from raysys.solvers.policy import (
    GuessMeasures,
    WarmStartDecision,
    WarmStartPolicy,
    WarmStartVerdict,
)

logger = logging.getLogger(__name__)


def smooth(
    A: sp.csr_matrix, x: np.ndarray, b: np.ndarray, num_sweeps: int
) -> np.ndarray:
    """Gauss-Seidel sweeps on ``A x = b`` from ``x``, alternating direction.

    Sweeps damp the high-frequency error a neural operator leaves (the part A
    amplifies most), which Krylov methods reduce slowly. Alternating forward
    and backward sweeps keeps pairs of them symmetric.

    Returns:
        The smoothed copy of ``x``.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    for k in range(num_sweeps):
        gauss_seidel(
            A, x, b, iterations=1, sweep="forward" if k % 2 == 0 else "backward"
        )
    return x


def coarse_grid_guess(family: PDEFamily, inst: Instance, factor: int) -> np.ndarray:
    """The classical baseline guess: solve on a coarser grid, interpolate back.

    The instance's fields are interpolated to an m x m grid with
    ``m = max(2, n // factor)``, that system is solved directly (SuperLU), and
    the solution is interpolated bilinearly to the n x n grid.

    Returns:
        (n * n,) guess.
    """
    n = inst.resolution
    m = max(2, n // factor)
    coarse = family.resample(inst, m)
    A, b = family.assemble(coarse)
    u = spla.splu(A.tocsc()).solve(b).reshape(m, m)
    return resample(u, n, zero_boundary=True).ravel()


@dataclass
class WarmSolveResult:
    """A warm-started solve with the policy's verdict and the full cost."""

    result: SolveResult
    verdict: WarmStartVerdict
    num_matvecs: int  # solver products + smoothing sweeps + the policy's product
    time_s: float  # smoothing, policy and solve (not producing the guess)

    @property
    def fallback(self) -> bool:
        """True when the guess was dropped for x0 = 0."""
        return self.verdict.decision.is_fallback


def measure_guess(
    A: sp.csr_matrix, b: np.ndarray, x0: np.ndarray, thr: float, symmetric: bool
) -> tuple[GuessMeasures, np.ndarray]:
    """The policy's numbers for ``x0`` and its residual ``b - A x0`` (one product)."""
    finite = bool(np.isfinite(x0).all())
    if not finite:
        nan = float("nan")
        return GuessMeasures(False, nan, float(np.linalg.norm(b)), thr), b
    Ax0 = A @ x0
    r0 = b - Ax0
    energy = 0.5 * float(x0 @ Ax0) - float(b @ x0) if symmetric else None
    measures = GuessMeasures(
        finite=True,
        residual_norm=float(np.linalg.norm(r0)),
        rhs_norm=float(np.linalg.norm(b)),
        threshold=thr,
        energy=energy,
    )
    return measures, r0


def warm_solve(
    solver: KrylovSolver,
    b: np.ndarray,
    guess: np.ndarray | None,
    policy: WarmStartPolicy,
    *,
    num_smoothing_sweeps: int = 0,
    name: str = "instance",
) -> WarmSolveResult:
    """Solve from ``guess`` (smoothed first), or from zero when the policy says so.

    Args:
        solver: the prepared solver with its stopping rule.
        b: (N,) right-hand side.
        guess: (N,) initial guess; None or non-finite entries fall back to zero.
        policy: decides between the guess and zero.
        num_smoothing_sweeps: Gauss-Seidel sweeps applied to the guess first.
        name: the instance's name for log lines.
    """
    start = time.perf_counter()
    A = solver.A
    thr = threshold(b, solver.rtol, solver.atol)
    num_extra = 0
    x0 = None if guess is None else np.asarray(guess, dtype=np.float64).ravel()
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(
            f"{name}: guess has {x0.size} entries, the system {b.size}; "
            "predict on the instance's own grid"
        )
    if x0 is not None and np.isfinite(x0).all() and num_smoothing_sweeps > 0:
        x0 = smooth(A, x0, b, num_smoothing_sweeps)
        num_extra += num_smoothing_sweeps

    if x0 is None:
        measures = GuessMeasures(False, float("nan"), float(np.linalg.norm(b)), thr)
        r0 = b
    else:
        measures, r0 = measure_guess(A, b, x0, thr, policy.symmetric)
        num_extra += int(measures.finite)
    verdict = policy.decide(measures)

    if verdict.decision.is_fallback:
        logger.info("%s: falling back to x0 = 0: %s", name, verdict.reason)
        result = solver.solve(b)
    else:
        if verdict.decision is WarmStartDecision.ALREADY_CONVERGED:
            logger.info("%s: no iterations needed: %s", name, verdict.reason)
        result = solver.solve(b, x0, r0=r0)  # zero iterations when converged
    return WarmSolveResult(
        result=result,
        verdict=verdict,
        num_matvecs=result.num_matvecs + num_extra,
        time_s=time.perf_counter() - start + solver.setup_time_s,
    )
