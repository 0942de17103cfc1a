"""The training losses' Darcy operators against the assembled matrices."""

import numpy as np
import pytest
import torch

from raysys.solvers.families import DarcyFamily
from raysys.solvers.training import (
    darcy_apply,
    darcy_energy,
    loss_function,
    relative_errors,
    two_grid_refined,
)
from raysys.solvers.warmstart import RefinementSettings, TwoGridRefinement


@pytest.fixture(scope="module")
def instance():
    fam = DarcyFamily()
    inst = fam.sample(np.random.default_rng(9), 24, "t")
    A, b = fam.assemble(inst)
    return fam, inst, A, b


def test_stencil_and_energy_match_the_assembled_matrix(instance):
    _, inst, A, _ = instance
    n = 24
    e = np.random.default_rng(0).standard_normal((n, n))
    a = torch.tensor(inst.fields["a"][None])
    Ae = darcy_apply(torch.tensor(e[None]), a)[0].numpy()
    np.testing.assert_allclose(Ae.ravel(), A @ e.ravel() / (n + 1) ** 2, rtol=1e-12)
    energy = float(darcy_energy(torch.tensor(e[None]), a)[0])
    assert energy == pytest.approx(e.ravel() @ (A @ e.ravel()) / (n + 1) ** 2)


def test_modelled_coarse_correction_equals_the_solver_side_refinement(instance):
    # without sweeps the model is exactly the refinement's coarse correction
    # and energy step, applied to the error
    fam, inst, A, b = instance
    n = 24
    x_star = np.linalg.solve(A.toarray(), b)
    e = 0.05 * np.random.default_rng(1).standard_normal((n, n))
    settings = RefinementSettings(coarse_factor=4, num_pre_sweeps=0, num_post_sweeps=0)
    refinement = TwoGridRefinement.for_instance(fam, inst, settings, A)
    refined, _, _ = refinement.refine(x_star + e.ravel(), b)
    a = torch.tensor(inst.fields["a"][None])
    left = two_grid_refined(torch.tensor(e[None]), a, 0, 4)[0].numpy()
    np.testing.assert_allclose(left.ravel(), refined - x_star, atol=1e-9)


def test_refined_energy_loss_has_gradients_and_is_below_the_raw_energy(instance):
    _, inst, _, _ = instance
    a = torch.tensor(inst.fields["a"][None][None]).float()
    target = torch.rand(1, 1, 24, 24)
    pred = (target + 0.05 * torch.randn(1, 1, 24, 24)).requires_grad_()
    errs = relative_errors(pred, target, a, "darcy", refined=True)
    assert float(errs["refined-energy"][0].detach()) < float(errs["energy"][0].detach())
    loss = loss_function("refined-energy", "darcy")(pred, target, a)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert "refined-energy" not in relative_errors(pred, target, a, "darcy")


def test_a_non_finite_loss_stops_training_with_a_clear_error():
    from raysys.models.fno import FNOConfig
    from raysys.solvers.errors import TrainingDiverged
    from raysys.solvers.training import TrainSettings, build_model, train_operator

    x = torch.ones(4, 1, 8, 8)
    y = torch.rand(4, 1, 8, 8)
    config = FNOConfig(
        in_channels=1, modes=2, width=4, num_layers=1, projection_channels=4
    )
    model = build_model(config, x, y)
    y[2, 0, 3, 3] = float("nan")  # the loss of the batch holding it is NaN
    settings = TrainSettings(epochs=2, batch_size=2, loss="l2")
    with pytest.raises(
        TrainingDiverged, match=r"loss \(l2\) is nan at epoch 1, step [12];"
    ):
        train_operator(model, (x, y), None, "darcy", settings)
