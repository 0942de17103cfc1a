"""Warm-started solves: refine a guess, let the policy judge it, run the solver.

The solver itself is unchanged (`raysys.solvers.krylov`); only its x0 changes.
The same post-processing applies to every kind of guess (the neural operator's
prediction, the coarse-grid baseline and the zero guess), and all its work is
counted in units of one product with A:

- each Gauss-Seidel sweep on the guess counts as one product (a sweep reads
  every nonzero of A once, as a product does);
- the two-grid refinement (`TwoGridRefinement`) counts its real products with
  A (the residual, ``A d``) as one each, its sweeps as one each, and the
  restriction, the prolongation, the coarse factorisation and the coarse solve
  by their nonzeros or flops relative to ``nnz(A)``, rounded up to whole
  products (`RefinementCost`);
- the product ``A x0`` the policy needs counts as one, and its residual is
  handed to the solver, which therefore spends no second product on it; when
  the refinement ends with its own residual (no sweeps after the coarse
  correction), that residual is used and no product is spent.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from pyamg.relaxation.relaxation import gauss_seidel

from raysys.solvers.families import Instance, PDEFamily
from raysys.solvers.fields import interpolation_weights, resample
from raysys.solvers.krylov import KrylovSolver, SolveResult, threshold, vector_norm
from raysys.solvers.policy import (
    GuessMeasures,
    WarmStartDecision,
    WarmStartPolicy,
    WarmStartVerdict,
)

logger = logging.getLogger(__name__)


def smooth(
    A: sp.csr_matrix,
    x: np.ndarray,
    b: np.ndarray,
    num_sweeps: int,
    *,
    first: str = "forward",
) -> np.ndarray:
    """Gauss-Seidel sweeps on ``A x = b`` from ``x``, alternating direction.

    Sweeps damp the high-frequency error a neural operator leaves (the part A
    amplifies most), which Krylov methods reduce slowly. Alternating forward
    and backward sweeps keeps pairs of them symmetric. For SPD A every sweep
    lowers (never raises) the energy functional: each point update minimises
    it along its coordinate.

    Args:
        first: direction of the first sweep, ``forward`` or ``backward``.

    Returns:
        The smoothed copy of ``x``.
    """
    if first not in ("forward", "backward"):
        raise ValueError(f"first sweep must be 'forward' or 'backward', not {first!r}")
    other = "backward" if first == "forward" else "forward"
    x = np.array(x, dtype=np.float64, copy=True)
    for k in range(num_sweeps):
        gauss_seidel(A, x, b, iterations=1, sweep=first if k % 2 == 0 else other)
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


def prolongation(n: int, m: int) -> sp.csr_matrix:
    """(n*n, m*m) bilinear interpolation from the m x m to the n x n interior grid.

    Both grids are the interior nodes of the unit square (see
    `raysys.solvers.fields`); the boundary values are zero, so a fine node next
    to the boundary interpolates between its coarse neighbour and zero.
    """
    w = sp.csr_matrix(interpolation_weights(m, n, zero_boundary=True))  # (n, m)
    P = sp.csr_matrix(sp.kron(w, w, format="coo"))
    P.eliminate_zeros()  # nnz(P) enters the cost: no stored zeros
    return P


@functools.lru_cache(maxsize=16)
def _transfers(n: int, m: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """P and P' for the grid pair, shared by every instance (never modified)."""
    P = prolongation(n, m)
    return P, sp.csr_matrix(P.T)


@dataclass(frozen=True)
class RefinementSettings:
    """The two-grid refinement applied to every guess before the solve.

    Attributes:
        coarse_factor: the coarse grid is m x m with ``m = max(2, n // factor)``.
        num_pre_sweeps: Gauss-Seidel sweeps before the coarse-grid correction
            (alternating, the first forward).
        num_post_sweeps: sweeps after it (alternating, the first backward, so
            equal numbers before and after make the refinement symmetric).
        num_cycles: how many times the cycle is applied (the coarse matrix is
            factorised once).
    """

    coarse_factor: int = 4
    num_pre_sweeps: int = 3
    num_post_sweeps: int = 0
    num_cycles: int = 1

    def __post_init__(self) -> None:
        if self.coarse_factor < 2:
            raise ValueError(f"coarse_factor must be >= 2, got {self.coarse_factor}")
        if self.num_cycles < 1:
            raise ValueError(f"num_cycles must be >= 1, got {self.num_cycles}")
        if self.num_pre_sweeps < 0 or self.num_post_sweeps < 0:
            raise ValueError(
                "sweep counts must be >= 0, got "
                f"{self.num_pre_sweeps} and {self.num_post_sweeps}"
            )

    def coarse_size(self, n: int) -> int:
        """m of the m x m coarse grid for an n x n fine grid."""
        return max(2, n // self.coarse_factor)


@dataclass(frozen=True)
class RefinementCost:
    """The refinement's work in units of one product with A (``nnz(A)`` flops).

    Totals over all cycles.

    Attributes:
        num_sweeps: Gauss-Seidel sweeps, one unit each.
        num_products: real products with A at most (the residual of each
            cycle, ``A d``), one each; `TwoGridRefinement.refine` counts those
            it makes (a residual it already knows costs nothing).
        restriction: ``nnz(P) / nnz(A)`` for each cycle (R is P's transpose,
            scaled).
        prolongation: ``nnz(P) / nnz(A)`` for each cycle.
        coarse_factorisation: the LU's multiply-adds,
            ``sum_j nnz(L[:, j]) nnz(U[j, :])``, over ``nnz(A)``; once.
        coarse_solve: the triangular solves, ``(nnz(L) + nnz(U)) / nnz(A)`` for
            each cycle.
    """

    num_sweeps: int
    num_products: int
    restriction: float
    prolongation: float
    coarse_factorisation: float
    coarse_solve: float

    @property
    def fractional(self) -> float:
        """The transfer and coarse-grid work, in (fractional) products."""
        return (
            self.restriction
            + self.prolongation
            + self.coarse_factorisation
            + self.coarse_solve
        )

    @property
    def num_matvecs(self) -> int:
        """Sweeps + products + the fractional work rounded up."""
        return self.num_sweeps + self.num_products + math.ceil(self.fractional)


class TwoGridRefinement:
    """One two-grid cycle applied to a guess, prepared for one instance.

    ``x <- S_pre(x); r = b - A x; d = P Ac^-1 (P' r / s); x <- x + t d;
    x <- S_post(x)`` with

    - ``S``: Gauss-Seidel sweeps on the fine grid;
    - ``P``: bilinear interpolation from the m x m grid (`prolongation`), and
      ``P' r / s`` with ``s = ((n + 1) / (m + 1))^2`` the restriction (full
      weighting's row sums are 1, P's columns sum to about ``s``);
    - ``Ac``: the family's matrix *rediscretised* on the m x m grid (the
      instance's fields interpolated there), factorised once (SuperLU). A
      Galerkin ``P' A P`` is a better coarse operator but costs about twenty
      products to form at 64x64, more than it saves;
    - ``t``: the step that minimises what the solver minimises along ``d``:
      the energy functional for SPD A, ``t = d'r / d'Ad``, so the energy never
      rises; the residual norm otherwise, ``t = (Ad)'r / (Ad)'(Ad)``, so the
      residual never rises in that step. A zero or non-finite denominator
      gives ``t = 0``.

    The cycle is the same for every guess, the zero guess included, so the
    zero guess through it shows what the refinement does alone.

    Args:
        A: (N, N) fine matrix, N = n * n.
        coarse_A: (M, M) coarse matrix, M = m * m.
        n, m: fine and coarse grid sizes.
        symmetric: SPD A (energy step) or not (residual-minimising step).
        settings: sweep counts (``coarse_factor`` is already in ``m``).
    """

    def __init__(
        self,
        A: sp.spmatrix,
        coarse_A: sp.spmatrix,
        n: int,
        m: int,
        *,
        symmetric: bool,
        settings: RefinementSettings,
    ):
        start = time.perf_counter()
        self.A = A if sp.issparse(A) and A.format == "csr" else sp.csr_matrix(A)
        if self.A.shape != (n * n, n * n) or coarse_A.shape != (m * m, m * m):
            raise ValueError(
                f"matrices of shape {self.A.shape} and {coarse_A.shape} do not fit "
                f"grids of {n} x {n} and {m} x {m}"
            )
        self.n, self.m = n, m
        self.symmetric = symmetric
        self.settings = settings
        self.P, self.PT = _transfers(n, m)
        self.scale = ((n + 1) / (m + 1)) ** 2
        # a symmetric fill-reducing ordering for SPD matrices, COLAMD otherwise
        spec = "MMD_AT_PLUS_A" if symmetric else "COLAMD"
        self.lu = spla.splu(sp.csc_matrix(coarse_A), permc_spec=spec)
        # the work is done; what follows only measures it (not timed)
        self.setup_time_s = time.perf_counter() - start
        L, U = self.lu.L.tocsc(), self.lu.U.tocsr()
        flops = float(np.diff(L.indptr).astype(np.float64) @ np.diff(U.indptr))
        nnz = float(self.A.nnz)
        pre, post = settings.num_pre_sweeps, settings.num_post_sweeps
        cycles = settings.num_cycles
        self.cost = RefinementCost(
            num_sweeps=cycles * (pre + post),
            num_products=2 * cycles,
            restriction=cycles * self.P.nnz / nnz,
            prolongation=cycles * self.P.nnz / nnz,
            coarse_factorisation=flops / nnz,
            coarse_solve=cycles * (L.nnz + U.nnz) / nnz,
        )

    @classmethod
    def for_instance(
        cls,
        family: PDEFamily,
        inst: Instance,
        settings: RefinementSettings,
        A: sp.spmatrix | None = None,
    ) -> TwoGridRefinement:
        """The refinement of ``inst``: its fields rediscretised on the coarse grid.

        Args:
            A: the instance's assembled matrix, when the caller has it.
        """
        if A is None:
            A, _ = family.assemble(inst)
        start = time.perf_counter()
        n = inst.resolution
        m = settings.coarse_size(n)
        coarse_A, _ = family.assemble(family.resample(inst, m))
        assembly_s = time.perf_counter() - start
        out = cls(A, coarse_A, n, m, symmetric=family.symmetric, settings=settings)
        out.setup_time_s += assembly_s
        return out

    def correction(self, r: np.ndarray) -> np.ndarray:
        """The coarse-grid correction ``P Ac^-1 (P' r / s)`` of residual ``r``."""
        return self.P @ self.lu.solve(self.PT @ r / self.scale)

    def step(self, d: np.ndarray, Ad: np.ndarray, r: np.ndarray) -> float:
        """Step length along ``d`` (energy- or residual-minimising; 0 if undefined)."""
        if self.symmetric:
            num, den = float(d @ r), float(d @ Ad)
        else:
            num, den = float(Ad @ r), float(Ad @ Ad)
        if not (math.isfinite(num) and math.isfinite(den)) or den <= 0.0:
            return 0.0
        return num / den

    def refine(
        self, x: np.ndarray, b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Apply the cycle(s) to the guess ``x`` of ``A x = b``.

        Returns:
            The refined guess; its residual ``b - A x`` when that came for free
            (the last cycle has no post-sweeps; None otherwise); and the cost in
            products with A: the sweeps, the real products made, and the
            fractional work rounded up (`RefinementCost`). A residual is known
            without a product at the start when x is zero, and after a
            coarse-grid correction not followed by sweeps (``r - t A d``).
        """
        pre, post = self.settings.num_pre_sweeps, self.settings.num_post_sweeps
        x = np.array(x, dtype=np.float64, copy=True).ravel()
        num_products = 0
        r = None if x.any() else np.array(b, dtype=np.float64, copy=True)
        for _ in range(self.settings.num_cycles):
            if pre:
                x = smooth(self.A, x, b, pre, first="forward")
                r = None
            if r is None:
                r = b - self.A @ x
                num_products += 1
            d = self.correction(r)
            Ad = self.A @ d
            num_products += 1
            t = self.step(d, Ad, r)
            x += t * d
            r -= t * Ad
            if post:
                x = smooth(self.A, x, b, post, first="backward")
                r = None
        return (
            x,
            r,
            dataclasses.replace(self.cost, num_products=num_products).num_matvecs,
        )


@dataclass
class WarmSolveResult:
    """A warm-started solve with the policy's verdict and the full cost."""

    result: SolveResult
    verdict: WarmStartVerdict
    num_matvecs: int  # solver + post-processing (sweeps, refinement) + policy
    time_s: float  # post-processing, policy and solve (not producing the guess)
    num_matvecs_refinement: int = 0  # the refinement's or the sweeps' share

    @property
    def fallback(self) -> bool:
        """True when the guess was dropped for x0 = 0."""
        return self.verdict.decision.is_fallback


def measure_guess(
    A: sp.csr_matrix,
    b: np.ndarray,
    x0: np.ndarray,
    thr: float,
    symmetric: bool,
    r0: np.ndarray | None = None,
) -> tuple[GuessMeasures, np.ndarray]:
    """The policy's numbers for ``x0`` and its residual ``b - A x0``.

    Args:
        r0: the residual when the caller already has it; otherwise it is
            computed with one product.
    """
    finite = bool(np.isfinite(x0).all())
    if not finite:
        nan = float("nan")
        return GuessMeasures(False, nan, vector_norm(b), thr), b
    if r0 is None:
        r0 = b - A @ x0
    # J(x) = 1/2 x'Ax - b'x = -1/2 x'(b + r) with Ax = b - r
    energy = -0.5 * float(x0 @ (b + r0)) if symmetric else None
    measures = GuessMeasures(
        finite=bool(np.isfinite(r0).all()),
        residual_norm=vector_norm(r0),
        rhs_norm=vector_norm(b),
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
    refinement: TwoGridRefinement | None = None,
    name: str = "instance",
) -> WarmSolveResult:
    """Solve from ``guess`` (post-processed first), or from zero if the policy says so.

    Args:
        solver: the prepared solver with its stopping rule.
        b: (N,) right-hand side.
        guess: (N,) initial guess; None or non-finite entries fall back to zero.
        policy: decides between the guess and zero.
        num_smoothing_sweeps: Gauss-Seidel sweeps applied to the guess first
            (only without ``refinement``).
        refinement: the two-grid refinement applied to the guess first.
        name: the instance's name for log lines.
    """
    if refinement is not None and num_smoothing_sweeps:
        raise ValueError(
            "give either num_smoothing_sweeps or a refinement (which has its own "
            "sweeps), not both"
        )
    start = time.perf_counter()
    A = solver.A
    thr = threshold(b, solver.rtol, solver.atol)
    num_extra = 0
    r0 = None
    x0 = None if guess is None else np.asarray(guess, dtype=np.float64).ravel()
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(
            f"{name}: guess has {x0.size} entries, the system {b.size}; "
            "predict on the instance's own grid"
        )
    setup_time_s = 0.0
    if x0 is not None and np.isfinite(x0).all():
        if refinement is not None:
            x0, r0, num_extra = refinement.refine(x0, b)
            setup_time_s = refinement.setup_time_s
        elif num_smoothing_sweeps > 0:
            x0 = smooth(A, x0, b, num_smoothing_sweeps)
            num_extra = num_smoothing_sweeps
    num_post = num_extra

    if x0 is None:
        measures = GuessMeasures(False, float("nan"), vector_norm(b), thr)
        r0 = b
    else:
        had_residual = r0 is not None
        measures, r0 = measure_guess(A, b, x0, thr, policy.symmetric, r0)
        num_extra += int(measures.finite and not had_residual)
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
        time_s=time.perf_counter() - start + solver.setup_time_s + setup_time_s,
        num_matvecs_refinement=num_post,
    )
