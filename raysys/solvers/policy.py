"""The warm-start policy: use an initial guess, or fall back to zero.

A plain object with no Ray and no matrices inside: it takes the numbers the
caller measured for a guess (`GuessMeasures`) and returns a `WarmStartVerdict`.

The rule, in order:

1. A guess with a non-finite entry falls back to x0 = 0.
2. A guess whose true residual already meets ``max(rtol ||b||, atol)`` is
   returned as the solution after zero iterations.
3. A guess worse than zero falls back to x0 = 0. "Worse" is judged by what the
   solver minimises, not by the raw residual, because an operator's prediction
   usually has a larger residual than zero (A amplifies its small
   high-frequency error) while being far closer in the energy norm:

   - symmetric positive definite A (CG, AMG-CG): the energy functional
     ``J(x) = 1/2 x'Ax - b'x``. Since ``J(x) - J(x*) = 1/2 ||x - x*||_A^2`` and
     ``J(0) = 0``, ``J(x0) < 0`` says exactly that x0 is closer to the solution
     than zero in the A-norm CG minimises, without knowing the solution.
   - non-symmetric A (GMRES, BiCGStab): the residual norm, which GMRES
     minimises over its Krylov space and which the stopping rule measures;
     the guess is kept when ``||b - A x0|| < ||b||``. Smoothing the guess first
     (`raysys.solvers.warmstart.smooth`) removes the high-frequency part that
     inflates its residual.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class WarmStartDecision(enum.Enum):
    """What to do with a guess."""

    USE_GUESS = "use-guess"
    ALREADY_CONVERGED = "already-converged"
    FALLBACK_NOT_FINITE = "fallback-not-finite"
    FALLBACK_WORSE_THAN_ZERO = "fallback-worse-than-zero"

    @property
    def is_fallback(self) -> bool:
        """True when the solve starts from zero instead of the guess."""
        return self in (
            WarmStartDecision.FALLBACK_NOT_FINITE,
            WarmStartDecision.FALLBACK_WORSE_THAN_ZERO,
        )


@dataclass(frozen=True)
class GuessMeasures:
    """Numbers measured for a guess x0 of ``A x = b``.

    Attributes:
        finite: every entry of x0 is finite.
        residual_norm: ``||b - A x0||`` (NaN when not finite).
        rhs_norm: ``||b||``, the residual of the zero guess.
        threshold: ``max(rtol ||b||, atol)``.
        energy: ``J(x0) = 1/2 x0'A x0 - b'x0`` for symmetric A, else None.
    """

    finite: bool
    residual_norm: float
    rhs_norm: float
    threshold: float
    energy: float | None = None


@dataclass(frozen=True)
class WarmStartVerdict:
    """The policy's decision with its reason in words."""

    decision: WarmStartDecision
    reason: str


class WarmStartPolicy:
    """Decide between a guess and the zero guess (see the module docstring).

    Args:
        symmetric: judge by the energy functional (SPD systems) rather than by
            the residual norm.
    """

    def __init__(self, symmetric: bool):
        self.symmetric = symmetric

    def decide(self, m: GuessMeasures) -> WarmStartVerdict:
        """Return the verdict for a guess with measures ``m``."""
        if not m.finite or not math.isfinite(m.residual_norm):
            return WarmStartVerdict(
                WarmStartDecision.FALLBACK_NOT_FINITE,
                "the guess has non-finite entries; starting from zero",
            )
        if m.residual_norm <= m.threshold:
            return WarmStartVerdict(
                WarmStartDecision.ALREADY_CONVERGED,
                f"the guess's residual {m.residual_norm:.3e} already meets the "
                f"threshold {m.threshold:.3e}",
            )
        if self.symmetric:
            if m.energy is None or not math.isfinite(m.energy):
                return WarmStartVerdict(
                    WarmStartDecision.FALLBACK_NOT_FINITE,
                    "the guess's energy functional is not finite; starting from zero",
                )
            if m.energy >= 0.0:
                return WarmStartVerdict(
                    WarmStartDecision.FALLBACK_WORSE_THAN_ZERO,
                    f"energy functional of the guess {m.energy:.3e} >= 0 (that of "
                    "zero): farther from the solution in the A-norm than zero",
                )
            return WarmStartVerdict(
                WarmStartDecision.USE_GUESS,
                f"energy functional of the guess {m.energy:.3e} < 0",
            )
        if m.residual_norm >= m.rhs_norm:
            return WarmStartVerdict(
                WarmStartDecision.FALLBACK_WORSE_THAN_ZERO,
                f"residual of the guess {m.residual_norm:.3e} >= ||b|| = "
                f"{m.rhs_norm:.3e} (the zero guess's residual)",
            )
        return WarmStartVerdict(
            WarmStartDecision.USE_GUESS,
            f"residual of the guess {m.residual_norm:.3e} < ||b|| = {m.rhs_norm:.3e}",
        )
