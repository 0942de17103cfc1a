"""`SharingClient`: the public face of the sharing platform.

    from raysys.sharing import SharingClient, WorkloadSpec

    client = SharingClient.start(store="/shared/checkpoints")   # or .connect()
    wid = client.submit(MyTrainer, WorkloadSpec(tenant="lab-b", name="run-1",
                        gpus=0.5, kind="batch", num_steps=1000,
                        checkpoint={"every_steps": 50}), lr=1e-3)
    client.wait([wid], timeout_s=600)
    result = client.result(wid)          # final state + step metrics
    client.migrations()                  # every move, graceful or sudden

Every call waits on the controller with a bound and raises `RemoteTimeout`
when the bound runs out.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysys.runtime.errors import (
    ClusterError,
    ConfigError,
    RemoteTimeout,
    UnsatisfiableResources,
    last_line,
)
from raysys.runtime.local_cluster import HEAD_RESOURCE
from raysys.runtime.ray_env import bounded_get
from raysys.sharing.agent import NAMESPACE, find_agent
from raysys.sharing.controller import RemoteController
from raysys.sharing.names import check_name
from raysys.sharing.records import (
    TERMINAL_STATES,
    MigrationRecord,
    PlatformConfig,
    SharingStatus,
    WorkloadResult,
    WorkloadStatus,
)
from raysys.sharing.workload import WorkloadSpec, check_workload_class

logger = logging.getLogger(__name__)

DEFAULT_CONTROLLER = "raysys-sharing"


class SharingClient:
    """Submit, watch and collect tenant workloads on the sharing platform.

    Args:
        controller: the controller actor handle.
        call_timeout_s: bound on each call to the controller.
    """

    def __init__(self, controller, *, name: str, call_timeout_s: float = 30.0):
        self._controller = controller
        self.name = name
        self.call_timeout_s = call_timeout_s

    # -- life cycle ----------------------------------------------------------

    @classmethod
    def start(
        cls,
        config: PlatformConfig | dict[str, Any] | None = None,
        *,
        runtime_env: dict[str, Any] | None = None,
        call_timeout_s: float = 30.0,
        **overrides: Any,
    ) -> SharingClient:
        """Start the platform's controller (or reuse the running one of that name).

        Args:
            config: a `PlatformConfig` or its fields; keyword ``overrides`` are
                merged in (``store=`` is the one field without a default).
            runtime_env: Ray runtime environment of the controller and, through
                it, of every runner (for example the project's working dir).
            call_timeout_s: bound on each call to the controller.

        Raises:
            ConfigError: an invalid setting.
            ClusterError: Ray is not initialised, or the controller did not start.
        """
        if not ray.is_initialized():
            raise ClusterError(
                "Ray is not initialised; call raysys.runtime.init_ray() first"
            )
        data = (
            config.model_dump()
            if isinstance(config, PlatformConfig)
            else dict(config or {})
        )
        data.update(overrides)
        if isinstance(data.get("store"), os.PathLike):
            data["store"] = os.fspath(data["store"])
        if isinstance(data.get("store"), str) and "://" not in data["store"]:
            # the controller and runners do not share this process's directory
            data["store"] = os.path.abspath(data["store"])
        try:
            cfg = PlatformConfig.model_validate(data)
        except ValueError as e:
            raise ConfigError(f"invalid sharing platform settings: {e}") from e
        options: dict[str, Any] = {
            "name": cfg.controller_name,
            "namespace": NAMESPACE,
            "lifetime": "detached",
            "get_if_exists": True,
        }
        if runtime_env:
            options["runtime_env"] = runtime_env
        if ray.cluster_resources().get(HEAD_RESOURCE):
            options["resources"] = {HEAD_RESOURCE: 0.001}
        else:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=True
            )
        controller = RemoteController.options(**options).remote(cfg.model_dump())
        try:
            bounded_get(
                controller.start.remote(),
                cfg.start_timeout_s,
                "sharing controller start",
            )
        except RemoteTimeout as e:
            raise ClusterError(f"the sharing controller did not start: {e}") from e
        except ray.exceptions.RayActorError as e:
            # Its constructor raised (a store it cannot open, ...): name the cause,
            # not Ray's wrapper around it.
            cause = getattr(e, "error_msg", "") or str(e)
            raise ClusterError(
                f"the sharing controller {cfg.controller_name!r} failed to start: "
                f"{last_line(cause) or type(e).__name__}"
            ) from e
        logger.info(
            "sharing controller %s is up (store %s)", cfg.controller_name, cfg.store
        )
        return cls(controller, name=cfg.controller_name, call_timeout_s=call_timeout_s)

    @classmethod
    def connect(
        cls, name: str = DEFAULT_CONTROLLER, *, call_timeout_s: float = 30.0
    ) -> SharingClient:
        """Attach to a running controller.

        Raises:
            ClusterError: no controller of that name runs.
        """
        try:
            controller = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError as e:
            raise ClusterError(
                f"no sharing controller named {name!r} runs; start one with "
                "SharingClient.start(store=...)"
            ) from e
        return cls(controller, name=name, call_timeout_s=call_timeout_s)

    def shutdown(self) -> None:
        """Stop every runner and agent of the platform, then the controller."""
        try:
            bounded_get(
                self._controller.shutdown.remote(),
                self.call_timeout_s,
                "controller shutdown",
            )
        except (RemoteTimeout, ray.exceptions.RayActorError) as e:
            logger.warning("controller shutdown: %s", e)
        ray.kill(self._controller, no_restart=True)

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        ref = getattr(self._controller, method).remote(*args)
        try:
            return bounded_get(
                ref, timeout_s or self.call_timeout_s, f"controller.{method}"
            )
        except ray.exceptions.RayTaskError as e:
            # The controller's own error (an unknown workload, ...), not Ray's.
            raise e.as_instanceof_cause() from None

    # -- workloads -----------------------------------------------------------

    def submit(
        self,
        workload_cls: type,
        spec: WorkloadSpec | dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> str:
        """Submit a workload class; ``args``/``kwargs`` go to its constructor.

        Returns:
            The workload id, ``tenant/name``.

        Raises:
            ConfigError: the spec or the class is invalid.
            UnsatisfiableResources: the platform refused it (it could never fit).
        """
        check_workload_class(workload_cls)
        if not isinstance(spec, WorkloadSpec):
            try:
                spec = WorkloadSpec.model_validate(spec)
            except ValueError as e:
                raise ConfigError(f"invalid workload spec: {e}") from e
        answer = self._call(
            "submit", spec.model_dump(mode="json"), workload_cls, args, kwargs
        )
        if not answer["accepted"]:
            message = f"{answer['workload_id']}: {answer['reason']}"
            if answer.get("duplicate"):
                raise ConfigError(message)
            raise UnsatisfiableResources(message)
        return answer["workload_id"]

    def workloads(
        self, workload_ids: list[str] | None = None
    ) -> dict[str, WorkloadStatus]:
        """Current status of the given workloads (all when None, none when empty).

        An id the platform does not know is left out; `wait` refuses it.
        """
        if workload_ids is not None:
            workload_ids = list(workload_ids)
        return self._call("workload_states", workload_ids)

    def wait(
        self, workload_ids: list[str], *, timeout_s: float, poll_s: float = 0.5
    ) -> dict[str, WorkloadStatus]:
        """Wait until every workload is done, failed, refused or cancelled.

        Raises:
            RemoteTimeout: some are still running after ``timeout_s``; the
                message lists them with their state.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.workloads(list(workload_ids))
            pending = {
                k: v.state for k, v in states.items() if v.state not in TERMINAL_STATES
            }
            missing = set(workload_ids) - set(states)
            if missing:
                raise ConfigError(f"unknown workload(s): {', '.join(sorted(missing))}")
            if not pending:
                return states
            if time.monotonic() >= deadline:
                raise RemoteTimeout(
                    f"after {timeout_s:g} s these workloads have not finished: {pending}"
                )
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def result(self, workload_id: str) -> WorkloadResult:
        """The workload's newest committed state (its final one once done).

        Raises:
            ConfigError: no workload of that id was submitted.
        """
        return self._call(
            "result", workload_id, timeout_s=max(self.call_timeout_s, 60.0)
        )

    def call(
        self,
        workload_id: str,
        method: str,
        *args: Any,
        timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> Any:
        """Call a public method of a running workload (a serving tenant's
        ``submit``, a solver batch's ``progress``) and return its result.

        Raises:
            raysys.sharing.controller.WorkloadUnavailable: it is not running
                now (queued or moving); try again.
            AttributeError: the method is private, part of the contract or absent.
            RemoteTimeout: no answer within ``timeout_s``.
        """
        ref = self._controller.call.remote(workload_id, method, args, kwargs, timeout_s)
        try:
            return bounded_get(ref, timeout_s + 5.0, f"call of {workload_id}.{method}")
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def cancel(self, workload_id: str) -> str:
        """Checkpoint and stop a workload; returns its final state (an ended
        workload keeps its state: ``done``, ``failed``, ...).

        Raises:
            ConfigError: no workload of that id was submitted.
        """
        return self._call("cancel", workload_id, timeout_s=self.call_timeout_s + 60.0)

    # -- platform ------------------------------------------------------------

    def status(self) -> SharingStatus:
        """Providers, workloads, queue, migrations, metrics and wait bounds."""
        return self._call("status")

    def migrations(self) -> list[MigrationRecord]:
        return self.status().migrations

    def wait_for_providers(self, count: int, *, timeout_s: float) -> list[str]:
        """Wait until ``count`` providers are active; returns their names.

        Raises:
            RemoteTimeout: fewer are active after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            active = [p.name for p in self.status().providers if p.phase == "active"]
            if len(active) >= count:
                return active
            if time.monotonic() >= deadline:
                raise RemoteTimeout(
                    f"only {len(active)} of {count} providers active after {timeout_s:g} s"
                )
            time.sleep(0.2)

    def leave(self, provider: str, deadline_s: float | None = None) -> dict[str, Any]:
        """The owner's kill switch: drain ``provider`` by ``deadline_s`` (None: now)."""
        check_name(provider, "provider")
        if deadline_s is not None and not (
            isinstance(deadline_s, int | float)
            and math.isfinite(deadline_s)
            and deadline_s >= 0
        ):
            raise ConfigError(
                f"deadline_s must be a number of seconds >= 0 (or None: now), "
                f"got {deadline_s!r}"
            )
        agent = find_agent(provider)
        return bounded_get(
            agent.leave.remote(deadline_s), self.call_timeout_s, f"agent of {provider}"
        )
