"""Krylov solvers that count their cost the same way, with or without a callback.

Every solve runs through `KrylovSolver.solve`, which

1. wraps A in a `CountingOperator`, so matrix-vector products are counted by
   the operator itself (never inferred from a callback);
2. counts iterations with its own callback, always installed, so a user
   callback (given or not) changes neither the counts nor the solver's path
   (scipy's GMRES switches its meaning of ``maxiter`` with the callback type; the
   callback type here is always ``pr_norm``);
3. solves for the correction ``d`` of ``A d = b - A x0`` from zero, with the
   absolute threshold ``max(rtol ||b||, atol)``: the same iterates and the same
   stopping rule as starting the solver at ``x0`` on ``A x = b``, without the
   second product with ``x0`` scipy would spend recomputing the first residual;
4. checks the true residual ``||b - A x||`` against that threshold afterwards.
   ``converged`` is that check alone: a solver that claims convergence the true
   residual contradicts is reported as not converged (and logged).

Solvers: ``cg``, ``gmres`` (restarted, ``restart`` inner iterations per cycle;
``maxiter`` caps inner iterations, rounded up to whole cycles), ``bicgstab``, and ``amg-cg``: CG
preconditioned by one V-cycle of pyamg's smoothed-aggregation AMG (Vanek,
Mandel, Brezina 1996). For ``amg-cg`` only products with A made by CG are
counted; the V-cycle's own work shows in the time, and the hierarchy's setup
time is charged to every solve on that matrix (`KrylovSolver.setup_time_s`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyamg
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

logger = logging.getLogger(__name__)

SolverName = Literal["cg", "gmres", "bicgstab", "amg-cg"]
SOLVERS: tuple[str, ...] = ("cg", "gmres", "bicgstab", "amg-cg")
SYMMETRIC_SOLVERS = frozenset({"cg", "amg-cg"})


class CountingOperator(spla.LinearOperator):
    """A as a LinearOperator that counts every product with a vector."""

    def __init__(self, A: sp.spmatrix):
        super().__init__(dtype=A.dtype, shape=A.shape)
        self.A = A
        self.num_matvecs = 0

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        self.num_matvecs += 1
        return self.A @ x

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        self.num_matvecs += X.shape[1]
        return self.A @ X

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        self.num_matvecs += 1
        return self.A.T @ x


@dataclass
class SolveResult:
    """Outcome of one solve; cost counted from the operator and our own callback."""

    x: np.ndarray
    num_iterations: int
    num_matvecs: int
    residual_norm: float
    threshold: float
    converged: bool
    info: int
    time_s: float


def vector_norm(v: np.ndarray) -> float:
    """``||v||_2`` without overflow or underflow in the sum of squares.

    numpy's norm squares the entries, so a vector with entries beyond about
    1e154 gets an infinite norm (and a threshold of infinity would call any x
    converged); BLAS ``nrm2`` scales as it sums. It is used only where numpy's
    result is out of the safe range, so ordinary norms are numpy's to the bit.
    """
    with np.errstate(over="ignore", under="ignore"):
        value = float(np.linalg.norm(v))
    if math.isfinite(value) and (value > 1e-140 or value == 0.0):
        return value
    return float(scipy.linalg.norm(v, check_finite=False))


def threshold(b: np.ndarray, rtol: float, atol: float) -> float:
    """The stopping threshold ``max(rtol ||b||, atol)`` every solve uses."""
    return max(rtol * vector_norm(b), atol)


class KrylovSolver:
    """One solver with its stopping rule, prepared for one matrix.

    Args:
        A: (N, N) sparse matrix.
        solver: ``cg``, ``gmres``, ``bicgstab`` or ``amg-cg``.
        rtol: relative tolerance on ``||b - A x|| / ||b||``.
        atol: absolute tolerance; the threshold is ``max(rtol ||b||, atol)``.
        maxiter: cap on iterations (inner iterations for GMRES); None: 10 N.
        restart: GMRES inner iterations per restart cycle.
    """

    def __init__(
        self,
        A: sp.spmatrix,
        solver: str,
        *,
        rtol: float,
        atol: float = 0.0,
        maxiter: int | None = None,
        restart: int = 30,
    ):
        if solver not in SOLVERS:
            raise ValueError(
                f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}"
            )
        if rtol < 0 or atol < 0 or not (math.isfinite(rtol) and math.isfinite(atol)):
            raise ValueError(
                f"tolerances must be finite and >= 0 (got rtol={rtol}, atol={atol})"
            )
        if maxiter is not None and maxiter < 1:
            raise ValueError(f"maxiter must be >= 1 or None (10 N), got {maxiter}")
        if restart < 1:
            raise ValueError(f"restart must be >= 1 inner iterations, got {restart}")
        self.A = sp.csr_matrix(A)
        self.solver = solver
        self.rtol = rtol
        self.atol = atol
        self.maxiter = maxiter if maxiter is not None else 10 * A.shape[0]
        self.restart = restart
        self.preconditioner = None
        self.setup_time_s = 0.0
        if solver == "amg-cg":
            start = time.perf_counter()
            hierarchy = pyamg.smoothed_aggregation_solver(self.A)
            self.preconditioner = hierarchy.aspreconditioner(cycle="V")
            self.setup_time_s = time.perf_counter() - start

    def solve(
        self,
        b: np.ndarray,
        x0: np.ndarray | None = None,
        *,
        r0: np.ndarray | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> SolveResult:
        """Solve ``A x = b`` from ``x0`` (zero when None) to the stopping rule.

        Args:
            b: (N,) right-hand side.
            x0: (N,) initial guess, or None for zero.
            r0: ``b - A x0`` when the caller already computed (and counted) it.
            callback: called with the iteration number after each iteration.

        Returns:
            The solution with iterations, products with A, the true residual
            and whether it meets ``max(rtol ||b||, atol)``. The product the
            first residual needs (``x0`` given without ``r0``) is counted.
        """
        start = time.perf_counter()
        b = np.asarray(b, dtype=np.float64)
        thr = threshold(b, self.rtol, self.atol)
        op = CountingOperator(self.A)
        if x0 is None:
            x0, r0 = np.zeros_like(b), b.copy()
        elif r0 is None:
            r0 = b - op.matvec(x0)

        num_iterations = 0

        def count(_: object) -> None:
            nonlocal num_iterations
            num_iterations += 1
            if callback is not None:
                callback(num_iterations)

        info = 0
        if vector_norm(r0) <= thr:
            x = x0.copy()  # x0 already meets the tolerance: zero iterations
        else:
            d, info = self._run(op, r0, thr, count)
            x = x0 + d
        residual = vector_norm(b - self.A @ x)
        # an infinite threshold (b or atol not finite) proves nothing
        converged = bool(residual <= thr) and math.isfinite(thr)
        if info == 0 and not converged:
            logger.warning(
                "%s reported convergence but the true residual %.3e exceeds the "
                "threshold %.3e; reporting it as not converged",
                self.solver,
                residual,
                thr,
            )
        return SolveResult(
            x=x,
            num_iterations=num_iterations,
            num_matvecs=op.num_matvecs,
            residual_norm=residual,
            threshold=thr,
            converged=converged,
            info=int(info),
            time_s=time.perf_counter() - start + self.setup_time_s,
        )

    def _run(
        self,
        op: CountingOperator,
        rhs: np.ndarray,
        thr: float,
        count: Callable[[object], None],
    ) -> tuple[np.ndarray, int]:
        common = {"rtol": 0.0, "atol": thr, "callback": count}
        if self.solver in ("cg", "amg-cg"):
            return spla.cg(
                op, rhs, maxiter=self.maxiter, M=self.preconditioner, **common
            )
        if self.solver == "bicgstab":
            return spla.bicgstab(op, rhs, maxiter=self.maxiter, **common)
        num_cycles = max(1, math.ceil(self.maxiter / self.restart))
        return spla.gmres(
            op,
            rhs,
            restart=self.restart,
            maxiter=num_cycles,
            callback_type="pr_norm",
            **common,
        )
