"""Random fields and grid transfer on an n x n interior grid of the unit square.

Grid convention used across the solvers subsystem: an n x n grid holds the
interior nodes ``((j + 1) h, (i + 1) h)`` with ``h = 1 / (n + 1)``; row ``i`` is
the y direction, column ``j`` the x direction; the boundary nodes (value zero
for solutions) are not stored.
"""

from __future__ import annotations

import numpy as np


def gaussian_random_field(
    rng: np.random.Generator, n: int, alpha: float = 2.0, tau: float = 3.0
) -> np.ndarray:
    """A zero-mean periodic Gaussian random field with covariance (-Lap + tau^2)^-alpha.

    The spectrum follows the Darcy benchmark of Li et al., "Fourier Neural
    Operator for Parametric Partial Differential Equations" (ICLR 2021): Fourier
    coefficient k is scaled by ``(4 pi^2 |k|^2 + tau^2)^(-alpha / 2)`` with
    integer wave numbers, so the statistics do not depend on ``n``.

    Returns:
        (n, n) float64 field.
    """
    k = np.fft.fftfreq(n, d=1.0 / n)
    kx, ky = np.meshgrid(k, k, indexing="ij")
    spectrum = (4.0 * np.pi**2 * (kx**2 + ky**2) + tau**2) ** (-alpha / 2.0)
    spectrum[0, 0] = 0.0  # zero mean, as in the benchmark
    noise = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    return np.fft.ifft2(noise * spectrum).real * n


def _linear_weights(source_positions: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dense (len(target), len(source)) matrix of 1-D linear interpolation weights."""
    m, n = len(target), len(source_positions)
    t = np.clip(target, source_positions[0], source_positions[-1])
    upper = np.clip(np.searchsorted(source_positions, t, side="right"), 1, n - 1)
    lower = upper - 1
    span = source_positions[upper] - source_positions[lower]
    w_upper = (t - source_positions[lower]) / span
    weights = np.zeros((m, n))
    weights[np.arange(m), lower] += 1.0 - w_upper
    weights[np.arange(m), upper] += w_upper
    return weights


def node_positions(n: int) -> np.ndarray:
    """Coordinates of the n interior nodes along one axis: ``(i + 1) / (n + 1)``."""
    return np.arange(1, n + 1) / (n + 1)


def interpolation_weights(n: int, m: int, *, zero_boundary: bool) -> np.ndarray:
    """(m, n) weights of 1-D linear interpolation from n to m interior nodes.

    Args:
        zero_boundary: the values vanish on the boundary (a solution with zero
            Dirichlet data), so a node near it interpolates towards zero;
            otherwise values are held constant towards it (a coefficient field).
    """
    source = node_positions(n)
    if not zero_boundary:
        return _linear_weights(source, node_positions(m))
    padded = np.concatenate([[0.0], source, [1.0]])
    # the boundary columns would multiply zeros: drop them
    return _linear_weights(padded, node_positions(m))[:, 1:-1]


def resample(field: np.ndarray, m: int, *, zero_boundary: bool) -> np.ndarray:
    """Bilinear interpolation of an (n, n) interior field to an (m, m) one.

    Args:
        field: (n, n) values at the interior nodes.
        m: target grid size.
        zero_boundary: see `interpolation_weights`.

    Returns:
        (m, m) float64 array.
    """
    w = interpolation_weights(field.shape[0], m, zero_boundary=zero_boundary)
    return w @ field @ w.T
