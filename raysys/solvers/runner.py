"""Fan solves out over the cluster and stream their results back.

1. Each instance is validated on the driver; a bad one (wrong shape, NaN or
   non-positive coefficient, unknown family) gets an error result and goes no
   further.
2. When an operator guess is wanted, the valid instances go, grouped by grid
   size, in batches to one predictor actor (on a GPU when the cluster has one).
3. Every instance becomes one solve task that depends on its batch's
   prediction, so solves start as soon as their batch is predicted. When a
   batch's prediction fails (the actor raises or dies), the tasks of its
   instances fail with it before they run; each is submitted again without
   the prediction, so its cold solves and the warm solves from the other
   guesses still run, and only its operator warm solves are reported failed,
   naming the predictor's error.
4. Results come back as tasks finish (``ray.wait``), with a progress bar; the
   whole run is bounded by ``timeout_s``, after which unfinished instances are
   cancelled and reported as timed out. A task that dies becomes its
   instance's error; the others finish. Within a task, a solve that raises
   fails only the results that need it (see `raysys.solvers.worker`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from raysys.models.fno import FNO
from raysys.runtime.errors import last_line
from raysys.solvers.errors import InvalidInstance
from raysys.solvers.families import Instance, get_family
from raysys.solvers.predictor import start_predictor
from raysys.solvers.reports import InstanceResult
from raysys.solvers.worker import (
    SolveSettings,
    check_solver_fits,
    failed_results,
    solve_instance_task,
)

logger = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """Results of a run, in the order of the input instances."""

    results: list[InstanceResult]
    inference_time_s: float
    wall_time_s: float


def check_model_fits(
    model: FNO,
    family: str,
    *,
    data: str = "the data",
    fix: str = "train one for this family with jobs/nows_train.py",
) -> None:
    """The model must have been trained on the family's input channels.

    Raises:
        InvalidInstance: the channel count or the recorded family differs.
    """
    fam = get_family(family)
    trained_on = model.config.metadata.get("family")
    if trained_on is not None and trained_on != family:
        raise InvalidInstance(
            f"the operator was trained on {trained_on!r} instances, but {data} is "
            f"{family!r}; {fix}"
        )
    if model.config.in_channels != len(fam.feature_names):
        raise InvalidInstance(
            f"the operator takes {model.config.in_channels} input fields, but "
            f"{family!r} has {len(fam.feature_names)} "
            f"({', '.join(fam.feature_names)}); {fix}"
        )


def _validate(inst: Instance, settings: SolveSettings) -> np.ndarray:
    fam = get_family(inst.family)
    for solver in settings.solvers:
        check_solver_fits(inst.family, solver)
    return fam.features(inst)  # validates the fields


def run_solves(
    instances: Sequence[Instance],
    settings: SolveSettings,
    *,
    model: FNO | None = None,
    batch_size: int = 16,
    timeout_s: float = 3600.0,
    max_in_flight: int | None = None,
    progress: bool = True,
    task_options: dict[str, Any] | None = None,
    predictor_options: dict[str, Any] | None = None,
) -> RunOutcome:
    """Solve every instance cold and warm on the cluster.

    Args:
        instances: the instances; names should be unique.
        settings: solvers, tolerances, guess kinds and post-processing.
        model: the operator, needed when ``"operator"`` is in the guesses.
        batch_size: instances per prediction batch.
        timeout_s: bound on the whole run; the rest are reported timed out.
        max_in_flight: most solve tasks running at once (None: all submitted).
        progress: show a progress bar.
        task_options: Ray options for the solve tasks (a tenant of the sharing
            platform keeps them near its own node and lets Ray retry them when
            a node vanishes: ``max_retries`` counts system failures only).
        predictor_options: Ray options for the predictor actor (``num_gpus``,
            ``max_restarts``, ``max_task_retries``, a scheduling strategy).
    """
    start = time.perf_counter()
    wants_operator = "operator" in settings.guesses
    if wants_operator and model is None:
        raise ValueError("an operator guess was asked for but no model was given")

    slots: list[list[InstanceResult] | None] = [None] * len(instances)
    valid: list[tuple[int, np.ndarray]] = []
    for i, inst in enumerate(instances):
        try:
            valid.append((i, _validate(inst, settings)))
        except InvalidInstance as e:
            logger.warning("instance %s rejected: %s", inst.name, e)
            slots[i] = failed_results(inst.name, settings, str(e))

    # batches of equal grid size go to the predictor
    predictions: dict[int, tuple[ray.ObjectRef | None, int]] = {
        i: (None, 0) for i, _ in valid
    }
    batch_refs: list[ray.ObjectRef] = []
    actor = None
    if wants_operator and valid:
        families = {instances[i].family for i, _ in valid}
        for family in families:
            check_model_fits(model, family)
        actor = start_predictor(model, **(predictor_options or {}))
        by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, feats in valid:
            by_shape.setdefault(feats.shape, []).append((i, feats))
        for group in by_shape.values():
            for k in range(0, len(group), batch_size):
                chunk = group[k : k + batch_size]
                ref = actor.predict.remote(np.stack([f for _, f in chunk]))
                batch_refs.append(ref)
                for row, (i, _) in enumerate(chunk):
                    predictions[i] = (ref, row)

    pending: dict[ray.ObjectRef, int] = {}
    queue = [i for i, _ in valid]
    # instances whose batch's prediction failed: they run without it
    operator_errors: dict[int, str] = {}
    batch_errors: dict[ray.ObjectRef, str | None] = {}

    def submit(i: int) -> None:
        ref, row = predictions[i]
        error = operator_errors.get(i)
        if error is not None:
            ref, row = None, 0
        task = solve_instance_task.options(**(task_options or {})).remote(
            instances[i], ref, row, settings, error
        )
        pending[task] = i

    def finish(task: ray.ObjectRef) -> bool:
        """Collect a finished task; False when it must run again without its
        prediction, which failed (its task failed with it, nothing solved)."""
        i = pending.pop(task)
        try:
            slots[i] = ray.get(task, timeout=60)
            return True
        except ray.exceptions.RayError as e:
            batch = predictions[i][0]
            if batch is not None and i not in operator_errors:
                error = _prediction_error(batch, batch_errors)
                if error is not None:
                    operator_errors[i] = error
                    queue.insert(0, i)
                    return False
            slots[i] = _task_failed(e, instances[i], settings)
            return True

    limit = max_in_flight or len(queue) or 1
    bar = tqdm(
        total=len(instances), desc="solves", disable=not progress, unit="instance"
    )
    bar.update(len(instances) - len(valid))
    deadline = start + timeout_s
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                submit(queue.pop(0))
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=remaining)
            for task in done:
                bar.update(finish(task))
        if pending:
            # tasks that finished while the bound ran out are kept, not cancelled
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for task in done:
                bar.update(finish(task))
    finally:
        bar.close()
    for ref, i in pending.items():
        ray.cancel(ref, force=True)
        slots[i] = failed_results(
            instances[i].name,
            settings,
            f"timed out: the run's {timeout_s:g} s bound passed before it finished",
        )
    for i in queue:
        slots[i] = failed_results(
            instances[i].name,
            settings,
            f"not started: the run's {timeout_s:g} s bound passed first",
        )

    inference_time_s = 0.0
    if batch_refs:
        finished, _ = ray.wait(batch_refs, num_returns=len(batch_refs), timeout=0)
        for ref in finished:
            # a failed batch's instances already carry the error
            with contextlib.suppress(ray.exceptions.RayError):
                inference_time_s += ray.get(ref)[1]
    if actor is not None:
        ray.kill(actor)
    return RunOutcome(
        results=[r for slot in slots for r in slot],
        inference_time_s=inference_time_s,
        wall_time_s=time.perf_counter() - start,
    )


def _task_failed(
    e: ray.exceptions.RayError, inst: Instance, settings: SolveSettings
) -> list[InstanceResult]:
    logger.warning("instance %s: its solve task failed: %s", inst.name, e)
    cause = getattr(e, "cause", None) or e
    return failed_results(
        inst.name, settings, f"task failed: {type(cause).__name__}: {cause}"
    )


def _prediction_error(
    batch: ray.ObjectRef, known: dict[ray.ObjectRef, str | None]
) -> str | None:
    """Why ``batch``'s prediction failed, or None when it did not (or is not done).

    ``known`` caches the answers, so each failed batch is logged once.
    """
    if batch not in known:
        ready, _ = ray.wait([batch], timeout=0)
        if not ready:
            return None
        try:
            ray.get(batch, timeout=0)
            known[batch] = None
        except ray.exceptions.RayError as e:
            logger.warning("a prediction batch failed: %s", e)
            cause = getattr(e, "cause", None)
            if isinstance(e, ray.exceptions.RayTaskError) and cause is not None:
                what = f"{type(cause).__name__}: {cause}"
            elif getattr(e, "actor_init_failed", False):
                # its __init__ raised: the message's first line is Ray's task
                # header (colour codes, pid); the exception ends the traceback
                what = f"{type(e).__name__}: the actor could not start: {last_line(e)}"
            else:  # a system error (the actor died): its first line says what
                first = next(iter(str(e).strip().splitlines()), "")
                what = f"{type(e).__name__}: {first}"
            known[batch] = f"the predictor failed on its batch: {what}"
    return known[batch]
