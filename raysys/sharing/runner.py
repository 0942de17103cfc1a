"""The runner actor: runs one tenant workload on one provider.

The controller creates a runner pinned to the chosen provider's node with the
workload's GPU share. ``start`` builds the workload, then restores the newest
committed checkpoint of it (or, on a first start, commits the freshly built
state as step 0), and steps it in a thread so that ``poll`` and
``checkpoint_and_stop`` are answered while it runs.

Crash ordering: the runner commits a checkpoint from the stepping thread
between two steps, so a checkpoint always holds the state after a whole number
of steps, and the step count saved with it is exactly that number. The
platform's record of progress (`RunnerStatus.last_checkpoint_step`) advances
only after `TenantStore.save` has written the commit marker; a runner that dies
mid-save leaves a torn checkpoint that the next incarnation skips.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from typing import Any

import ray

from raysys.sharing.store import CheckpointError, CheckpointStore, StaleIncarnation
from raysys.sharing.workload import (
    WorkloadContext,
    WorkloadSpec,
    check_workload_class,
    step_metrics,
)

logger = logging.getLogger(__name__)

CONTRACT_METHODS = frozenset(
    {"step", "state_dict", "load_state_dict", "setup", "is_done"}
)


def _error_text(e: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
    return f"{type(e).__name__}: {e}\n{tb}"


class WorkloadRunner:
    """Runs one workload incarnation; created by the controller, never by tenants.

    Args:
        spec: the workload's spec as a dict (validated again here).
        cls: the tenant's workload class.
        args, kwargs: constructor arguments.
        store_location: checkpoint store directory or URI.
        keep_last: checkpoints kept per workload.
        incarnation: 0 for the first runner of the workload, +1 per restart.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        cls: type,
        args: tuple,
        kwargs: dict[str, Any],
        store_location: str,
        keep_last: int,
        incarnation: int,
    ):
        self.spec = WorkloadSpec.model_validate(spec)
        self.cls = check_workload_class(cls)
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.store = CheckpointStore(store_location, keep_last).tenant(self.spec.tenant)
        self.incarnation = incarnation
        self.obj: Any = None
        self.step = 0
        self.steps_run = 0
        self.state = "starting"
        self.error: str | None = None
        self.last_checkpoint_step: int | None = None
        self.last_checkpoint_at: float | None = None
        self.started_at = time.time()
        # Step metrics not yet handed to the controller, and those of the steps
        # since the last commit. Each checkpoint carries both, so metrics of
        # steps a lost runner completed but never reported come back with the
        # checkpoint the next incarnation restores.
        self._metrics: collections.deque = collections.deque()
        self._since_commit: list[tuple[int, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._checkpoint_on_stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Build the workload, restore its newest committed checkpoint, start stepping.

        Returns:
            ``{"ok": True, "resumed_step": n, "from_checkpoint": bool,
            "checkpoint_id": ...}``, or ``{"ok": False, "error": text}`` when
            the tenant's constructor, ``setup`` or ``load_state_dict`` raised.
        """
        name = self.spec.workload_id
        try:
            obj = self.cls(*self.args, **self.kwargs)
            setup = getattr(obj, "setup", None)
            if callable(setup):
                setup(self._context())
            checkpoint = self.store.latest(self.spec.name)
            if checkpoint is not None:
                obj.load_state_dict(checkpoint.state)
                self.step = checkpoint.step
                self.last_checkpoint_step = checkpoint.step
                self.last_checkpoint_at = checkpoint.created_at
                for step, values in checkpoint.metadata.get("metrics", []):
                    self._metrics.append((int(step), values))
                checkpoint_id = checkpoint.info.checkpoint_id
                logger.info(
                    "%s incarnation %d resumes at step %d from %s",
                    name,
                    self.incarnation,
                    checkpoint.step,
                    checkpoint_id,
                )
            else:
                self.obj = obj
                checkpoint_id = self._commit(final=False).checkpoint_id
                logger.info("%s starts fresh; initial state committed", name)
        except Exception as e:  # the tenant's code failed: report, do not crash
            self.state, self.error = "failed", _error_text(e)
            logger.warning("%s failed to start: %s", name, e)
            return {"ok": False, "error": self.error}
        self.obj = obj
        self.state = "running"
        resumed_step = self.step
        self._thread = threading.Thread(
            target=self._run, name=f"step-{name}", daemon=True
        )
        self._thread.start()
        return {
            "ok": True,
            "resumed_step": resumed_step,
            "from_checkpoint": checkpoint is not None,
            "checkpoint_id": checkpoint_id,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def _context(self) -> WorkloadContext:
        gpu_ids = list(ray.get_gpu_ids())
        device = "cpu"
        if gpu_ids:
            try:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            except ImportError:
                device = "cpu"
        return WorkloadContext(
            tenant=self.spec.tenant,
            workload=self.spec.name,
            incarnation=self.incarnation,
            store=self.store,
            device=device,
            gpu_ids=gpu_ids,
        )

    def _due(self, since_step: int, since_t: float) -> bool:
        policy = self.spec.checkpoint
        if (
            policy.every_steps is not None
            and self.step - since_step >= policy.every_steps
        ):
            return True
        return policy.every_s is not None and time.time() - since_t >= policy.every_s

    def _finished(self) -> bool:
        if self.spec.num_steps is not None and self.step >= self.spec.num_steps:
            return True
        is_done = getattr(self.obj, "is_done", None)
        return bool(is_done()) if callable(is_done) else False

    def _run(self) -> None:
        name = self.spec.workload_id
        since_step, since_t = self.step, time.time()
        try:
            while not self._stop.is_set() and not self._finished():
                value = self.obj.step()
                with self._lock:
                    self.step += 1
                    self.steps_run += 1
                    entry = (self.step, step_metrics(value))
                    self._metrics.append(entry)
                    self._since_commit.append(entry)
                if self._due(since_step, since_t):
                    self._commit(final=False)
                    since_step, since_t = self.step, time.time()
            if self._stop.is_set():
                if self._checkpoint_on_stop and self.last_checkpoint_step != self.step:
                    self._commit(final=False)
                self.state = "stopped"
            else:
                self._commit(final=True)
                self.state = "done"
            logger.info("%s %s at step %d", name, self.state, self.step)
        except StaleIncarnation as e:
            self.state, self.error = "fenced", str(e)
            logger.warning("%s stops: %s", name, e)
        except Exception as e:  # the tenant's step failed: this workload alone fails
            self.state, self.error = "failed", _error_text(e)
            logger.warning("%s failed at step %d: %s", name, self.step, e)

    def _commit(self, *, final: bool):
        with self._lock:
            carried = dict(self._since_commit)
            carried.update(self._metrics)
        try:
            info = self.store.save(
                self.spec.name,
                self.step,
                self.obj.state_dict(),
                incarnation=self.incarnation,
                metadata={
                    "final": final,
                    "steps_run": self.steps_run,
                    "metrics": sorted(carried.items()),
                },
            )
        except StaleIncarnation:
            raise
        except CheckpointError as e:
            # The previous commit still stands; try again at the next trigger.
            logger.warning(
                "%s: checkpoint at step %d failed: %s",
                self.spec.workload_id,
                self.step,
                e,
            )
            if final:
                raise
            return None
        with self._lock:
            self.last_checkpoint_step = info.step
            self.last_checkpoint_at = time.time()
            self._since_commit.clear()
        return info

    # -- control (answered while the stepping thread runs) -------------------

    def poll(self) -> dict[str, Any]:
        """Progress since the last poll: state, step, checkpoint, step metrics."""
        with self._lock:
            metrics = list(self._metrics)
            self._metrics.clear()
            return {
                "state": self.state,
                "step": self.step,
                "steps_run": self.steps_run,
                "error": self.error,
                "last_checkpoint_step": self.last_checkpoint_step,
                "last_checkpoint_at": self.last_checkpoint_at,
                "metrics": metrics,
            }

    def checkpoint_and_stop(self, timeout_s: float) -> dict[str, Any]:
        """Finish the current step, commit a checkpoint, stop (graceful migration).

        Waits at most ``timeout_s`` for the stepping thread. Returns the final
        `poll` answer; ``state`` is ``"stopped"`` (or ``"done"`` / ``"failed"``
        when the workload ended first, or ``"stopping"`` when the bound ran out).
        After ``"stopping"`` the call may be repeated: it waits again and
        reports how the stop ended.
        """
        self._checkpoint_on_stop = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, timeout_s))
            if self._thread.is_alive():
                # Reported, not stored: the stepping thread records how it
                # ends, and a thread ending right now must not be overwritten.
                return dict(self.poll(), state="stopping")
        elif self.state == "running":
            self.state = "stopped"
        return self.poll()

    def stop(self) -> None:
        """Stop after the current step without a checkpoint."""
        self._stop.set()

    def call(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Call a public method of the running workload (not its contract
        methods); how it shares state with ``step()`` is the workload's business.

        Raises:
            AttributeError: the method is private, part of the contract, or absent.
        """
        if method.startswith("_") or method in CONTRACT_METHODS:
            raise AttributeError(
                f"{method!r} cannot be called from outside: private or part of the "
                "workload contract"
            )
        target = getattr(self.obj, method, None)
        if not callable(target):
            raise AttributeError(f"{type(self.obj).__name__} has no method {method!r}")
        return target(*args, **kwargs)


RemoteRunner = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=4)(
    WorkloadRunner
)
