from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse.linalg as spla

from raysys.solvers.errors import InvalidInstance
from raysys.solvers.families import (
    ConvectionDiffusionFamily,
    DarcyFamily,
    Instance,
    convection_diffusion_matrix,
    darcy_matrix,
    get_family,
    harmonic_faces,
)


def harmonic(p, q):
    return Fraction(2 * p * q, p + q)


def test_darcy_assembly_matches_hand_computed_harmonic_averages():
    # nodes (row-major): 0=(0,0) a=1, 1=(0,1) a=2, 2=(1,0) a=3, 3=(1,1) a=4
    # h = 1/3, so every entry carries 1/h^2 = 9; every node touches two
    # boundary faces, which take the node's own coefficient.
    f01, f23 = harmonic(1, 2), harmonic(3, 4)  # x faces: 4/3, 24/7
    f02, f13 = harmonic(1, 3), harmonic(2, 4)  # y faces: 3/2, 8/3
    expected = [
        [f01 + f02 + 2 * 1, -f01, -f02, 0],
        [-f01, f01 + f13 + 2 * 2, 0, -f13],
        [-f02, 0, f23 + f02 + 2 * 3, -f23],
        [0, -f13, -f23, f23 + f13 + 2 * 4],
    ]
    expected = 9 * np.array([[float(v) for v in row] for row in expected])
    A = darcy_matrix(np.array([[1.0, 2.0], [3.0, 4.0]])).toarray()
    np.testing.assert_allclose(A, expected, rtol=1e-14)


def test_darcy_matrix_is_symmetric_positive_definite():
    rng = np.random.default_rng(3)
    A = darcy_matrix(rng.uniform(0.1, 10, (7, 7))).toarray()
    np.testing.assert_allclose(A, A.T)
    assert np.linalg.eigvalsh(A).min() > 0


def test_darcy_constant_coefficient_is_the_scaled_five_point_laplacian():
    n = 5
    lap = DarcyFamily().assemble(Instance("c", "darcy", {"a": np.ones((n, n))}))[0]
    A = darcy_matrix(np.full((n, n), 2.5))
    np.testing.assert_allclose(A.toarray(), 2.5 * lap.toarray())
    # eigenvalues of the 5-point Laplacian are known in closed form
    k = np.arange(1, n + 1)
    lam1 = 4 * (n + 1) ** 2 * np.sin(k * np.pi / (2 * (n + 1))) ** 2
    expected = np.sort((lam1[:, None] + lam1[None, :]).ravel())
    np.testing.assert_allclose(np.linalg.eigvalsh(lap.toarray()), expected)


def test_convection_diffusion_without_velocity_is_diffusion_and_upwinds_otherwise():
    n, eps = 4, 0.3
    zero = np.zeros((n, n))
    A0 = convection_diffusion_matrix(zero, zero, eps).toarray()
    np.testing.assert_allclose(A0, darcy_matrix(np.full((n, n), eps)).toarray())

    vx = np.full((n, n), 2.0)
    A = convection_diffusion_matrix(vx, zero, eps).toarray()
    h = 1 / (n + 1)
    p, west, east = 5, 4, 6  # node (1, 1) and its x neighbours
    assert A[p, west] == pytest.approx(-eps / h**2 - 2.0 / h)  # upwind side
    assert A[p, east] == pytest.approx(-eps / h**2)
    assert not np.allclose(A, A.T)
    # an M-matrix: its inverse is entrywise non-negative
    assert (np.linalg.inv(A) >= -1e-12).all()


def test_sampling_is_deterministic_by_seed():
    fam = get_family("darcy")
    a1 = fam.sample(np.random.default_rng([5, 2]), 16, "x").fields["a"]
    a2 = fam.sample(np.random.default_rng([5, 2]), 16, "x").fields["a"]
    a3 = fam.sample(np.random.default_rng([6, 2]), 16, "x").fields["a"]
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, a3)
    assert set(np.unique(a1)) <= {3.0, 12.0}


def test_convection_diffusion_samples_are_divergence_free_and_solvable():
    fam = ConvectionDiffusionFamily()
    inst = fam.sample(np.random.default_rng(0), 24, "cd")
    vx, vy = inst.fields["vx"], inst.fields["vy"]
    assert np.sqrt(vx**2 + vy**2).max() == pytest.approx(fam.speed)
    assert fam.epsilon_min <= inst.scalars["epsilon"] <= fam.epsilon_max
    A, b = fam.assemble(inst)
    x = spla.spsolve(A.tocsc(), b)
    assert np.linalg.norm(A @ x - b) < 1e-8 * np.linalg.norm(b)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"a": np.array([[1.0, np.nan], [1.0, 1.0]])}, "non-finite"),
        ({"a": np.array([[1.0, -2.0], [1.0, 1.0]])}, "positive"),
        ({"a": np.ones((3, 4))}, "shape"),
        ({"a": np.ones(9)}, "shape"),
        ({"b": np.ones((3, 3))}, "no field 'a'"),
        ({"a": np.ones((3, 3)), "f": np.ones((4, 4))}, "disagree"),
    ],
)
def test_bad_darcy_instances_are_rejected_with_the_reason(fields, message):
    with pytest.raises(InvalidInstance, match=message) as err:
        DarcyFamily().assemble(Instance("bad-one", "darcy", fields))
    assert "bad-one" in str(err.value)


def test_unknown_family_names_the_known_ones():
    with pytest.raises(InvalidInstance, match="darcy"):
        get_family("heat")


def test_resample_keeps_a_constant_coefficient_and_shrinks_the_grid():
    fam = DarcyFamily()
    inst = Instance("c", "darcy", {"a": np.full((9, 9), 7.0)})
    coarse = fam.resample(inst, 4)
    np.testing.assert_allclose(coarse.fields["a"], np.full((4, 4), 7.0))


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_darcy_with_extreme_coefficients_is_the_scaled_unit_matrix(scale):
    # 2 p q / (p + q) formed directly overflows (or underflows to a singular
    # matrix) for coefficients beyond 1e+-154
    a = np.full((6, 6), scale)
    a[2, 3] = 2 * scale
    A, _ = DarcyFamily().assemble(Instance("extreme", "darcy", {"a": a}))
    unit = darcy_matrix(a / scale)
    assert np.isfinite(A.data).all()
    np.testing.assert_allclose((A / scale).toarray(), unit.toarray(), rtol=1e-12)


@pytest.mark.parametrize("p,q", [(1e200, 1e-200), (1e150, 1e-200), (1e160, 1e-160)])
def test_faces_between_far_apart_coefficients_keep_their_harmonic_mean(p, q):
    # 2 p q / (p + q) = 2 q / (1 + q / p), about 2 q when q << p, in either order
    expected = 2 * q / (1 + q / p)
    for a in (np.array([[p, q]]), np.array([[q, p]])):
        ax, _ = harmonic_faces(a)
        np.testing.assert_allclose(ax, [[expected]], rtol=1e-12)


def test_a_matrix_that_overflows_is_refused_with_the_coefficient():
    inst = Instance("overflowing", "darcy", {"a": np.full((4, 4), 1e307)})
    with pytest.raises(InvalidInstance, match="overflows float64.*1e\\+307"):
        DarcyFamily().assemble(inst)
