"""The sharing controller: one async actor that carries out the policies.

It owns a `PlacementPolicy` and a `MigrationPolicy` and turns their decisions
into Ray actions, in one control loop that runs every ``poll_interval_s``:

1. discover providers: alive nodes labelled ``raysys.io/provider`` join the
   pool (and get an agent); nodes Ray reports dead, or that Ray is draining,
   are handled as sudden and graceful departures;
2. check heartbeats: a provider silent for ``heartbeat_timeout_s`` is lost;
   an owner's wish to leave (reported by its agent) starts a reclaim;
3. poll runners (each poll bounded): progress, checkpoints, completion,
   failures; a runner that died, or stays silent past its bound, is replaced
   from its last committed checkpoint;
4. place queued work (`PlacementPolicy.schedule`) and start runners;
5. record metrics.

Migration protocol (event chain, provider A -> provider B)::

    graceful: notice (agent wish / Ray drain) -> A draining, no new work
              -> runner.checkpoint_and_stop (bounded by the notice)
              -> runner killed, GPUs on A freed -> queued (keeps its priority)
              -> placed on B -> runner restores that checkpoint -> running
              -> no tenant left on A: agent exits, Ray's drain ends the node
    sudden:   A dead or silent -> A removed, its runners killed (fenced)
              -> queued -> placed on B -> restores the last committed
              checkpoint -> running (at most one interval redone)

Every wait on a remote result is bounded (`_bounded`) and its longest wait is
recorded against its bound, so ``status().waits`` shows that nothing waited
longer than promised. Fencing: before a runner of incarnation k starts, the
store's fence for the workload is set to k, so a runner declared lost that is
in fact still alive can no longer commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysys.runtime.errors import ConfigError, RaysysError, RemoteTimeout
from raysys.runtime.local_cluster import PROVIDER_LABEL
from raysys.sharing.agent import ensure_agent
from raysys.sharing.drain import draining_nodes
from raysys.sharing.metrics import RayMetricsExporter, SharingMetrics
from raysys.sharing.policy import (
    Evacuation,
    MigrationAction,
    MigrationPolicy,
    Placement,
    PlacementPolicy,
    Refusal,
    Request,
)
from raysys.sharing.records import (
    TERMINAL_STATES,
    MigrationRecord,
    PlatformConfig,
    ProviderStatus,
    QueueItem,
    SharingStatus,
    WaitStat,
    WorkloadResult,
    WorkloadStatus,
)
from raysys.sharing.runner import RemoteRunner
from raysys.sharing.store import CheckpointStore
from raysys.sharing.workload import WorkloadSpec

logger = logging.getLogger(__name__)


class WorkloadUnavailable(RaysysError):
    """The workload is not running right now (queued, moving or ended)."""


RAY_DEATH_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

# Ray keeps a drain's deadline in whole milliseconds (`drain_node` truncates),
# and an agent reads its clock just before it drains: the drain it starts for a
# wish ends up to 1 ms before that wish's end. An end within this much of the
# drain's deadline is the same end (2 ms: 1 ms and float rounding).
DRAIN_DEADLINE_ROUNDING_S = 0.002


@dataclass
class _Provider:
    name: str
    node_id: str
    gpus: float
    joined_at: float
    phase: str = "active"  # active | draining | gone
    last_heartbeat: float | None = None
    leave_deadline_at: float | None = None
    leave_started: bool = False
    # `requested_at` of the owner's wish acted on: every heartbeat repeats it.
    wish_requested_at: float | None = None
    # The leave began from Ray's list of draining nodes and no wish of the
    # owner has been acted on yet; `drain_deadline_at` is that drain's deadline
    # (None: the drain gave none).
    awaiting_owner_wish: bool = False
    drain_deadline_at: float | None = None
    reason: str = ""
    agent: Any = None


@dataclass
class _Workload:
    spec: WorkloadSpec
    cls: type
    args: tuple
    kwargs: dict
    submitted_at: float
    state: str = "queued"
    provider: str | None = None
    runner: Any = None
    incarnation: int = -1
    epoch: int = 0  # bumped whenever in-flight operations must be ignored
    busy: bool = False  # a start or evacuation is in flight
    step: int = 0
    max_step_seen: int = 0  # highest step the current runner reported
    steps_executed: int = 0  # by earlier runners (as last reported)
    steps_run_now: int = 0  # by the current runner
    last_checkpoint_step: int | None = None
    first_started_at: float | None = None
    finished_at: float | None = None
    restarts: int = 0
    lost_steps: int = 0
    missed_polls: int = 0
    reason: str = ""
    error: str | None = None
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    pending: MigrationRecord | None = None  # migration waiting for its resume

    @property
    def wid(self) -> str:
        return self.spec.workload_id


class SharingController:
    """Async actor running the platform; reach it through `SharingClient`."""

    def __init__(self, config: dict[str, Any]):
        self.config = PlatformConfig.model_validate(config)
        cfg = self.config
        self.store = CheckpointStore(cfg.store, cfg.keep_last)
        self.policy = PlacementPolicy(
            share=True,
            migration=MigrationPolicy(
                checkpointing=True,
                safety_margin_s=cfg.safety_margin_s,
                immediate_grace_s=cfg.immediate_grace_s,
            ),
            max_provider_gpus=cfg.max_provider_gpus,
        )
        self.metrics = SharingMetrics(sample_every_s=cfg.poll_interval_s)
        try:
            self.exporter: RayMetricsExporter | None = RayMetricsExporter()
        except Exception as e:  # metrics are an extra; the platform runs without
            logger.warning("Ray metrics export is off: %s", e)
            self.exporter = None
        self.providers: dict[str, _Provider] = {}
        self.left_nodes: set[str] = set()
        self.workloads: dict[str, _Workload] = {}
        self.migrations: list[MigrationRecord] = []
        self.waits: dict[str, WaitStat] = {}
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    # -- plumbing ------------------------------------------------------------

    async def start(self) -> str:
        """Start the control loop (idempotent); returns the actor's node id."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        return ray.get_runtime_context().get_node_id()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _export(self, method: str, *args: Any) -> None:
        """Publish to Ray metrics; a metrics failure never stops the platform."""
        if self.exporter is None:
            return
        try:
            getattr(self.exporter, method)(*args)
        except Exception as e:
            logger.debug("metrics export %s failed: %s", method, e)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("controller task failed", exc_info=task.exception())

    async def _bounded(self, ref, bound_s: float, what: str) -> Any:
        """Await ``ref`` for at most ``bound_s``; records the wait against its bound.

        Raises:
            RemoteTimeout: no answer in time.
        """
        stat = self.waits.setdefault(what, WaitStat(what=what, bound_s=bound_s))
        stat.bound_s = max(stat.bound_s, bound_s)
        t0 = time.monotonic()
        try:
            return await asyncio.wait_for(_awaitable(ref), timeout=bound_s)
        except asyncio.TimeoutError as e:
            stat.timeouts += 1
            raise RemoteTimeout(f"{what} did not answer within {bound_s:g} s") from e
        finally:
            stat.count += 1
            stat.max_s = max(stat.max_s, time.monotonic() - t0)

    async def _loop(self) -> None:
        while not self._stopping:
            t0 = time.time()
            try:
                await self._tick()
            except Exception:
                logger.exception("control loop pass failed; continuing")
            delay = self.config.poll_interval_s - (time.time() - t0)
            await asyncio.sleep(max(0.01, delay))

    async def _tick(self) -> None:
        now = time.time()
        self._discover(now)
        self._check_heartbeats(now)
        await self._poll_runners()
        self._place(time.time())
        self._observe(time.time())

    # -- providers -----------------------------------------------------------

    def heartbeat(
        self, provider: str, node_id: str, wish: dict, sent_at: float
    ) -> None:
        """Called by agents: the provider is there, and this is its owner's wish."""
        p = self.providers.get(provider)
        if p is None or p.node_id != node_id or p.phase == "gone":
            return
        p.last_heartbeat = time.time()
        if not wish.get("leave"):
            return
        requested_at = wish.get("requested_at")
        if not p.leave_started:
            p.wish_requested_at = requested_at
            self._begin_leave(
                p,
                wish.get("deadline_at"),
                "its owner asked to leave",
                grace_s=wish.get("grace_s"),
            )
            return
        if p.awaiting_owner_wish:
            # Ray's drain list began the leave before this, the owner's first
            # wish, arrived: the owner's end applies, later or earlier.
            p.awaiting_owner_wish = False
            p.wish_requested_at = requested_at
            self._apply_first_wish(p, wish)
            return
        if requested_at == p.wish_requested_at:
            return  # the wish already acted on, repeated by a heartbeat
        p.wish_requested_at = requested_at
        # The owner asked again with an earlier end: the owner wins, so the
        # provider goes then; tenants still there resume from their last commit.
        ends_at = wish.get("ends_at")
        if (
            ends_at is not None
            and p.leave_deadline_at is not None
            and ends_at < p.leave_deadline_at
        ):
            logger.info(
                "provider %s: its owner moved the end %.1f s earlier",
                p.name,
                p.leave_deadline_at - ends_at,
            )
            p.leave_deadline_at = ends_at

    def _apply_first_wish(self, p: _Provider, wish: dict) -> None:
        """The owner's first wish, arriving after Ray's drain began the leave.

        The owner's end (its deadline, else the end of its grace) replaces the
        one the drain gave, later or earlier, but never goes past the drain's
        own deadline: Ray was told the node is gone then. Tenants not moving
        yet are planned again with the time that leaves, so a tenant that had
        too little notice to checkpoint under the drain's end checkpoints and
        moves now. The repeats of this wish in later heartbeats change nothing;
        a new wish after it only moves the end earlier, as for any leave.
        """
        end, is_deadline = _owner_end(wish)
        if end is None:
            return  # a wish naming no end: the drain's end stands
        if p.drain_deadline_at is not None and end > p.drain_deadline_at:
            # The agent's own drain for a grace ends where the grace does, less
            # Ray's rounding: that end stays a grace. A later end is capped at
            # the drain's deadline, which is then a deadline.
            if end > p.drain_deadline_at + DRAIN_DEADLINE_ROUNDING_S:
                is_deadline = True
            end = p.drain_deadline_at
        now = time.time()
        logger.info(
            "provider %s: its owner's wish arrived after Ray's drain; the leave "
            "ends in %.1f s instead of %.1f s",
            p.name,
            end - now,
            (p.leave_deadline_at or now) - now,
        )
        p.leave_deadline_at = end
        p.reason = "its owner asked to leave (after Ray's drain)"
        left_s = max(0.0, end - now)
        for ev in self.policy.reclaim(
            p.name,
            now=now,
            deadline_s=left_s if is_deadline else None,
            grace_s=None if is_deadline else left_s,
        ):
            w = self.workloads[ev.workload_id]
            # A tenant stopping already gets the new end through `_evacuate`;
            # one starting there is planned when its start answers.
            if (
                ev.action is MigrationAction.CHECKPOINT_AND_MOVE
                and w.state == "running"
                and not w.busy
                and w.provider == p.name
            ):
                self._spawn(self._evacuate(w, ev))

    def _discover(self, now: float) -> None:
        nodes = ray.nodes()
        draining = draining_nodes()
        alive = {}
        for node in nodes:
            name = (node.get("Labels") or {}).get(PROVIDER_LABEL)
            if name is None:
                continue
            if node.get("Alive"):
                alive[node["NodeID"]] = (name, node)
        # departures first
        for p in list(self.providers.values()):
            if p.phase == "gone":
                continue
            if p.node_id not in alive:
                self._provider_lost(p, "Ray reports its node dead")
            elif p.node_id in draining and not p.leave_started:
                deadline_at = draining[p.node_id]
                self._begin_leave(p, deadline_at, "Ray is draining its node")
                p.awaiting_owner_wish, p.drain_deadline_at = True, deadline_at
        # arrivals
        for node_id, (name, node) in alive.items():
            if node_id in self.left_nodes or node_id in draining:
                continue
            known = self.providers.get(name)
            if known is not None and known.phase != "gone":
                continue
            gpus = float((node.get("Resources") or {}).get("GPU", 0.0))
            p = _Provider(name=name, node_id=node_id, gpus=gpus, joined_at=now)
            self.providers[name] = p
            self.policy.add_provider(name, gpus, now=now)
            try:
                p.agent = ensure_agent(
                    name,
                    node_id,
                    controller_name=self.config.controller_name,
                    heartbeat_interval_s=self.config.heartbeat_interval_s,
                )
                p.agent.attach.remote(self.config.controller_name)
            except Exception as e:
                logger.warning(
                    "provider %s: no agent (%s); relying on node state", name, e
                )
            logger.info(
                "provider %s joined on node %s lending %g GPUs",
                name,
                node_id[:12],
                gpus,
            )

    def _check_heartbeats(self, now: float) -> None:
        timeout = self.config.heartbeat_timeout_s
        for p in list(self.providers.values()):
            if p.phase == "gone":
                continue
            last = p.last_heartbeat or p.joined_at
            # A fresh provider's agent may still be starting: give it the
            # start bound before its silence counts.
            limit = (
                timeout
                if p.last_heartbeat
                else timeout + self.config.agent_start_timeout_s
            )
            if now - last > limit:
                self._provider_lost(
                    p, f"no heartbeat for {now - last:.1f} s (limit {limit:g} s)"
                )

    def _provider_lost(self, p: _Provider, reason: str) -> None:
        p.phase, p.reason = "gone", reason
        self.left_nodes.add(p.node_id)
        logger.info("provider %s lost: %s", p.name, reason)
        for ev in self.policy.provider_gone(
            p.name, now=time.time(), reason=f"{p.name}: {reason}"
        ):
            self._sudden(self.workloads[ev.workload_id], ev)
        _kill(p.agent)

    def _begin_leave(
        self,
        p: _Provider,
        deadline_at: float | None,
        why: str,
        grace_s: float | None = None,
    ) -> None:
        now = time.time()
        p.leave_started, p.phase = True, "draining"
        # Without a deadline the tenants get the owner's grace (the agent's
        # wish), else the platform's immediate_grace_s.
        if grace_s is None or not grace_s > 0:
            grace_s = self.config.immediate_grace_s
        p.leave_deadline_at = deadline_at if deadline_at is not None else now + grace_s
        p.reason = why
        deadline_s = None if deadline_at is None else max(0.0, deadline_at - now)
        logger.info(
            "provider %s leaves (%s), deadline %s",
            p.name,
            why,
            "none: evacuate at once"
            if deadline_s is None
            else f"in {deadline_s:.1f} s",
        )
        for ev in self.policy.reclaim(
            p.name, now=now, deadline_s=deadline_s, grace_s=grace_s
        ):
            w = self.workloads[ev.workload_id]
            if ev.action is MigrationAction.CHECKPOINT_AND_MOVE:
                self._spawn(self._evacuate(w, ev))
            # Otherwise the tenant keeps running until the deadline, then
            # resumes elsewhere from its last committed checkpoint.
        self._spawn(self._finish_leave(p))

    async def _finish_leave(self, p: _Provider) -> None:
        """Wait for the tenants to leave (or the deadline), then let the node go."""
        while time.time() < (p.leave_deadline_at or 0) and self.policy.tenants_of(
            p.name
        ):
            await asyncio.sleep(self.config.poll_interval_s / 2)
        if p.phase == "gone":
            return
        left = self.policy.tenants_of(p.name)
        reason = (
            f"{p.name} reached its deadline with {len(left)} tenant(s) still on it"
            if left
            else f"{p.name} drained"
        )
        p.phase, p.reason = "gone", reason
        self.left_nodes.add(p.node_id)
        for ev in self.policy.provider_gone(p.name, now=time.time(), reason=reason):
            self._sudden(self.workloads[ev.workload_id], ev)
        # With no tenant and no agent left the drained node is idle; Ray's
        # raylet then exits by itself.
        if p.agent is not None:
            try:
                await self._bounded(p.agent.exit.remote(), 5.0, "agent exit")
            except (RemoteTimeout, *RAY_DEATH_ERRORS):
                pass
            except Exception as e:
                logger.debug("agent of %s exit: %s", p.name, e)
            _kill(p.agent)
        logger.info("provider %s is gone: %s", p.name, reason)

    # -- migrations ----------------------------------------------------------

    async def _evacuate(self, w: _Workload, ev: Evacuation) -> None:
        """Graceful migration: checkpoint now, stop, queue for another provider."""
        while w.busy and w.state not in TERMINAL_STATES:
            await asyncio.sleep(0.05)  # a start in flight finishes (bounded) first
        if w.state in TERMINAL_STATES or w.provider != ev.provider or w.runner is None:
            return
        w.busy, w.state = True, "migrating"
        epoch = w.epoch
        record = MigrationRecord(
            workload_id=w.wid,
            kind="graceful",
            from_provider=ev.provider,
            reason=ev.reason,
            started_at=time.time(),
            last_seen_step=w.max_step_seen,
        )
        self.migrations.append(record)
        w.pending = record  # a sudden loss meanwhile completes this record
        self._migration_attempted("graceful")
        bound = max(0.5, min(self.config.stop_timeout_s, ev.time_left_s))
        stop_started = time.monotonic()
        answer = None
        try:
            while True:
                answer = await self._bounded(
                    w.runner.checkpoint_and_stop.remote(bound),
                    bound + 2.0,
                    "checkpoint-and-stop",
                )
                if answer["state"] != "stopping" or w.epoch != epoch:
                    break
                # The bound ran out with the step still running. When the end
                # moved later meanwhile (the owner's first wish after Ray's
                # drain) the stop may use that time, up to stop_timeout_s in all.
                bound = self._more_stop_time(ev.provider, stop_started)
                if bound < 0.5:
                    break
                self._absorb(w, answer)  # its metrics are handed over once
        except (RemoteTimeout, *RAY_DEATH_ERRORS) as e:
            record.fell_back = True
            record.note = (
                f"no checkpoint on notice ({e}); resuming from the last committed one"
            )
        finally:
            w.busy = False
        if w.epoch != epoch:
            return  # the provider vanished meanwhile: the sudden path took over
        _kill(w.runner)
        w.runner = None
        if answer is not None:
            self._absorb(w, answer)
            record.last_seen_step = w.max_step_seen
            if answer["state"] == "done":
                record.succeeded, record.finished_at = True, time.time()
                record.note = "the workload finished before it had to move"
                self._migration_succeeded("graceful")
                self._finish(w, "done", "finished while its provider was leaving")
                return
            if answer["state"] == "failed":
                record.succeeded, record.note = (
                    False,
                    "the workload failed while stopping",
                )
                self._finish(w, "failed", "step() raised", answer.get("error"))
                return
            if answer["state"] == "stopped":
                record.stop_step = answer["step"]
            else:
                record.fell_back = True
                record.note = f"stop did not finish ({answer['state']}); resuming from the last committed checkpoint"
        w.epoch += 1
        w.pending, w.provider, w.state = record, None, "queued"
        self.policy.requeue(w.wid, now=time.time(), reason=f"moved off {ev.provider}")

    def _more_stop_time(self, provider: str, stop_started: float) -> float:
        """Seconds a stop that began at ``stop_started`` (monotonic) may still take."""
        left = self._time_left(provider)
        if left is None:
            return 0.0
        spent = time.monotonic() - stop_started
        return min(
            self.config.stop_timeout_s - spent, self.policy.migration.time_left(left)
        )

    def _sudden(self, w: _Workload, ev: Evacuation) -> None:
        """Sudden migration: the runner is gone; resume from the last commit."""
        if w.state in TERMINAL_STATES:
            return
        w.epoch += 1
        w.busy = False
        _kill(w.runner)
        w.runner = None
        if w.pending is not None and w.pending.succeeded is None:
            w.pending.fell_back = True  # a graceful move that did not finish
            w.pending.note = f"{ev.provider} went before the move finished"
            w.pending.last_seen_step = max(w.pending.last_seen_step, w.max_step_seen)
        else:
            w.pending = MigrationRecord(
                workload_id=w.wid,
                kind="sudden" if not ev.graceful else "graceful",
                from_provider=ev.provider,
                reason=ev.reason,
                started_at=time.time(),
                last_seen_step=w.max_step_seen,
                fell_back=ev.graceful,
            )
            self.migrations.append(w.pending)
            self._migration_attempted(w.pending.kind)
        w.provider, w.state = None, "queued"
        self.policy.requeue(w.wid, now=time.time(), reason=ev.reason)

    def _migration_attempted(self, kind: str) -> None:
        self.metrics.migration_attempted(kind)
        self._export("migration_attempted", kind)

    def _migration_succeeded(self, kind: str) -> None:
        self.metrics.migration_succeeded(kind)
        self._export("migration_succeeded", kind)

    # -- runners -------------------------------------------------------------

    def _place(self, now: float) -> None:
        for placement in self.policy.schedule(now=now):
            w = self.workloads[placement.workload_id]
            w.busy, w.state, w.provider = True, "starting", placement.provider
            self._spawn(self._start_runner(w, placement))

    async def _start_runner(self, w: _Workload, placement: Placement) -> None:
        epoch = w.epoch
        p = self.providers[placement.provider]
        incarnation = w.incarnation + 1
        runner = None
        try:
            self.store.set_fence(w.spec.tenant, w.spec.name, incarnation)
            runner = RemoteRunner.options(
                num_gpus=w.spec.gpus,
                num_cpus=w.spec.num_cpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    p.node_id, soft=False
                ),
            ).remote(
                w.spec.model_dump(mode="json"),
                w.cls,
                w.args,
                w.kwargs,
                self.config.store,
                self.config.keep_last,
                incarnation,
            )
            info = await self._bounded(
                runner.start.remote(), self.config.start_timeout_s, "runner start"
            )
        except Exception as e:  # timeout, node gone, store error: try again elsewhere
            _kill(runner)
            if w.epoch == epoch and w.state not in TERMINAL_STATES:
                w.busy = False
                w.reason = f"start on {placement.provider} failed: {e}"
                logger.warning("%s: %s; back in the queue", w.wid, w.reason)
                w.provider, w.state = None, "queued"
                self.policy.requeue(w.wid, now=time.time(), reason=w.reason)
            return
        if w.epoch != epoch or w.state in TERMINAL_STATES:
            _kill(runner)  # overtaken (provider lost, cancelled) while starting
            return
        w.busy = False
        if not info["ok"]:
            _kill(runner)
            self._finish(w, "failed", "the workload failed to start", info["error"])
            return
        now = time.time()
        w.incarnation, w.runner, w.state = incarnation, runner, "running"
        w.steps_executed += w.steps_run_now
        w.steps_run_now = 0
        w.step = info["resumed_step"]
        w.last_checkpoint_step = info["resumed_step"]
        w.missed_polls = 0
        if incarnation > 0:
            w.restarts += 1
        if w.first_started_at is None:
            w.first_started_at = now
            delay = now - w.submitted_at
            self.metrics.queue_delay(w.spec.kind.value, delay)
            self._export("queue_delay", w.spec.kind.value, delay)
        if w.pending is not None:
            self._resumed(w, w.pending, info["resumed_step"], placement.provider)
            w.pending = None
        # Steps redone after a later loss count from this runner's progress.
        w.max_step_seen = info["resumed_step"]
        # A provider that started leaving while this runner started.
        if self.providers[placement.provider].phase != "active":
            ev = next(
                (
                    e
                    for e in self.policy.reclaim(
                        placement.provider,
                        now=now,
                        deadline_s=self._time_left(placement.provider),
                    )
                    if e.workload_id == w.wid
                ),
                None,
            )
            if ev is not None and ev.action is MigrationAction.CHECKPOINT_AND_MOVE:
                self._spawn(self._evacuate(w, ev))

    def _time_left(self, provider: str) -> float | None:
        p = self.providers[provider]
        if p.leave_deadline_at is None:
            return None
        return max(0.0, p.leave_deadline_at - time.time())

    # TODO: lost steps count from the last polled step, so they are a lower
    # bound: steps a runner finished after its last poll and before a sudden
    # loss are redone but not counted. Nothing that outlives the runner knows
    # how far it got: the next runner knows only the commit it restores, the
    # store holds only commits. Counting exactly would need a durable record
    # of every finished step (a store write per step, the step being written
    # still uncounted when the machine goes mid-write).
    def _resumed(
        self, w: _Workload, record: MigrationRecord, step: int, provider: str
    ) -> None:
        record.to_provider, record.resumed_step = provider, step
        record.finished_at = time.time()
        record.lost_steps = max(0, record.last_seen_step - step)
        record.succeeded = True
        w.lost_steps += record.lost_steps
        lost_gpu_s = record.lost_steps * self._seconds_per_step(w) * w.spec.gpus
        self.metrics.lost(lost_gpu_s)
        self._export("lost", lost_gpu_s)
        self._migration_succeeded(record.kind)
        logger.info(
            "%s migrated %s -> %s (%s): resumed at step %d, %d step(s) redone",
            w.wid,
            record.from_provider,
            provider,
            record.kind,
            step,
            record.lost_steps,
        )

    def _seconds_per_step(self, w: _Workload) -> float:
        executed = w.steps_executed + w.steps_run_now
        if w.first_started_at is None or executed == 0:
            return 0.0
        return (time.time() - w.first_started_at) / executed

    async def _poll_runners(self) -> None:
        running = [
            w for w in self.workloads.values() if w.state == "running" and not w.busy
        ]
        if not running:
            return
        epochs = [w.epoch for w in running]
        answers = await asyncio.gather(
            *(
                self._bounded(
                    w.runner.poll.remote(), self.config.poll_timeout_s, "runner poll"
                )
                for w in running
            ),
            return_exceptions=True,
        )
        for w, epoch, answer in zip(running, epochs, answers, strict=True):
            if w.epoch != epoch or w.state != "running" or w.busy:
                continue
            if isinstance(answer, RAY_DEATH_ERRORS):
                self._runner_lost(w, f"runner died: {type(answer).__name__}")
            elif isinstance(answer, RemoteTimeout):
                w.missed_polls += 1
                if w.missed_polls >= 2:
                    self._runner_lost(w, f"runner silent for {w.missed_polls} polls")
            elif isinstance(answer, BaseException):
                self._runner_lost(w, f"poll failed: {answer!r}")
            else:
                w.missed_polls = 0
                self._absorb_and_end(w, answer)

    def _absorb_and_end(self, w: _Workload, answer: dict) -> None:
        """Take a runner's answer; a runner that ended on its own ends the workload."""
        self._absorb(w, answer)
        if answer["state"] == "done":
            self._finish(w, "done", f"completed {w.step} steps")
        elif answer["state"] in ("failed", "fenced"):
            self._finish(w, "failed", "step() raised", answer.get("error"))

    def _runner_lost(self, w: _Workload, reason: str) -> None:
        provider = w.provider or "?"
        logger.info(
            "%s on %s: %s; resuming from its last checkpoint", w.wid, provider, reason
        )
        evacuation = Evacuation(
            w.wid,
            provider,
            MigrationAction.RESUME_FROM_LAST,
            False,
            0.0,
            reason,
            time.time(),
        )
        self._sudden(w, evacuation)

    def _absorb(self, w: _Workload, answer: dict[str, Any]) -> None:
        w.step = answer["step"]
        w.max_step_seen = max(w.max_step_seen, w.step)
        if answer.get("last_checkpoint_step") is not None:
            w.last_checkpoint_step = answer["last_checkpoint_step"]
        w.steps_run_now = max(w.steps_run_now, answer.get("steps_run", 0))
        for step, values in answer.get("metrics", []):
            if values and len(w.history) < self.config.history_limit:
                w.history[step] = values

    def _finish(
        self, w: _Workload, state: str, reason: str, error: str | None = None
    ) -> None:
        w.state, w.reason, w.error = state, reason, error
        w.finished_at = time.time()
        w.epoch += 1
        w.busy = False
        self.policy.finish(w.wid)
        _kill(w.runner)
        w.runner = None
        if state == "failed":
            logger.warning("%s failed: %s", w.wid, (error or reason).splitlines()[0])
        else:
            logger.info("%s %s: %s", w.wid, state, reason)

    def _observe(self, now: float) -> None:
        lent, used, queued = (
            self.policy.gpus_lent,
            self.policy.gpus_in_use,
            self.policy.num_queued(),
        )
        self.metrics.observe(now, lent, used, queued)
        self._export("observe", lent, used, queued)

    # -- public API (called through SharingClient) ---------------------------

    def submit(
        self, spec: dict[str, Any], cls: type, args: tuple, kwargs: dict
    ) -> dict[str, Any]:
        """Accept a workload; returns ``{"workload_id", "accepted", "reason"}``."""
        w = _Workload(
            spec=WorkloadSpec.model_validate(spec),
            cls=cls,
            args=tuple(args),
            kwargs=dict(kwargs),
            submitted_at=time.time(),
        )
        old = self.workloads.get(w.wid)
        if old is not None and old.state not in TERMINAL_STATES:
            return {
                "workload_id": w.wid,
                "accepted": False,
                "duplicate": True,
                "reason": f"{w.wid} is already submitted and {old.state}; cancel it "
                "first or use another name",
            }
        if old is not None:
            self.policy.finish(w.wid)
        decision = self.policy.submit(
            Request(w.wid, w.spec.gpus, w.spec.kind, None, w.spec.est_checkpoint_s),
            now=w.submitted_at,
        )
        self.workloads[w.wid] = w
        if isinstance(decision, Refusal):
            w.state, w.reason = "refused", decision.reason
            w.finished_at = time.time()
            self.policy.finish(w.wid)
            return {"workload_id": w.wid, "accepted": False, "reason": decision.reason}
        w.reason = decision.reason
        self._place(time.time())
        return {"workload_id": w.wid, "accepted": True, "reason": decision.reason}

    async def call(
        self, workload_id: str, method: str, args: tuple, kwargs: dict, timeout_s: float
    ) -> Any:
        """Forward a call to a running workload's public method.

        Raises:
            WorkloadUnavailable: it is not running now (queued, migrating, ended).
            RemoteTimeout: no answer within ``timeout_s``.
        """
        w = self.workloads.get(workload_id)
        if w is None:
            raise WorkloadUnavailable(f"unknown workload {workload_id!r}")
        if w.state != "running" or w.runner is None:
            raise WorkloadUnavailable(
                f"{workload_id} is {w.state}, not running; try again once it runs"
            )
        return await self._bounded(
            w.runner.call.remote(method, tuple(args), dict(kwargs)),
            timeout_s,
            "workload call",
        )

    async def cancel(self, workload_id: str) -> str:
        """Stop a workload after a final checkpoint; returns its state."""
        w = self._known(workload_id)
        if w.state in TERMINAL_STATES:
            return w.state
        if w.runner is not None and w.state == "running":
            epoch = w.epoch
            try:
                answer = await self._bounded(
                    w.runner.checkpoint_and_stop.remote(self.config.stop_timeout_s),
                    self.config.stop_timeout_s + 2.0,
                    "checkpoint-and-stop",
                )
            except (RemoteTimeout, *RAY_DEATH_ERRORS) as e:
                logger.warning(
                    "%s: cancel without a last checkpoint: %s", workload_id, e
                )
            else:
                if w.epoch == epoch and w.state not in TERMINAL_STATES:
                    # It ended on its own before the stop: keep how it ended.
                    self._absorb_and_end(w, answer)
            if w.state in TERMINAL_STATES:
                return w.state
        self._finish(w, "cancelled", "cancelled by its tenant")
        return w.state

    def _known(self, workload_id: str) -> _Workload:
        w = self.workloads.get(workload_id)
        if w is None:
            raise ConfigError(
                f"unknown workload {workload_id!r}; workload ids are tenant/name "
                "as submit() returned them"
            )
        return w

    def status(self) -> SharingStatus:
        now = time.time()
        views = {v.name: v for v in self.policy.providers()}
        providers = []
        for p in sorted(self.providers.values(), key=lambda p: p.name):
            view = views.get(p.name)
            providers.append(
                ProviderStatus(
                    name=p.name,
                    node_id=p.node_id,
                    phase=p.phase,
                    gpus_lent=p.gpus,
                    gpus_in_use=view.gpus_in_use if view else 0.0,
                    tenants=list(view.tenants) if view else [],
                    last_heartbeat_s_ago=None
                    if p.last_heartbeat is None
                    else now - p.last_heartbeat,
                    leave_deadline_in_s=None
                    if p.leave_deadline_at is None
                    else p.leave_deadline_at - now,
                    reason=p.reason,
                )
            )
        queue = [
            QueueItem(
                workload_id=e.workload_id,
                kind=e.kind.value,
                gpus=e.gpus,
                position=e.position,
                waiting_s=now - e.waiting_since,
                reason=e.reason,
            )
            for e in self.policy.queue(now=now)
        ]
        return SharingStatus(
            at=now,
            providers=providers,
            workloads=[self._workload_status(w) for w in self.workloads.values()],
            queue=queue,
            migrations=list(self.migrations),
            metrics={
                **self.metrics.summary(),
                "gpus_lent": self.policy.gpus_lent,
                "gpus_in_use": self.policy.gpus_in_use,
            },
            waits=list(self.waits.values()),
            decisions=[
                f"{type(d).__name__.lower()} {d.workload_id}: {d.reason}"
                for d in self.policy.recent_decisions()[-50:]
            ],
        )

    def _workload_status(self, w: _Workload) -> WorkloadStatus:
        return WorkloadStatus(
            workload_id=w.wid,
            tenant=w.spec.tenant,
            name=w.spec.name,
            kind=w.spec.kind.value,
            gpus=w.spec.gpus,
            state=w.state,
            provider=w.provider,
            step=w.step,
            num_steps=w.spec.num_steps,
            last_checkpoint_step=w.last_checkpoint_step,
            incarnation=w.incarnation,
            restarts=w.restarts,
            lost_steps=w.lost_steps,
            steps_executed=w.steps_executed + w.steps_run_now,
            queue_delay_s=None
            if w.first_started_at is None
            else w.first_started_at - w.submitted_at,
            submitted_at=w.submitted_at,
            finished_at=w.finished_at,
            reason=w.reason,
            error=w.error,
        )

    def workload_states(
        self, workload_ids: list[str] | None = None
    ) -> dict[str, WorkloadStatus]:
        # None: all of them; an empty list: none.
        ids = list(self.workloads) if workload_ids is None else workload_ids
        return {
            i: self._workload_status(self.workloads[i])
            for i in ids
            if i in self.workloads
        }

    def result(self, workload_id: str) -> WorkloadResult:
        """The newest committed state of a workload and its step metrics."""
        w = self._known(workload_id)
        checkpoint = self.store.tenant(w.spec.tenant).latest(w.spec.name)
        return WorkloadResult(
            workload_id=w.wid,
            state=w.state,
            step=checkpoint.step if checkpoint else 0,
            final_state=checkpoint.state if checkpoint else None,
            metrics=dict(sorted(w.history.items())),
            error=w.error,
        )

    async def shutdown(self) -> None:
        """Stop the loop, every runner and every agent this controller started."""
        self._stopping = True
        for w in self.workloads.values():
            if w.state not in TERMINAL_STATES:
                w.epoch += 1
                _kill(w.runner)
                w.runner = None
        for p in self.providers.values():
            _kill(p.agent)
        for task in list(self._tasks):
            task.cancel()


def _owner_end(wish: dict) -> tuple[float | None, bool]:
    """The end an owner's wish asks for, and whether it is a deadline (else the
    end of a grace); None when the wish names neither."""
    if wish.get("deadline_at") is not None:
        return float(wish["deadline_at"]), True
    if wish.get("ends_at") is not None:
        return float(wish["ends_at"]), False
    grace_s, requested_at = wish.get("grace_s"), wish.get("requested_at")
    if grace_s is not None and grace_s > 0 and requested_at is not None:
        return float(requested_at) + float(grace_s), False
    return None, False


def _kill(handle) -> None:
    if handle is None:
        return
    try:
        ray.kill(handle, no_restart=True)
    except Exception as e:  # already dead, or its node is gone
        logger.debug("kill: %s", e)


async def _await_ref(ref):
    return await ref


def _awaitable(ref):
    return _await_ref(ref) if isinstance(ref, ray.ObjectRef) else ref


RemoteController = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(
    SharingController
)
