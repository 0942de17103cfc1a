"""The two-grid refinement of guesses, checked against values computed by hand."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from raysys.solvers.families import ConvectionDiffusionFamily, DarcyFamily, Instance
from raysys.solvers.krylov import KrylovSolver
from raysys.solvers.policy import WarmStartDecision, WarmStartPolicy
from raysys.solvers.warmstart import (
    RefinementSettings,
    TwoGridRefinement,
    prolongation,
    warm_solve,
)


def energy(A, b, x):
    """J(x) = 1/2 x'Ax - b'x, directly."""
    return 0.5 * float(x @ (A @ x)) - float(b @ x)


def hat_prolongation(n, m):
    """Bilinear interpolation written with hat functions, densely."""
    fine = (np.arange(n) + 1) / (n + 1)
    coarse = (np.arange(m) + 1) / (m + 1)
    w = np.maximum(0.0, 1.0 - np.abs(fine[:, None] - coarse[None, :]) * (m + 1))
    P = np.zeros((n * n, m * m))
    for i in range(n):
        for j in range(n):
            for k in range(m):
                for l in range(m):  # noqa: E741
                    P[i * n + j, k * m + l] = w[i, k] * w[j, l]
    return P


def gauss_seidel_by_hand(A, x, b, forward):
    A = A.toarray()
    x = x.copy()
    order = range(len(b)) if forward else reversed(range(len(b)))
    for i in order:
        x[i] = (b[i] - A[i] @ x + A[i, i] * x[i]) / A[i, i]
    return x


@pytest.fixture(scope="module")
def tiny():
    """A 6x6 Darcy instance (36 unknowns) and its 3x3 coarse version."""
    fam = DarcyFamily()
    inst = fam.sample(np.random.default_rng(3), 6, "tiny")
    A, b = fam.assemble(inst)
    coarse_A, _ = fam.assemble(fam.resample(inst, 3))
    return fam, inst, A, b, coarse_A


@pytest.fixture(scope="module")
def darcy():
    fam = DarcyFamily()
    inst = fam.sample(np.random.default_rng(11), 32, "d")
    A, b = fam.assemble(inst)
    return fam, inst, A, b, spla.spsolve(A.tocsc(), b)


def test_prolongation_is_bilinear_interpolation_with_zero_boundary():
    for n, m in ((6, 3), (9, 4), (16, 4)):
        P = prolongation(n, m)
        assert P.shape == (n * n, m * m)
        np.testing.assert_allclose(P.toarray(), hat_prolongation(n, m), atol=1e-14)


def test_zero_guess_refinement_equals_the_cycle_written_out(tiny):
    _, _, A, b, coarse_A = tiny
    settings = RefinementSettings(
        coarse_factor=2, num_pre_sweeps=2, num_post_sweeps=1, num_cycles=1
    )
    refinement = TwoGridRefinement(A, coarse_A, 6, 3, symmetric=True, settings=settings)
    x, r, _ = refinement.refine(np.zeros(36), b)
    assert r is None  # a post-sweep follows the correction

    # by hand: forward then backward sweep, coarse correction with the
    # hat-function P and a dense coarse solve, energy step, one backward sweep
    y = gauss_seidel_by_hand(A, np.zeros(36), b, forward=True)
    y = gauss_seidel_by_hand(A, y, b, forward=False)
    res = b - A.toarray() @ y
    P = hat_prolongation(6, 3)
    d = P @ np.linalg.solve(coarse_A.toarray(), P.T @ res / (7 / 4) ** 2)
    t = (d @ res) / (d @ (A.toarray() @ d))
    y = gauss_seidel_by_hand(A, y + t * d, b, forward=False)
    np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_matvec_accounting_equals_a_hand_count(tiny):
    _, _, A, b, coarse_A = tiny
    settings = RefinementSettings(
        coarse_factor=2, num_pre_sweeps=1, num_post_sweeps=1, num_cycles=2
    )
    refinement = TwoGridRefinement(A, coarse_A, 6, 3, symmetric=True, settings=settings)
    nnz_A = 6 * 6 * 5 - 4 * 6  # five-point stencil less the boundary neighbours
    assert A.nnz == nnz_A
    # P: a fine node with fine index i in 0..5 sees coarse nodes within one
    # coarse spacing (1/4): positions (i + 1) / 7 against (k + 1) / 4
    per_axis = [
        sum(abs((i + 1) / 7 - (k + 1) / 4) < 1 / 4 for k in range(3)) for i in range(6)
    ]
    nnz_P = sum(a * c for a in per_axis for c in per_axis)
    assert refinement.P.nnz == nnz_P
    lu = spla.splu(coarse_A.tocsc(), permc_spec="MMD_AT_PLUS_A")
    L, U = lu.L.toarray(), lu.U.toarray()
    nnz_L, nnz_U = np.count_nonzero(L), np.count_nonzero(U)
    flops = sum(np.count_nonzero(L[:, j]) * np.count_nonzero(U[j, :]) for j in range(9))
    cost = refinement.cost
    assert cost.restriction == pytest.approx(2 * nnz_P / nnz_A)  # two cycles
    assert cost.prolongation == pytest.approx(2 * nnz_P / nnz_A)
    assert cost.coarse_solve == pytest.approx(2 * (nnz_L + nnz_U) / nnz_A)
    assert cost.coarse_factorisation == pytest.approx(flops / nnz_A)  # once
    fractional = (4 * nnz_P + 2 * (nnz_L + nnz_U) + flops) / nnz_A
    # per cycle: 2 sweeps, the residual and A d
    by_hand = 2 * (1 + 1) + 2 * 2 + math.ceil(fractional)
    rng = np.random.default_rng(0)
    _, r, counted = refinement.refine(rng.standard_normal(36), b)
    assert r is None and counted == by_hand
    # and through warm_solve: plus the policy's product and one per iteration
    solver = KrylovSolver(A, "cg", rtol=1e-8)
    warm = warm_solve(
        solver, b, rng.standard_normal(36), WarmStartPolicy(True), refinement=refinement
    )
    assert warm.num_matvecs_refinement == by_hand
    assert warm.num_matvecs == by_hand + 1 + warm.result.num_iterations


def test_refinement_without_post_sweeps_hands_its_residual_to_the_solver(tiny):
    _, _, A, b, coarse_A = tiny
    settings = RefinementSettings(coarse_factor=2, num_pre_sweeps=0, num_post_sweeps=0)
    refinement = TwoGridRefinement(A, coarse_A, 6, 3, symmetric=True, settings=settings)
    x, r, counted = refinement.refine(np.zeros(36), b)
    np.testing.assert_allclose(r, b - A @ x, atol=1e-10)
    # from zero without sweeps the residual is b: only A d is a product
    assert counted == 1 + math.ceil(refinement.cost.fractional)
    solver = KrylovSolver(A, "cg", rtol=1e-8)
    warm = warm_solve(
        solver, b, np.zeros(36), WarmStartPolicy(True), refinement=refinement
    )
    assert warm.verdict.decision is WarmStartDecision.USE_GUESS
    assert warm.num_matvecs == counted + warm.result.num_iterations
    assert warm.result.converged


@pytest.mark.parametrize(
    "settings",
    [
        RefinementSettings(),
        RefinementSettings(coarse_factor=2, num_pre_sweeps=0, num_post_sweeps=0),
        RefinementSettings(coarse_factor=8, num_pre_sweeps=1, num_post_sweeps=2),
        RefinementSettings(coarse_factor=4, num_cycles=3),
    ],
)
def test_refinement_never_raises_the_energy_functional(darcy, settings):
    fam, inst, A, b, x_star = darcy
    rng = np.random.default_rng(5)
    refinement = TwoGridRefinement.for_instance(fam, inst, settings, A)
    guesses = [
        np.zeros_like(b),
        x_star * (1 + 0.05 * rng.standard_normal(b.shape)),
        x_star + 1e-3 * rng.standard_normal(b.shape),  # rough error
        2.5 * x_star,  # worse than zero
        -x_star,
        rng.standard_normal(b.shape),
    ]
    for x in guesses:
        refined, _, _ = refinement.refine(x, b)
        assert energy(A, b, refined) <= energy(A, b, x) + 1e-12 * abs(energy(A, b, x))
        # the error in the A-norm does not grow either (J - J* = ||e||_A^2 / 2)
        e0, e1 = x - x_star, refined - x_star
        assert e1 @ (A @ e1) <= e0 @ (A @ e0) * (1 + 1e-12)


def test_energy_step_is_the_minimiser_along_the_correction(darcy):
    fam, inst, A, b, x_star = darcy
    settings = RefinementSettings(num_pre_sweeps=1, num_post_sweeps=0)
    refinement = TwoGridRefinement.for_instance(fam, inst, settings, A)
    x = x_star * 0.9
    r = b - A @ x
    d = refinement.correction(r)
    t = refinement.step(d, A @ d, r)
    values = [energy(A, b, x + s * d) for s in (t - 1e-3, t, t + 1e-3)]
    assert values[1] < values[0] and values[1] < values[2]
    assert refinement.step(np.zeros_like(b), np.zeros_like(b), r) == 0.0


def test_residual_step_for_non_symmetric_systems_never_raises_the_residual():
    fam = ConvectionDiffusionFamily()
    inst = fam.sample(np.random.default_rng(4), 24, "cd")
    A, b = fam.assemble(inst)
    settings = RefinementSettings(num_pre_sweeps=0, num_post_sweeps=0)
    refinement = TwoGridRefinement.for_instance(fam, inst, settings, A)
    assert not refinement.symmetric
    rng = np.random.default_rng(1)
    x_star = spla.spsolve(A.tocsc(), b)
    for x in (np.zeros_like(b), x_star * 1.3, rng.standard_normal(b.shape)):
        refined, r, _ = refinement.refine(x, b)
        np.testing.assert_allclose(r, b - A @ refined, atol=1e-9 * np.linalg.norm(b))
        assert np.linalg.norm(r) <= np.linalg.norm(b - A @ x)
        # t minimises ||r - t A d|| over t: nearby steps do no better
        r0 = b - A @ x
        d = refinement.correction(r0)
        Ad = A @ d
        t = refinement.step(d, Ad, r0)
        best = np.linalg.norm(r0 - t * Ad)
        assert best <= np.linalg.norm(r0 - (t * 1.01) * Ad)
        assert best <= np.linalg.norm(r0 - (t * 0.99) * Ad)
    solver = KrylovSolver(A, "gmres", rtol=1e-8)
    warm = warm_solve(
        solver, b, x_star * 1.3, WarmStartPolicy(False), refinement=refinement
    )
    assert warm.result.converged


def test_guess_within_tolerance_returns_at_zero_iterations(darcy):
    fam, inst, A, b, x_star = darcy
    refinement = TwoGridRefinement.for_instance(fam, inst, RefinementSettings(), A)
    solver = KrylovSolver(A, "cg", rtol=1e-6)
    warm = warm_solve(solver, b, x_star, WarmStartPolicy(True), refinement=refinement)
    assert warm.verdict.decision is WarmStartDecision.ALREADY_CONVERGED
    assert warm.result.num_iterations == 0
    assert warm.result.converged
    assert (
        warm.num_matvecs == warm.num_matvecs_refinement == refinement.cost.num_matvecs
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_guess_falls_back_without_refining(darcy, bad):
    fam, inst, A, b, _ = darcy
    refinement = TwoGridRefinement.for_instance(fam, inst, RefinementSettings(), A)
    solver = KrylovSolver(A, "cg", rtol=1e-6)
    guess = np.ones_like(b)
    guess[7] = bad
    warm = warm_solve(solver, b, guess, WarmStartPolicy(True), refinement=refinement)
    assert warm.verdict.decision is WarmStartDecision.FALLBACK_NOT_FINITE
    assert warm.result.converged
    assert warm.num_matvecs == solver.solve(b).num_matvecs  # nothing spent


def test_guess_still_worse_than_zero_after_refining_falls_back(darcy):
    fam, inst, A, b, x_star = darcy
    refinement = TwoGridRefinement.for_instance(fam, inst, RefinementSettings(), A)
    solver = KrylovSolver(A, "cg", rtol=1e-6)
    guess = -20.0 * x_star  # J = 1/2 400 x*'Ax* + 20 b'x* > 0, far from zero
    refined, _, _ = refinement.refine(guess, b)
    assert energy(A, b, refined) > 0  # the refinement does not rescue it
    warm = warm_solve(solver, b, guess, WarmStartPolicy(True), refinement=refinement)
    assert warm.verdict.decision is WarmStartDecision.FALLBACK_WORSE_THAN_ZERO
    assert warm.result.converged
    # the refinement's work was spent and is counted; its residual served the
    # policy, so no further product
    cold = solver.solve(b)
    assert warm.num_matvecs == cold.num_matvecs + refinement.cost.num_matvecs


def test_refinement_and_sweeps_together_are_refused(tiny):
    _, _, A, b, coarse_A = tiny
    refinement = TwoGridRefinement(
        A, coarse_A, 6, 3, symmetric=True, settings=RefinementSettings(coarse_factor=2)
    )
    with pytest.raises(ValueError, match="not both"):
        warm_solve(
            KrylovSolver(A, "cg", rtol=1e-6),
            b,
            np.ones(36),
            WarmStartPolicy(True),
            num_smoothing_sweeps=2,
            refinement=refinement,
        )


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="coarse_factor"):
        RefinementSettings(coarse_factor=1)
    with pytest.raises(ValueError, match="sweep"):
        RefinementSettings(num_pre_sweeps=-1)
    with pytest.raises(ValueError, match="num_cycles"):
        RefinementSettings(num_cycles=0)
    A = sp.identity(4, format="csr")
    with pytest.raises(ValueError, match="do not fit"):
        TwoGridRefinement(
            A, A, 3, 2, symmetric=True, settings=RefinementSettings(coarse_factor=2)
        )


def test_constant_coefficient_refinement_of_zero_is_a_good_first_guess():
    # one cycle from zero on a smooth problem removes most of the error
    fam = DarcyFamily()
    inst = Instance("c", "darcy", {"a": np.full((31, 31), 2.0)})
    A, b = fam.assemble(inst)
    x_star = spla.spsolve(A.tocsc(), b)
    settings = RefinementSettings(coarse_factor=2, num_pre_sweeps=1, num_post_sweeps=1)
    refinement = TwoGridRefinement.for_instance(fam, inst, settings, A)
    x, _, _ = refinement.refine(np.zeros_like(b), b)
    e = x - x_star
    assert np.sqrt(e @ (A @ e)) < 0.3 * np.sqrt(x_star @ (A @ x_star))
