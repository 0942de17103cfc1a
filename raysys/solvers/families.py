"""PDE families: each turns an instance's parameters into a sparse system A x = b.

Every family discretises its PDE on the n x n interior grid of the unit square
(see `raysys.solvers.fields`) with zero Dirichlet data, so the unknown vector is
the row-major flattening of an (n, n) field.

- ``darcy``: -div(a grad u) = f, five-point finite differences with the harmonic
  mean of ``a`` on each cell face (symmetric positive definite: CG).
- ``convection-diffusion``: -eps Lap u + v . grad u = f with a divergence-free
  random velocity v, first-order upwind convection (non-symmetric: GMRES,
  BiCGStab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from raysys.solvers.errors import InvalidInstance
from raysys.solvers.fields import gaussian_random_field, resample


@dataclass
class Instance:
    """One PDE instance: named parameter fields on an n x n interior grid.

    Attributes:
        name: label used in reports.
        family: name of its `PDEFamily`.
        fields: (n, n) parameter fields; darcy: ``a`` (and optionally ``f``),
            convection-diffusion: ``vx``, ``vy`` (and optionally ``f``).
        scalars: scalar parameters; convection-diffusion: ``epsilon``.
        reference: (n, n) reference solution when one was computed.
    """

    name: str
    family: str
    fields: dict[str, np.ndarray]
    scalars: dict[str, float] = field(default_factory=dict)
    reference: np.ndarray | None = None

    @property
    def resolution(self) -> int:
        """n of the n x n grid (the first field's leading size)."""
        first = next(iter(self.fields.values()))
        return int(np.shape(first)[0]) if np.ndim(first) else 0


def _check_field(inst: Instance, key: str, *, positive: bool) -> np.ndarray:
    if key not in inst.fields:
        raise InvalidInstance(
            f"instance {inst.name!r} has no field {key!r}; give it as an (n, n) array"
        )
    arr = np.asarray(inst.fields[key])
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 2:
        raise InvalidInstance(
            f"instance {inst.name!r}: field {key!r} has shape {arr.shape}; "
            "it must be a square (n, n) grid with n >= 2"
        )
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise InvalidInstance(
            f"instance {inst.name!r}: field {key!r} has dtype {arr.dtype}; give numbers"
        )
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise InvalidInstance(
            f"instance {inst.name!r}: field {key!r} has {int(bad.sum())} non-finite "
            f"values (first at row {i}, column {j}: {arr[i, j]}); "
            "replace them with finite numbers"
        )
    if positive and (arr <= 0).any():
        i, j = np.argwhere(arr <= 0)[0]
        raise InvalidInstance(
            f"instance {inst.name!r}: field {key!r} must be positive everywhere but "
            f"is {arr[i, j]:g} at row {i}, column {j} ({int((arr <= 0).sum())} "
            "values <= 0); give a positive coefficient field"
        )
    return arr


def _check_finite_matrix(inst: Instance, A: sp.csr_matrix, what: str) -> None:
    if not np.isfinite(A.data).all():
        raise InvalidInstance(
            f"instance {inst.name!r}: its matrix overflows float64 ({what} at "
            f"{inst.resolution}x{inst.resolution}); rescale the problem"
        )


def _same_shape(inst: Instance, arrays: dict[str, np.ndarray]) -> None:
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise InvalidInstance(
            f"instance {inst.name!r}: fields disagree in shape {shapes}; "
            "all fields of an instance live on the same grid"
        )


class PDEFamily:
    """Base of the PDE families: sampling, validation, assembly and features."""

    name: ClassVar[str]
    symmetric: ClassVar[bool]
    feature_names: ClassVar[tuple[str, ...]]

    def validate(self, inst: Instance) -> dict[str, np.ndarray]:
        """Check ``inst`` and return its fields as float64 arrays.

        Raises:
            InvalidInstance: the message names the instance, the field and the fix.
        """
        raise NotImplementedError

    def assemble(self, inst: Instance) -> tuple[sp.csr_matrix, np.ndarray]:
        """The system matrix A (N, N) and right-hand side b (N,), N = n * n."""
        raise NotImplementedError

    def features(self, inst: Instance) -> np.ndarray:
        """(C, n, n) float32 input channels of the neural operator."""
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, n: int, name: str) -> Instance:
        """Draw one random instance on an n x n grid."""
        raise NotImplementedError

    def resample(self, inst: Instance, m: int) -> Instance:
        """The same instance with its fields interpolated to an m x m grid."""
        fields = {
            k: resample(v, m, zero_boundary=False)
            for k, v in self.validate(inst).items()
        }
        return Instance(f"{inst.name}@{m}", inst.family, fields, dict(inst.scalars))

    def reference_solution(self, inst: Instance) -> np.ndarray:
        """(n, n) solution by a sparse direct solve (SuperLU)."""
        A, b = self.assemble(inst)
        n = inst.resolution
        return spla.splu(A.tocsc()).solve(b).reshape(n, n)


@dataclass
class DarcyFamily(PDEFamily):
    """-div(a grad u) = f on the unit square, u = 0 on the boundary.

    Five-point finite differences; the coefficient on the face between two
    nodes is the harmonic mean ``2 a_p a_q / (a_p + a_q)``, the flux-continuous
    choice for discontinuous ``a``. A face between a node and the boundary takes
    the node's own coefficient. Random instances threshold a Gaussian random
    field to ``high`` where it is >= 0 and ``low`` elsewhere, as the FNO
    benchmark does (12 and 3).
    """

    name: ClassVar[str] = "darcy"
    symmetric: ClassVar[bool] = True
    feature_names: ClassVar[tuple[str, ...]] = ("a",)

    high: float = 12.0
    low: float = 3.0
    alpha: float = 2.0
    tau: float = 3.0
    forcing: float = 1.0

    def validate(self, inst: Instance) -> dict[str, np.ndarray]:
        out = {"a": _check_field(inst, "a", positive=True)}
        if "f" in inst.fields:
            out["f"] = _check_field(inst, "f", positive=False)
        _same_shape(inst, out)
        return out

    def assemble(self, inst: Instance) -> tuple[sp.csr_matrix, np.ndarray]:
        fields = self.validate(inst)
        a = fields["a"]
        n = a.shape[0]
        f = fields.get("f", np.full((n, n), self.forcing))
        A = darcy_matrix(a)
        _check_finite_matrix(inst, A, f"coefficients up to {a.max():g}")
        return A, f.ravel().copy()

    def features(self, inst: Instance) -> np.ndarray:
        return self.validate(inst)["a"][None].astype(np.float32)  # (1, n, n)

    def sample(self, rng: np.random.Generator, n: int, name: str) -> Instance:
        grf = gaussian_random_field(rng, n, self.alpha, self.tau)
        a = np.where(grf >= 0.0, self.high, self.low)
        return Instance(name, self.name, {"a": a})


def _harmonic_mean(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    # 2 p q / (p + q); where the product p q would overflow or lose precision
    # (values beyond 1e+-150), the same as 2 lo / (1 + lo / hi) with lo <= hi,
    # whose ratio lies in (0, 1]: neither side's size can push it to 0 or inf
    # (only a mean beyond the float range is inf, refused with its matrix).
    lo, hi = np.minimum(p, q), np.maximum(p, q)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        plain = 2.0 * p * q / (p + q)
        scaled = 2.0 * lo / (1.0 + lo / hi)
    safe = (hi < 1e150) & (lo > 1e-150)
    return np.where(safe, plain, scaled)


def harmonic_faces(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face coefficients of an (n, n) field: x faces (n, n-1), y faces (n-1, n)."""
    ax = _harmonic_mean(a[:, :-1], a[:, 1:])
    ay = _harmonic_mean(a[:-1, :], a[1:, :])
    return ax, ay


def darcy_matrix(a: np.ndarray) -> sp.csr_matrix:
    """The five-point matrix of -div(a grad .) with harmonic face averages.

    Args:
        a: (n, n) positive coefficients at the interior nodes.

    Returns:
        (n*n, n*n) CSR matrix, scaled by 1 / h^2 with h = 1 / (n + 1).
    """
    n = a.shape[0]
    idx = np.arange(n * n).reshape(n, n)
    ax, ay = harmonic_faces(a)

    diag = np.zeros((n, n))
    diag[:, :-1] += ax
    diag[:, 1:] += ax
    diag[:-1, :] += ay
    diag[1:, :] += ay
    # faces to the boundary carry the node's own coefficient
    diag[:, 0] += a[:, 0]
    diag[:, -1] += a[:, -1]
    diag[0, :] += a[0, :]
    diag[-1, :] += a[-1, :]

    rows = np.concatenate(
        [idx.ravel(), idx[:, :-1].ravel(), idx[:, 1:].ravel()]
        + [idx[:-1, :].ravel(), idx[1:, :].ravel()]
    )
    cols = np.concatenate(
        [idx.ravel(), idx[:, 1:].ravel(), idx[:, :-1].ravel()]
        + [idx[1:, :].ravel(), idx[:-1, :].ravel()]
    )
    vals = np.concatenate(
        [diag.ravel(), -ax.ravel(), -ax.ravel(), -ay.ravel(), -ay.ravel()]
    )
    inv_h2 = float((n + 1) ** 2)
    return sp.csr_matrix((vals * inv_h2, (rows, cols)), shape=(n * n, n * n))


@dataclass
class ConvectionDiffusionFamily(PDEFamily):
    """-eps Lap u + v . grad u = f on the unit square, u = 0 on the boundary.

    Diffusion by the five-point Laplacian, convection by first-order upwind
    differences, which keep A an M-matrix at any cell Peclet number. Random
    instances take v = (d psi / dy, -d psi / dx) from a Gaussian random stream
    function psi (so div v = 0), scaled to a peak speed of ``speed``, and eps
    log-uniform in [``epsilon_min``, ``epsilon_max``].
    """

    name: ClassVar[str] = "convection-diffusion"
    symmetric: ClassVar[bool] = False
    feature_names: ClassVar[tuple[str, ...]] = ("vx", "vy", "epsilon")

    speed: float = 1.0
    epsilon_min: float = 0.02
    epsilon_max: float = 0.1
    alpha: float = 3.0
    tau: float = 3.0
    forcing: float = 1.0

    def validate(self, inst: Instance) -> dict[str, np.ndarray]:
        out = {
            "vx": _check_field(inst, "vx", positive=False),
            "vy": _check_field(inst, "vy", positive=False),
        }
        if "f" in inst.fields:
            out["f"] = _check_field(inst, "f", positive=False)
        _same_shape(inst, out)
        eps = inst.scalars.get("epsilon")
        if eps is None or not math.isfinite(eps) or eps <= 0:
            raise InvalidInstance(
                f"instance {inst.name!r}: scalar 'epsilon' is {eps!r}; "
                "give a positive finite diffusion coefficient"
            )
        return out

    def assemble(self, inst: Instance) -> tuple[sp.csr_matrix, np.ndarray]:
        fields = self.validate(inst)
        vx, vy = fields["vx"], fields["vy"]
        n = vx.shape[0]
        f = fields.get("f", np.full((n, n), self.forcing))
        eps = inst.scalars["epsilon"]
        A = convection_diffusion_matrix(vx, vy, eps)
        speed = float(max(np.abs(vx).max(), np.abs(vy).max()))
        _check_finite_matrix(inst, A, f"epsilon {eps:g}, speed up to {speed:g}")
        return A, f.ravel().copy()

    def features(self, inst: Instance) -> np.ndarray:
        fields = self.validate(inst)
        eps = np.full_like(fields["vx"], inst.scalars["epsilon"])
        return np.stack([fields["vx"], fields["vy"], eps]).astype(np.float32)

    def sample(self, rng: np.random.Generator, n: int, name: str) -> Instance:
        psi = gaussian_random_field(rng, n, self.alpha, self.tau)
        dpsi_dy, dpsi_dx = np.gradient(psi, 1.0 / (n + 1))
        vx, vy = dpsi_dy, -dpsi_dx
        peak = float(np.sqrt(vx**2 + vy**2).max()) or 1.0
        scale = self.speed / peak
        log_eps = rng.uniform(math.log(self.epsilon_min), math.log(self.epsilon_max))
        return Instance(
            name,
            self.name,
            {"vx": vx * scale, "vy": vy * scale},
            {"epsilon": float(math.exp(log_eps))},
        )


def convection_diffusion_matrix(
    vx: np.ndarray, vy: np.ndarray, epsilon: float
) -> sp.csr_matrix:
    """Five-point diffusion plus first-order upwind convection.

    Args:
        vx: (n, n) velocity along x (columns).
        vy: (n, n) velocity along y (rows).
        epsilon: diffusion coefficient > 0.

    Returns:
        (n*n, n*n) non-symmetric CSR M-matrix.
    """
    n = vx.shape[0]
    h = 1.0 / (n + 1)
    idx = np.arange(n * n).reshape(n, n)
    d = epsilon / h**2
    diag = 4.0 * d + (np.abs(vx) + np.abs(vy)) / h
    west = -d - np.maximum(vx, 0.0) / h  # coupling to (i, j-1)
    east = -d - np.maximum(-vx, 0.0) / h  # (i, j+1)
    south = -d - np.maximum(vy, 0.0) / h  # (i-1, j)
    north = -d - np.maximum(-vy, 0.0) / h  # (i+1, j)

    rows = np.concatenate(
        [idx.ravel(), idx[:, 1:].ravel(), idx[:, :-1].ravel()]
        + [idx[1:, :].ravel(), idx[:-1, :].ravel()]
    )
    cols = np.concatenate(
        [idx.ravel(), idx[:, :-1].ravel(), idx[:, 1:].ravel()]
        + [idx[:-1, :].ravel(), idx[1:, :].ravel()]
    )
    vals = np.concatenate(
        [diag.ravel(), west[:, 1:].ravel(), east[:, :-1].ravel()]
        + [south[1:, :].ravel(), north[:-1, :].ravel()]
    )
    return sp.csr_matrix((vals, (rows, cols)), shape=(n * n, n * n))


FAMILIES: dict[str, PDEFamily] = {
    DarcyFamily.name: DarcyFamily(),
    ConvectionDiffusionFamily.name: ConvectionDiffusionFamily(),
}


def get_family(name: str) -> PDEFamily:
    """The registered family called ``name``.

    Raises:
        InvalidInstance: no such family; the message lists the known ones.
    """
    try:
        return FAMILIES[name]
    except KeyError as e:
        raise InvalidInstance(
            f"unknown PDE family {name!r}; choose one of {', '.join(FAMILIES)}"
        ) from e
