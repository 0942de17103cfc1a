import numpy as np
import pytest
import scipy.sparse.linalg as spla

from raysys.solvers.families import ConvectionDiffusionFamily, DarcyFamily, Instance
from raysys.solvers.krylov import KrylovSolver
from raysys.solvers.policy import WarmStartDecision, WarmStartPolicy
from raysys.solvers.warmstart import coarse_grid_guess, smooth, warm_solve


@pytest.fixture(scope="module")
def darcy():
    fam = DarcyFamily()
    inst = fam.sample(np.random.default_rng(7), 24, "d")
    A, b = fam.assemble(inst)
    return fam, inst, A, b, spla.spsolve(A.tocsc(), b)


def energy_error(A, x, x_star):
    e = x - x_star
    return np.sqrt(e @ (A @ e))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_prediction_falls_back_to_the_cold_solve(darcy, bad):
    _, _, A, b, _ = darcy
    solver = KrylovSolver(A, "cg", rtol=1e-6)
    cold = solver.solve(b)
    guess = np.ones_like(b)
    guess[3] = bad
    warm = warm_solve(solver, b, guess, WarmStartPolicy(True), num_smoothing_sweeps=2)
    assert warm.fallback
    assert warm.verdict.decision is WarmStartDecision.FALLBACK_NOT_FINITE
    assert warm.result.converged
    assert warm.result.num_iterations == cold.num_iterations
    assert warm.num_matvecs == cold.num_matvecs  # nothing spent on the bad guess


def test_guess_worse_than_zero_in_energy_falls_back(darcy):
    # J(2 x*) = 2 b'x* - 2 b'x* = 0 = J(0): not better than zero
    _, _, A, b, x_star = darcy
    solver = KrylovSolver(A, "cg", rtol=1e-6)
    warm = warm_solve(solver, b, 2.05 * x_star, WarmStartPolicy(True))
    assert warm.verdict.decision is WarmStartDecision.FALLBACK_WORSE_THAN_ZERO
    assert warm.result.converged
    assert warm.num_matvecs == solver.solve(b).num_matvecs + 1


def test_good_guess_is_used_and_every_product_is_counted(darcy):
    _, _, A, b, x_star = darcy
    rng = np.random.default_rng(0)
    guess = x_star * (1 + 0.01 * rng.standard_normal(x_star.shape))
    solver = KrylovSolver(A, "cg", rtol=1e-6)
    cold = solver.solve(b)
    warm = warm_solve(solver, b, guess, WarmStartPolicy(True), num_smoothing_sweeps=3)
    assert warm.verdict.decision is WarmStartDecision.USE_GUESS
    assert warm.result.converged
    assert warm.result.residual_norm <= 1e-6 * np.linalg.norm(b)
    # 3 sweeps + the policy's product + one per CG iteration
    assert warm.num_matvecs == 3 + 1 + warm.result.num_iterations
    assert warm.num_matvecs < cold.num_matvecs


def test_exact_guess_returns_with_zero_iterations(darcy):
    _, _, A, b, x_star = darcy
    solver = KrylovSolver(A, "cg", rtol=1e-6)
    warm = warm_solve(solver, b, x_star, WarmStartPolicy(True))
    assert warm.verdict.decision is WarmStartDecision.ALREADY_CONVERGED
    assert warm.result.num_iterations == 0
    assert warm.num_matvecs == 1
    assert warm.result.converged


def test_guess_of_the_wrong_size_is_an_error(darcy):
    _, _, A, b, _ = darcy
    with pytest.raises(ValueError, match="entries"):
        warm_solve(
            KrylovSolver(A, "cg", rtol=1e-3), b, np.ones(5), WarmStartPolicy(True)
        )


def test_gauss_seidel_sweeps_reduce_the_energy_error(darcy):
    _, _, A, b, x_star = darcy
    rng = np.random.default_rng(1)
    guess = x_star + 1e-3 * rng.standard_normal(x_star.shape)
    errors = [energy_error(A, smooth(A, guess, b, k), x_star) for k in range(4)]
    assert all(
        later < earlier for earlier, later in zip(errors[:-1], errors[1:], strict=True)
    )
    assert errors[2] < 0.5 * errors[0]  # rough error is damped fast


def test_coarse_grid_guess_approximates_the_fine_solution():
    fam = DarcyFamily()
    inst = Instance("c", "darcy", {"a": np.full((31, 31), 2.0)})
    A, b = fam.assemble(inst)
    x_star = spla.spsolve(A.tocsc(), b)
    guess = coarse_grid_guess(fam, inst, 2)
    assert guess.shape == x_star.shape
    rel = np.linalg.norm(guess - x_star) / np.linalg.norm(x_star)
    assert rel < 0.02
    assert energy_error(A, guess, x_star) < 0.2 * np.sqrt(x_star @ (A @ x_star))


def test_non_symmetric_warm_start_uses_the_residual_rule():
    fam = ConvectionDiffusionFamily()
    inst = fam.sample(np.random.default_rng(2), 20, "cd")
    A, b = fam.assemble(inst)
    x_star = spla.spsolve(A.tocsc(), b)
    solver = KrylovSolver(A, "gmres", rtol=1e-8)
    near = warm_solve(solver, b, 0.999 * x_star, WarmStartPolicy(False))
    assert near.verdict.decision is WarmStartDecision.USE_GUESS
    assert near.result.converged
    assert near.num_matvecs < solver.solve(b).num_matvecs
    far = warm_solve(solver, b, -x_star, WarmStartPolicy(False))  # residual 2||b||
    assert far.verdict.decision is WarmStartDecision.FALLBACK_WORSE_THAN_ZERO
    assert far.result.converged
