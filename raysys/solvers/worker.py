"""Solve one instance cold and warm for every requested setting (a Ray task).

For each solver and tolerance the cold solve (x0 = 0) runs once; each guess
kind then gets its warm solve with the same solver and stopping rule:

- ``operator``: the neural operator's prediction, made in batches by the
  predictor actor and handed in;
- ``coarse-grid``: the classical baseline, a direct solve on a grid
  ``coarse_factor`` times coarser, interpolated to the instance's grid;
- ``zero``: x0 = 0 put through the same refinement, which shows what the
  refinement does by itself (only where a refinement applies).

Every guess gets the same post-processing: for CG the two-grid refinement
(`raysys.solvers.warmstart.TwoGridRefinement`, prepared once per instance and
charged in full to every warm solve), for GMRES and BiCGStab Gauss-Seidel
sweeps, then the policy. AMG-CG gets neither: every V-cycle of its
preconditioner already smooths and corrects on coarse grids, and its warm
start saves about one iteration, less than either costs.
A step that raises (a guess, a refinement, a solve) fails the results that
need it, with its error; the instance's other results, and what the failed
ones had already computed (their cold solve), are kept. What goes wrong before
any solve (the instance cannot be assembled) fails all of its results. Other
instances are not affected.

TODO: the results come back when the whole instance is done, so a worker
process that dies part-way (killed, out of memory) loses the solves it had
finished; streaming them back per setting would keep them.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import ray

from raysys.solvers.errors import InvalidInstance
from raysys.solvers.families import Instance, darcy_matrix, get_family
from raysys.solvers.krylov import SYMMETRIC_SOLVERS, KrylovSolver, SolveResult
from raysys.solvers.policy import WarmStartPolicy
from raysys.solvers.reports import InstanceResult
from raysys.solvers.warmstart import (
    RefinementSettings,
    TwoGridRefinement,
    WarmSolveResult,
    coarse_grid_guess,
    warm_solve,
)

logger = logging.getLogger(__name__)

GUESS_KINDS = ("operator", "coarse-grid", "zero")


@dataclass(frozen=True)
class SolveSettings:
    """What to run on every instance.

    Attributes:
        solvers: solver names (see `raysys.solvers.krylov.SOLVERS`).
        rtols: relative tolerances.
        atol: absolute tolerance (threshold ``max(rtol ||b||, atol)``).
        maxiter: iteration cap, None for the solver default (10 N).
        restart: GMRES restart length.
        num_smoothing_sweeps: Gauss-Seidel sweeps on every guess where no
            refinement applies (not for ``amg-cg``, whose V-cycles smooth).
        guesses: guess kinds to try (``operator``, ``coarse-grid``, ``zero``).
        coarse_factor: grid coarsening of the coarse-grid guess.
        refinement: the two-grid refinement of every guess for the solvers in
            ``refined_solvers`` (None: sweeps only, as for the others).
        refined_solvers: the solvers whose guesses get the refinement. By
            default CG only: AMG-CG needs 4 to 8 iterations, fewer products
            than the refinement costs; for GMRES and BiCGStab the refinement
            is correct (a residual-minimising step) but did not beat two
            sweeps on convection-diffusion.
    """

    solvers: tuple[str, ...] = ("cg",)
    rtols: tuple[float, ...] = (1e-5,)
    atol: float = 0.0
    maxiter: int | None = None
    restart: int = 30
    num_smoothing_sweeps: int = 2
    guesses: tuple[str, ...] = ("operator",)
    coarse_factor: int = 2
    refinement: RefinementSettings | None = RefinementSettings()
    refined_solvers: tuple[str, ...] = ("cg",)

    def __post_init__(self) -> None:
        # Refused here, not in every remote task that would build a solver.
        if self.maxiter is not None and self.maxiter < 1:
            raise ValueError(f"maxiter must be >= 1 or None (10 N), got {self.maxiter}")
        if self.restart < 1:
            raise ValueError(
                f"restart must be >= 1 inner iterations, got {self.restart}"
            )

    def refinement_for(self, solver: str) -> RefinementSettings | None:
        """The refinement of the guesses for ``solver`` (None: none)."""
        return self.refinement if solver in self.refined_solvers else None

    def sweeps_for(self, solver: str) -> int:
        """Plain Gauss-Seidel sweeps on the guess for ``solver``.

        None for AMG-CG, and none where the refinement (with its own sweeps)
        applies.
        """
        if solver == "amg-cg" or self.refinement_for(solver) is not None:
            return 0
        return self.num_smoothing_sweeps

    def guesses_for(self, solver: str) -> tuple[str, ...]:
        """The guess kinds run for ``solver``: ``zero`` only with a refinement."""
        refined = self.refinement_for(solver) is not None
        return tuple(g for g in self.guesses if g != "zero" or refined)


def failed_results(
    name: str, settings: SolveSettings, error: str, resolution: int | None = None
) -> list[InstanceResult]:
    """One result with ``error`` for each setting the instance would have had."""
    return [
        InstanceResult(
            name=name,
            resolution=resolution,
            solver=solver,
            rtol=rtol,
            guess=guess,
            error=error,
        )
        for solver in settings.solvers
        for rtol in settings.rtols
        for guess in settings.guesses_for(solver)
    ]


def check_solver_fits(family_name: str, solver: str) -> None:
    """CG needs a symmetric positive definite matrix.

    Raises:
        InvalidInstance: the solver is CG-based and the family is not symmetric.
    """
    if solver in SYMMETRIC_SOLVERS and not get_family(family_name).symmetric:
        raise InvalidInstance(
            f"solver {solver!r} needs a symmetric positive definite matrix and "
            f"family {family_name!r} is non-symmetric; use gmres or bicgstab"
        )


_WARMED_UP: set[str] = set()


def warm_up(solvers: tuple[str, ...]) -> None:
    """Run each solver once on a tiny system so timings exclude first-call costs.

    The first call of a solver in a fresh worker process pays for lazy imports
    and caches; left in, it would land on whichever solve is timed first.
    """
    for name in solvers:
        if name in _WARMED_UP:
            continue
        A = darcy_matrix(np.ones((6, 6)))
        b = np.ones(A.shape[0])
        solver = KrylovSolver(A, name, rtol=1e-8)
        guess = 0.5 * solver.solve(b).x
        warm_solve(solver, b, guess, WarmStartPolicy(True), num_smoothing_sweeps=1)
        refinement = TwoGridRefinement(
            A,
            darcy_matrix(np.ones((3, 3))),
            6,
            3,
            symmetric=True,
            settings=RefinementSettings(coarse_factor=2),
        )
        warm_solve(solver, b, guess, WarmStartPolicy(True), refinement=refinement)
        _WARMED_UP.add(name)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _result(
    inst: Instance,
    solver: str,
    rtol: float,
    guess: str,
    cold: SolveResult | None,
    warm: WarmSolveResult | None = None,
    guess_time_s: float | None = None,
    error: str | None = None,
) -> InstanceResult:
    """One result: the cold solve's numbers when it ran, the warm one's likewise."""
    numbers: dict[str, object] = {}
    if cold is not None:
        numbers |= dict(
            iterations_cold=cold.num_iterations,
            matvecs_cold=cold.num_matvecs,
            time_cold_s=cold.time_s,
            residual_cold=cold.residual_norm,
            threshold=cold.threshold,
            converged_cold=cold.converged,
        )
    if warm is not None:
        numbers |= dict(
            iterations_warm=warm.result.num_iterations,
            matvecs_warm=warm.num_matvecs,
            matvecs_refinement=warm.num_matvecs_refinement,
            time_warm_s=warm.time_s,
            time_guess_s=guess_time_s,
            residual_warm=warm.result.residual_norm,
            converged_warm=warm.result.converged,
            fallback=warm.fallback,
            decision=warm.verdict.decision.value,
        )
    return InstanceResult(
        name=inst.name,
        resolution=inst.resolution,
        solver=solver,
        rtol=rtol,
        guess=guess,
        error=error,
        **numbers,
    )


def solve_instance(
    inst: Instance,
    operator_guess: np.ndarray | None,
    operator_time_s: float,
    settings: SolveSettings,
    operator_error: str | None = None,
) -> list[InstanceResult]:
    """Cold and warm solves of ``inst`` for every setting (no Ray).

    A step that raises fails the results that need it and no others, which
    keep what they computed: a cold solve that raises fails its solver and
    tolerance; a guess that cannot be made, a refinement that cannot be
    prepared or a warm solve that raises fails those warm solves, whose results
    keep their cold solve's numbers; a solver whose setup raises fails that
    solver's results.

    Args:
        operator_guess: (n, n) prediction, or None when no operator guess is
            asked for (or none is given: the policy then falls back to zero).
        operator_time_s: this instance's share of the batched inference time.
        operator_error: why there is no operator guess (its prediction
            failed); the operator's warm solves are then not run and their
            results carry this error, with their cold solves.

    Raises:
        InvalidInstance: the instance cannot be assembled, or a solver does
            not fit its family.
        ValueError: an unknown guess kind.
    """
    for kind in settings.guesses:
        if kind not in GUESS_KINDS:
            raise ValueError(f"unknown guess kind {kind!r}; use {GUESS_KINDS}")
    for solver_name in settings.solvers:
        check_solver_fits(inst.family, solver_name)
    fam = get_family(inst.family)
    A, b = fam.assemble(inst)
    n = inst.resolution
    warm_up(settings.solvers)

    def failed(what: str, where: str, e: Exception) -> str:
        error = f"{what} failed: {_describe(e)}"
        logger.warning("instance %s (%s): %s", inst.name, where, error)
        return error

    # each guess, or why there is none
    guesses: dict[str, tuple[np.ndarray | None, float]] = {}
    guess_errors: dict[str, str] = {}
    for kind in settings.guesses:
        if kind == "operator":
            if operator_error is not None:
                guess_errors[kind] = f"no operator guess: {operator_error}"
            else:
                guess = None if operator_guess is None else operator_guess.ravel()
                guesses[kind] = (guess, operator_time_s)
        elif kind == "coarse-grid":
            start = time.perf_counter()
            try:
                guess = coarse_grid_guess(fam, inst, settings.coarse_factor)
            except Exception as e:
                guess_errors[kind] = failed("coarse-grid guess", kind, e)
                continue
            guesses[kind] = (guess, time.perf_counter() - start)
        else:  # zero
            guesses[kind] = (np.zeros(n * n), 0.0)

    # one refinement per instance (built when first needed), its setup charged
    # to every warm solve that uses it
    refinement: TwoGridRefinement | None = None
    refinement_error: str | None = None
    results = []
    for solver_name in settings.solvers:
        kinds = settings.guesses_for(solver_name)
        try:
            base = KrylovSolver(
                A,
                solver_name,
                rtol=settings.rtols[0],
                atol=settings.atol,
                maxiter=settings.maxiter,
                restart=settings.restart,
            )
        except Exception as e:
            error = failed("solver setup", solver_name, e)
            results += [
                _result(inst, solver_name, rtol, kind, None, error=error)
                for rtol in settings.rtols
                for kind in kinds
            ]
            continue
        policy = WarmStartPolicy(symmetric=solver_name in SYMMETRIC_SOLVERS)
        num_sweeps = settings.sweeps_for(solver_name)
        refine = settings.refinement_for(solver_name)
        if refine is not None and refinement is None and refinement_error is None:
            try:
                refinement = TwoGridRefinement.for_instance(fam, inst, refine, A)
            except Exception as e:
                refinement_error = failed("refinement setup", solver_name, e)
        for rtol in settings.rtols:
            solver = copy.copy(base)  # shares the AMG hierarchy
            solver.rtol = rtol
            try:
                cold = solver.solve(b)
            except Exception as e:
                error = failed("cold solve", f"{solver_name}, rtol {rtol:g}", e)
                results += [
                    _result(inst, solver_name, rtol, kind, None, error=error)
                    for kind in kinds
                ]
                continue
            for kind in kinds:
                error = guess_errors.get(kind)
                if error is None and refine is not None:
                    error = refinement_error
                if error is not None:
                    results.append(
                        _result(inst, solver_name, rtol, kind, cold, error=error)
                    )
                    continue
                guess, guess_time_s = guesses[kind]
                label = f"{solver_name}, rtol {rtol:g}, {kind}"
                try:
                    warm = warm_solve(
                        solver,
                        b,
                        guess,
                        policy,
                        num_smoothing_sweeps=num_sweeps,
                        refinement=refinement if refine is not None else None,
                        name=f"{inst.name} ({label})",
                    )
                except Exception as e:
                    error = failed("warm solve", label, e)
                    results.append(
                        _result(inst, solver_name, rtol, kind, cold, error=error)
                    )
                    continue
                results.append(
                    _result(inst, solver_name, rtol, kind, cold, warm, guess_time_s)
                )
    return results


@ray.remote(num_cpus=1, max_retries=0)
def solve_instance_task(
    inst: Instance,
    prediction: tuple[np.ndarray, float] | None,
    index: int,
    settings: SolveSettings,
    operator_error: str | None = None,
) -> list[InstanceResult]:
    """`solve_instance` as a Ray task; a failure before any solve fails them all.

    Args:
        prediction: (predictions (B, n, n), batch inference seconds) of the batch
            holding this instance, or None.
        index: the instance's row in that batch.
        operator_error: why there is no prediction (see `solve_instance`).
    """
    guess, guess_time_s = None, 0.0
    if prediction is not None:
        batch, elapsed_s = prediction
        guess, guess_time_s = batch[index], elapsed_s / len(batch)
    try:
        return solve_instance(inst, guess, guess_time_s, settings, operator_error)
    except Exception as e:  # one instance's failure must not stop the others
        logger.warning("instance %s failed: %s", inst.name, e)
        return failed_results(inst.name, settings, _describe(e), inst.resolution)
