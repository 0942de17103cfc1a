import math

import pytest

from raysys.solvers.policy import GuessMeasures, WarmStartDecision, WarmStartPolicy


def measures(**kw):
    base = {
        "finite": True,
        "residual_norm": 5.0,
        "rhs_norm": 1.0,
        "threshold": 1e-3,
        "energy": -0.2,
    }
    return GuessMeasures(**(base | kw))


@pytest.mark.parametrize("symmetric", [True, False])
def test_non_finite_guess_falls_back(symmetric):
    verdict = WarmStartPolicy(symmetric).decide(
        measures(finite=False, residual_norm=math.nan)
    )
    assert verdict.decision is WarmStartDecision.FALLBACK_NOT_FINITE
    assert verdict.decision.is_fallback


def test_spd_guess_with_larger_residual_but_lower_energy_is_kept():
    # the residual is 5x that of zero, but J(x0) < J(0) = 0
    verdict = WarmStartPolicy(True).decide(measures())
    assert verdict.decision is WarmStartDecision.USE_GUESS
    assert not verdict.decision.is_fallback


@pytest.mark.parametrize("energy", [0.0, 0.3])
def test_spd_guess_not_below_zero_energy_falls_back(energy):
    verdict = WarmStartPolicy(True).decide(measures(energy=energy, residual_norm=0.5))
    assert verdict.decision is WarmStartDecision.FALLBACK_WORSE_THAN_ZERO
    assert "energy" in verdict.reason


def test_spd_guess_with_non_finite_energy_falls_back():
    verdict = WarmStartPolicy(True).decide(measures(energy=math.inf))
    assert verdict.decision is WarmStartDecision.FALLBACK_NOT_FINITE


@pytest.mark.parametrize("symmetric", [True, False])
def test_converged_guess_needs_no_iterations(symmetric):
    verdict = WarmStartPolicy(symmetric).decide(
        measures(residual_norm=1e-4, energy=0.5)
    )
    assert verdict.decision is WarmStartDecision.ALREADY_CONVERGED


@pytest.mark.parametrize(
    ("residual", "decision"),
    [
        (0.5, WarmStartDecision.USE_GUESS),
        (1.0, WarmStartDecision.FALLBACK_WORSE_THAN_ZERO),
        (3.0, WarmStartDecision.FALLBACK_WORSE_THAN_ZERO),
    ],
)
def test_non_symmetric_guess_is_judged_by_its_residual(residual, decision):
    verdict = WarmStartPolicy(False).decide(
        measures(residual_norm=residual, energy=None)
    )
    assert verdict.decision is decision
