import numpy as np
import pytest
import scipy.sparse.linalg as spla

from raysys.solvers.families import ConvectionDiffusionFamily, DarcyFamily
from raysys.solvers.krylov import SOLVERS, CountingOperator, KrylovSolver
from raysys.solvers.worker import SolveSettings


def darcy_system(n=12, seed=0):
    fam = DarcyFamily()
    inst = fam.sample(np.random.default_rng(seed), n, "d")
    return fam.assemble(inst)


def system_for(solver, n=12):
    if solver in ("cg", "amg-cg"):
        return darcy_system(n)
    fam = ConvectionDiffusionFamily()
    return fam.assemble(fam.sample(np.random.default_rng(1), n, "cd"))


def exact_solution(A, b):
    return spla.spsolve(A.tocsc(), b)


def test_counting_operator_counts_vectors_and_columns():
    A, b = darcy_system(4)
    op = CountingOperator(A)
    np.testing.assert_allclose(op.matvec(b), A @ b)
    op.matmat(np.ones((A.shape[0], 3)))
    assert op.num_matvecs == 4


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_initial_guess_returns_with_zero_iterations(solver):
    A, b = system_for(solver)
    x_star = exact_solution(A, b)
    res = KrylovSolver(A, solver, rtol=1e-8).solve(b, x_star)
    assert res.num_iterations == 0
    assert res.num_matvecs == 1  # only the initial residual
    assert res.converged
    np.testing.assert_array_equal(res.x, x_star)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("rtol", [1e-3, 1e-8])
def test_reported_convergence_is_confirmed_by_the_true_residual(solver, rtol):
    A, b = system_for(solver)
    res = KrylovSolver(A, solver, rtol=rtol).solve(b)
    true_residual = np.linalg.norm(b - A @ res.x)
    assert res.converged
    assert res.residual_norm == pytest.approx(true_residual)
    assert true_residual <= rtol * np.linalg.norm(b)
    assert res.num_iterations > 0


def test_stopping_at_maxiter_is_reported_as_not_converged():
    A, b = darcy_system(16)
    res = KrylovSolver(A, "cg", rtol=1e-10, maxiter=5).solve(b)
    assert not res.converged
    assert res.info == 5
    assert res.num_iterations == 5
    assert res.residual_norm > 1e-10 * np.linalg.norm(b)


def test_atol_is_honoured_as_given():
    A, b = darcy_system(8)
    thr = 0.5 * np.linalg.norm(b)
    res = KrylovSolver(A, "cg", rtol=1e-12, atol=thr).solve(b)
    assert res.threshold == pytest.approx(thr)
    assert res.converged and res.residual_norm <= thr
    loose = KrylovSolver(A, "cg", rtol=0.0, atol=2 * np.linalg.norm(b)).solve(b)
    assert loose.num_iterations == 0  # x0 = 0 already meets the threshold


@pytest.mark.parametrize("solver", SOLVERS)
def test_iteration_and_matvec_counts_agree_with_and_without_a_callback(solver):
    A, b = system_for(solver, n=16)
    rtol = 1e-7
    plain = KrylovSolver(A, solver, rtol=rtol, restart=10).solve(b)
    seen = []
    watched = KrylovSolver(A, solver, rtol=rtol, restart=10).solve(
        b, callback=seen.append
    )
    assert plain.num_iterations == watched.num_iterations > 0
    assert plain.num_matvecs == watched.num_matvecs
    assert seen == list(range(1, plain.num_iterations + 1))
    np.testing.assert_allclose(plain.x, watched.x)


def test_cg_spends_one_product_per_iteration():
    A, b = darcy_system(16)
    res = KrylovSolver(A, "cg", rtol=1e-6).solve(b)
    assert res.num_matvecs == res.num_iterations
    # from a guess without its residual, the first residual costs one more
    x0 = np.full_like(b, 1e-4)
    warm = KrylovSolver(A, "cg", rtol=1e-6).solve(b, x0)
    assert warm.num_matvecs == warm.num_iterations + 1


def test_iterates_match_scipy_started_at_the_guess():
    A, b = darcy_system(16)
    x0 = exact_solution(A, b) * 0.9
    ours = KrylovSolver(A, "cg", rtol=1e-6).solve(b, x0)
    theirs, info = spla.cg(A, b, x0=x0.copy(), rtol=1e-6)
    assert info == 0
    np.testing.assert_allclose(ours.x, theirs, rtol=1e-6, atol=1e-12)


def test_unknown_solver_and_bad_tolerances_are_rejected():
    A, _ = darcy_system(4)
    with pytest.raises(ValueError, match="bicgstab"):
        KrylovSolver(A, "minres", rtol=1e-3)
    with pytest.raises(ValueError, match="rtol"):
        KrylovSolver(A, "cg", rtol=-1.0)


def test_amg_cg_needs_far_fewer_iterations_than_cg():
    inst = DarcyFamily().sample(np.random.default_rng(4), 48, "d")
    A, b = DarcyFamily().assemble(inst)
    cg = KrylovSolver(A, "cg", rtol=1e-6).solve(b)
    amg = KrylovSolver(A, "amg-cg", rtol=1e-6).solve(b)
    assert amg.converged and cg.converged
    assert amg.num_iterations * 4 < cg.num_iterations


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_huge_right_hand_side_is_not_reported_converged_at_zero(solver):
    # numpy's norm of entries beyond 1e154 is inf, and a threshold of inf once
    # called x = 0 converged after zero iterations
    A, b = system_for(solver, 8)
    res = KrylovSolver(A, solver, rtol=1e-6).solve(1e300 * b)
    assert np.isfinite(res.threshold)
    assert res.converged == (res.residual_norm <= res.threshold)
    assert res.num_iterations > 0 or not res.converged


def test_an_infinite_threshold_never_counts_as_converged():
    A, b = darcy_system(4)
    b[0] = np.inf
    res = KrylovSolver(A, "cg", rtol=1e-6).solve(b)
    assert not res.converged


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"maxiter": 0}, "maxiter must be >= 1 or None.*got 0"),
        ({"maxiter": -3}, "maxiter must be >= 1 or None.*got -3"),
        ({"restart": 0}, "restart must be >= 1.*got 0"),
    ],
)
def test_iteration_caps_below_one_are_refused(kwargs, message):
    A, _ = darcy_system(4)
    with pytest.raises(ValueError, match=message):
        KrylovSolver(A, "gmres", rtol=1e-3, **kwargs)
    # and by the run's settings, before any remote task would build a solver
    with pytest.raises(ValueError, match=message):
        SolveSettings(**kwargs)
