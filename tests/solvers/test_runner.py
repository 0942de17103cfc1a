import math
import time

import numpy as np
import pytest
import ray
import scipy.sparse.linalg as spla
import torch

from raysys.models.fno import FNO, FNOConfig
from raysys.solvers.datasets import sample_instances
from raysys.solvers.errors import InvalidInstance
from raysys.solvers.families import DarcyFamily, Instance
from raysys.solvers.reports import summarise
from raysys.solvers.runner import check_model_fits, run_solves
from raysys.solvers.warmstart import RefinementSettings, prolongation
from raysys.solvers.worker import SolveSettings, solve_instance


def scaled_solution_model(n_train=16):
    """An untrained operator whose output is close to the typical solution size."""
    torch.manual_seed(0)
    model = FNO(
        FNOConfig(
            in_channels=1,
            modes=4,
            width=8,
            num_layers=2,
            projection_channels=8,
            metadata={"family": "darcy"},
        )
    )
    train = sample_instances("darcy", n_train, 0, range(8), True)
    x = torch.tensor(np.stack([i.fields["a"][None] for i in train])).float()
    y = torch.tensor(np.stack([i.reference[None] for i in train])).float()
    model.set_normalisation(x, y)
    return model.eval()


@pytest.mark.slow
def test_bad_instances_fail_alone_and_the_others_converge(ray_cluster):
    good = sample_instances("darcy", 16, 5, range(4), with_reference=False)
    nan_a = np.full((16, 16), 3.0)
    nan_a[2, 5] = np.nan
    negative = np.full((16, 16), 3.0)
    negative[0, 0] = -1.0
    bad = [
        Instance("has-nan", "darcy", {"a": nan_a}),
        Instance("negative", "darcy", {"a": negative}),
        Instance("not-square", "darcy", {"a": np.ones((16, 12))}),
    ]
    instances = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3]]
    outcome = run_solves(
        instances,
        SolveSettings(solvers=("cg",), rtols=(1e-6,), num_smoothing_sweeps=1),
        model=scaled_solution_model(),
        batch_size=2,
        progress=False,
    )
    by_name = {r.name: r for r in outcome.results}
    assert [r.name for r in outcome.results] == [i.name for i in instances]
    assert "non-finite" in by_name["has-nan"].error
    assert "positive" in by_name["negative"].error
    assert "shape" in by_name["not-square"].error
    for inst in good:
        r = by_name[inst.name]
        assert r.error is None
        assert r.converged_cold and r.converged_warm
        assert r.residual_warm <= r.threshold and r.residual_cold <= r.threshold
        assert r.time_guess_s > 0
    summary = summarise(outcome.results)
    assert summary.num_instances == 7 and summary.num_failed == 3
    assert summary.num_converged_warm == 4
    assert outcome.inference_time_s > 0


@pytest.mark.slow
def test_nan_predictions_fall_back_to_cold_solves(ray_cluster):
    model = scaled_solution_model()
    model.out_std.fill_(float("nan"))
    instances = sample_instances("darcy", 16, 6, range(3), with_reference=False)
    outcome = run_solves(
        instances,
        SolveSettings(solvers=("cg",), rtols=(1e-5,)),
        model=model,
        progress=False,
    )
    for r in outcome.results:
        assert r.fallback and r.decision == "fallback-not-finite"
        assert r.converged_warm
        assert r.matvecs_warm == r.matvecs_cold
    assert summarise(outcome.results).num_fallbacks == 3


@pytest.mark.slow
def test_run_bound_reports_unfinished_instances(ray_cluster):
    instances = sample_instances("darcy", 16, 7, range(3), with_reference=False)
    outcome = run_solves(
        instances,
        SolveSettings(guesses=("coarse-grid",)),
        timeout_s=1e-6,
        progress=False,
    )
    assert all("bound" in r.error for r in outcome.results)


@pytest.mark.parametrize("refined", [False, True])
def test_coarse_grid_and_operator_guesses_share_the_cold_solve(refined):
    inst = sample_instances("darcy", 16, 8, [0], with_reference=True)[0]
    refinement = RefinementSettings(coarse_factor=4, num_pre_sweeps=2)
    settings = SolveSettings(
        solvers=("cg", "amg-cg"),
        rtols=(1e-3, 1e-6),
        guesses=("operator", "coarse-grid", "zero"),
        num_smoothing_sweeps=2,
        refinement=refinement if refined else None,
    )
    results = solve_instance(inst, inst.reference * 0.98, 0.01, settings)
    # the zero guess runs only where the refinement applies (CG)
    assert len(results) == 2 * (2 + refined) + 2 * 2
    for solver in ("cg", "amg-cg"):
        for rtol in (1e-3, 1e-6):
            group = [r for r in results if r.solver == solver and r.rtol == rtol]
            assert len({r.matvecs_cold for r in group}) == 1
            assert all(r.converged_cold and r.converged_warm for r in group)
    near = [r for r in results if r.guess == "operator" and r.solver == "cg"]
    assert all(r.matvecs_warm < r.matvecs_cold for r in near)
    if refined:
        # 2 sweeps, the residual (none from zero), A d, then transfers and the
        # coarse LU in nnz(A) units, rounded up; no post-sweeps, so the policy
        # reuses the refinement's residual
        A, _ = DarcyFamily().assemble(inst)
        P = prolongation(16, 4)
        coarse_A, _ = DarcyFamily().assemble(DarcyFamily().resample(inst, 4))
        lu = spla.splu(coarse_A.tocsc(), permc_spec="MMD_AT_PLUS_A")
        L, U = lu.L.tocsc(), lu.U.tocsr()
        flops = sum((L[:, j].nnz) * (U[j, :].nnz) for j in range(coarse_A.shape[0]))
        extra = math.ceil((2 * P.nnz + L.nnz + U.nnz + flops) / A.nnz)
        for r in results:
            if r.solver == "cg":
                assert r.matvecs_refinement == 2 + 2 + extra
                assert r.matvecs_warm == r.iterations_warm + r.matvecs_refinement
    for r in results:
        if r.solver == "amg-cg" or not refined:
            # the policy's product, plus two sweeps for CG; AMG-CG's V-cycles
            # smooth
            sweeps = 0 if r.solver == "amg-cg" else 2
            assert r.matvecs_refinement == sweeps
            assert r.matvecs_warm == r.iterations_warm + 1 + sweeps


def test_cg_on_a_non_symmetric_family_is_refused():
    inst = sample_instances("convection-diffusion", 8, 0, [0], False)[0]
    with pytest.raises(InvalidInstance, match="gmres or bicgstab"):
        solve_instance(inst, None, 0.0, SolveSettings(solvers=("cg",)))


def test_model_of_another_family_is_refused():
    with pytest.raises(InvalidInstance, match="trained on 'darcy'"):
        check_model_fits(scaled_solution_model(), "convection-diffusion")


def test_convection_diffusion_solves_with_gmres_and_bicgstab():
    inst = sample_instances("convection-diffusion", 20, 3, [0], True)[0]
    settings = SolveSettings(
        solvers=("gmres", "bicgstab"),
        rtols=(1e-8,),
        guesses=("operator", "coarse-grid"),
    )
    results = solve_instance(inst, inst.reference * 0.99, 0.0, settings)
    assert len(results) == 4
    for r in results:
        assert r.converged_cold and r.converged_warm
        assert r.residual_warm <= r.threshold
    near = [r for r in results if r.guess == "operator"]
    assert all(r.matvecs_warm < r.matvecs_cold for r in near)


class _BoundPassesAsTasksFinish:
    """`ray` for the runner, but its waits in the loop see the bound pass first.

    The loop's wait lets the tasks finish, then sleeps out the bound and reports
    nothing done: the tasks finished while the bound ran out.
    """

    def __getattr__(self, name):
        return getattr(ray, name)

    def wait(self, refs, num_returns=1, timeout=None):
        if num_returns == 1 and timeout:
            ray.wait(refs, num_returns=len(refs))
            time.sleep(timeout)
            return [], list(refs)
        return ray.wait(refs, num_returns=num_returns, timeout=timeout)


@pytest.mark.slow
def test_solves_finished_when_the_bound_passes_are_kept(ray_cluster, monkeypatch):
    import raysys.solvers.runner as runner

    instances = sample_instances("darcy", 8, 8, range(2), with_reference=False)
    monkeypatch.setattr(runner, "ray", _BoundPassesAsTasksFinish())
    outcome = run_solves(
        instances, SolveSettings(guesses=("coarse-grid",)), timeout_s=1.0,
        progress=False,
    )  # fmt: skip
    assert [r.error for r in outcome.results] == [None, None]
    assert all(r.converged_cold and r.converged_warm for r in outcome.results)
