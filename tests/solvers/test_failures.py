"""One failure fails alone: a failed prediction batch, a solve that raises part-way.

The expected numbers come from the solvers run here, in the test process,
independently of the runner and of `solve_instance`.
"""

import numpy as np
import pytest
import ray

import raysys.solvers.worker as worker
from raysys.models.fno import FNO, FNOConfig
from raysys.solvers.datasets import sample_instances
from raysys.solvers.families import get_family
from raysys.solvers.krylov import KrylovSolver
from raysys.solvers.reports import summarise
from raysys.solvers.runner import run_solves
from raysys.solvers.worker import SolveSettings, solve_instance

COLD_FIELDS = (
    "iterations_cold",
    "matvecs_cold",
    "residual_cold",
    "threshold",
    "converged_cold",
)
WARM_FIELDS = (
    "iterations_warm",
    "matvecs_warm",
    "matvecs_refinement",
    "time_warm_s",
    "time_guess_s",
    "residual_warm",
    "converged_warm",
    "fallback",
    "decision",
)
# what a solve gives the same way each time (not its times)
EXACT_FIELDS = (
    "name",
    "resolution",
    "solver",
    "rtol",
    "guess",
    "iterations_cold",
    "iterations_warm",
    "matvecs_cold",
    "matvecs_warm",
    "matvecs_refinement",
    "residual_cold",
    "residual_warm",
    "threshold",
    "converged_cold",
    "converged_warm",
    "fallback",
    "decision",
    "error",
)


def exact(result):
    return {f: getattr(result, f) for f in EXACT_FIELDS}


def cold_solve(inst, solver, rtol):
    """The cold solve, run here with the solver alone."""
    A, b = get_family(inst.family).assemble(inst)
    return KrylovSolver(A, solver, rtol=rtol).solve(b)


def assert_cold_is(result, inst, solver, rtol):
    cold = cold_solve(inst, solver, rtol)
    assert result.iterations_cold == cold.num_iterations
    assert result.matvecs_cold == cold.num_matvecs
    assert result.residual_cold == cold.residual_norm
    assert result.threshold == cold.threshold
    assert result.converged_cold is cold.converged is True
    assert result.time_cold_s > 0


def assert_no_warm(result):
    for field in WARM_FIELDS:
        assert getattr(result, field) is None, field


# ------------------------------------------------------------ a failed prediction

PREDICTION = 0.01  # every entry of every prediction of the stand-in predictor
BATCH_TIME_S = 0.25  # the inference seconds it reports per batch


def flaky_predictor(fail_on_call: int, how: str):
    """A predictor actor that fails on its ``fail_on_call``-th batch.

    ``how``: ``raises`` (the call raises) or ``dies`` (the actor's process
    exits). Other batches get a constant prediction. Defined in a function so
    that Ray ships the class by value.
    """

    class FlakyPredictor:
        def __init__(self):
            self.calls = 0

        def predict(self, features):
            import os
            import time

            self.calls += 1
            if self.calls == fail_on_call:
                if how == "dies":
                    # the reply of the batch before may still be on its way:
                    # exiting at once loses it (then that batch fails too)
                    time.sleep(1.0)
                    os._exit(1)
                raise RuntimeError(f"predictor broke on batch {self.calls}")
            batch, _, n, _ = features.shape
            return np.full((batch, n, n), PREDICTION), BATCH_TIME_S

    return ray.remote(FlakyPredictor).options(num_cpus=0).remote()


def unused_model():
    """A Darcy operator for the runner's checks; the stand-in predicts instead."""
    return FNO(FNOConfig(in_channels=1, modes=2, width=4, num_layers=1,
                         projection_channels=4, metadata={"family": "darcy"}))  # fmt: skip


SETTINGS = SolveSettings(
    solvers=("cg",), rtols=(1e-5,), guesses=("operator", "coarse-grid")
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "max_in_flight", "error"),
    [
        (
            "raises",
            None,
            "no operator guess: the predictor failed on its batch: "
            "RuntimeError: predictor broke on batch 2",
        ),
        # Ray's own words follow: the first line of its message; one task at a
        # time, so the instances run again through the queue
        (
            "dies",
            1,
            "no operator guess: the predictor failed on its batch: ActorDiedError: ",
        ),
    ],
    ids=["raises", "dies"],
)
def test_a_failed_prediction_batch_keeps_its_cold_and_other_solves(
    ray_cluster, monkeypatch, how, max_in_flight, error
):
    import raysys.solvers.runner as runner

    monkeypatch.setattr(
        runner, "start_predictor", lambda model, **options: flaky_predictor(2, how)
    )
    instances = sample_instances("darcy", 16, 9, range(4), with_reference=False)
    outcome = run_solves(
        instances,
        SETTINGS,
        model=unused_model(),
        batch_size=2,
        max_in_flight=max_in_flight,
        progress=False,
    )
    results = outcome.results
    assert [(r.name, r.guess) for r in results] == [
        (inst.name, guess) for inst in instances for guess in SETTINGS.guesses
    ]
    # the first batch (instances 0 and 1) was predicted: everything solved
    for inst, op, coarse in zip(
        instances[:2], results[0:4:2], results[1:4:2], strict=True
    ):
        expected = solve_instance(
            inst, np.full((16, 16), PREDICTION), BATCH_TIME_S / 2, SETTINGS
        )
        assert [exact(op), exact(coarse)] == [exact(r) for r in expected]
        assert op.time_guess_s == BATCH_TIME_S / 2
        assert_cold_is(op, inst, "cg", 1e-5)
    # the second batch's prediction failed: its instances keep their cold solves
    # and their coarse-grid warm solves; only the operator's warm solves fail
    for inst, op, coarse in zip(
        instances[2:], results[4::2], results[5::2], strict=True
    ):
        if how == "raises":
            assert op.error == error
        else:
            assert op.error.startswith(error) and "\n" not in op.error, op.error
            assert len(op.error) > len(error)
        assert_cold_is(op, inst, "cg", 1e-5)
        assert_no_warm(op)
        assert coarse.error is None
        assert_cold_is(coarse, inst, "cg", 1e-5)
        expected = solve_instance(
            inst, None, 0.0, SolveSettings(solvers=("cg",), rtols=(1e-5,),
                                           guesses=("coarse-grid",))
        )  # fmt: skip
        assert exact(coarse) == exact(expected[0])
    # only the batch that was predicted counts towards the inference time
    assert outcome.inference_time_s == BATCH_TIME_S
    operator = summarise([r for r in results if r.guess == "operator"])
    assert (operator.num_instances, operator.num_failed) == (4, 2)
    coarse = summarise([r for r in results if r.guess == "coarse-grid"])
    assert (coarse.num_instances, coarse.num_failed) == (4, 0)


@pytest.mark.slow
def test_a_predictor_that_cannot_start_names_what_its_init_raised(
    ray_cluster, monkeypatch
):
    import raysys.solvers.runner as runner

    class BrokenPredictor:
        def __init__(self):
            raise RuntimeError("CUDA error: out of memory")

        def predict(self, features):
            raise AssertionError("never called")

    monkeypatch.setattr(
        runner,
        "start_predictor",
        lambda model, **options: (
            ray.remote(BrokenPredictor).options(num_cpus=0).remote()
        ),
    )
    settings = SolveSettings(solvers=("cg",), rtols=(1e-5,), guesses=("operator",))
    instances = sample_instances("darcy", 16, 9, range(3), with_reference=False)
    outcome = run_solves(
        instances, settings, model=unused_model(), batch_size=2, progress=False
    )
    # every batch fails; the error is what __init__ raised, on one line, not
    # Ray's task header (colour codes, pid) that begins its message
    assert [r.error for r in outcome.results] == [
        "no operator guess: the predictor failed on its batch: ActorDiedError: "
        "the actor could not start: RuntimeError: CUDA error: out of memory"
    ] * 3
    for r, inst in zip(outcome.results, instances, strict=True):
        assert r.name == inst.name
        assert_cold_is(r, inst, "cg", 1e-5)
        assert_no_warm(r)
    assert outcome.inference_time_s == 0.0


# ------------------------------------------------------------ a solve that raises


def raising_on(target, when):
    """``target`` wrapped to raise RuntimeError('boom') when ``when(args)``."""

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            raise RuntimeError("boom")
        return target(*args, **kwargs)

    return wrapped


TWO_RTOLS = SolveSettings(
    solvers=("cg",), rtols=(1e-3, 1e-6), guesses=("operator", "coarse-grid")
)


@pytest.fixture
def instance():
    return sample_instances("darcy", 16, 10, [0], with_reference=True)[0]


def test_a_warm_solve_that_raises_fails_alone(instance, monkeypatch):
    guess = instance.reference * 0.98
    before = solve_instance(instance, guess, 0.01, TWO_RTOLS)
    # the coarse-grid warm solve at 1e-6 raises, after three solves finished
    monkeypatch.setattr(
        worker,
        "warm_solve",
        raising_on(
            worker.warm_solve,
            lambda *a, name, **k: name.endswith("rtol 1e-06, coarse-grid)"),
        ),
    )
    results = solve_instance(instance, guess, 0.01, TWO_RTOLS)
    assert [(r.rtol, r.guess) for r in results] == [
        (1e-3, "operator"),
        (1e-3, "coarse-grid"),
        (1e-6, "operator"),
        (1e-6, "coarse-grid"),
    ]
    assert [exact(r) for r in results[:3]] == [exact(r) for r in before[:3]]
    failed = results[3]
    assert failed.error == "warm solve failed: RuntimeError: boom"
    assert_cold_is(failed, instance, "cg", 1e-6)
    assert_no_warm(failed)


def test_a_guess_that_cannot_be_made_fails_its_warm_solves_alone(instance, monkeypatch):
    guess = instance.reference * 0.98
    before = solve_instance(instance, guess, 0.01, TWO_RTOLS)
    monkeypatch.setattr(
        worker,
        "coarse_grid_guess",
        raising_on(worker.coarse_grid_guess, lambda *a: True),
    )
    results = solve_instance(instance, guess, 0.01, TWO_RTOLS)
    assert [exact(r) for r in results[0::2]] == [exact(r) for r in before[0::2]]
    for r, rtol in zip(results[1::2], (1e-3, 1e-6), strict=True):
        assert (r.rtol, r.guess) == (rtol, "coarse-grid")
        assert r.error == "coarse-grid guess failed: RuntimeError: boom"
        assert_cold_is(r, instance, "cg", rtol)
        assert_no_warm(r)


def test_a_cold_solve_that_raises_fails_its_setting_alone(instance, monkeypatch):
    settings = SolveSettings(
        solvers=("cg", "gmres"), rtols=(1e-3, 1e-6), guesses=("operator",)
    )
    guess = instance.reference * 0.98
    before = solve_instance(instance, guess, 0.01, settings)

    class Solver(KrylovSolver):
        # GMRES's cold solve (from x0 = 0) at 1e-6 raises
        def solve(self, b, x0=None, **kwargs):
            if self.solver == "gmres" and self.rtol == 1e-6 and x0 is None:
                raise RuntimeError("boom")
            return super().solve(b, x0, **kwargs)

    monkeypatch.setattr(worker, "KrylovSolver", Solver)
    results = solve_instance(instance, guess, 0.01, settings)
    assert [(r.solver, r.rtol) for r in results] == [
        ("cg", 1e-3),
        ("cg", 1e-6),
        ("gmres", 1e-3),
        ("gmres", 1e-6),
    ]
    assert [exact(r) for r in results[:3]] == [exact(r) for r in before[:3]]
    failed = results[3]
    assert failed.error == "cold solve failed: RuntimeError: boom"
    assert failed.resolution == 16
    for field in COLD_FIELDS + WARM_FIELDS + ("time_cold_s",):
        assert getattr(failed, field) is None, field
