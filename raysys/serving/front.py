"""The front end: takes requests, asks the policy, and has the instances carry it out.

`ServingFront` starts one `ServingInstance` actor per instance and runs a single
event loop in the caller's process (`poll`). The loop waits, with a bound, on
every outstanding call: one long poll per instance (`next_events`) and the
orders it has sent. For each request it:

1. asks the policy where to prefill (flipping an instance if the policy says
   so) and sends the prompt there;
2. on the first token, asks the policy where to decode: on the same instance
   (``continue_here``) or elsewhere, in which case the prefill instance puts the
   KV in the Ray object store (``export_kv``) and the decode instance fetches it
   (``accept_kv``); once the receiver holds it, the sender ``release``s its copy;
3. on the last token records the request's times.

Every few seconds (the policy's monitor interval) it shows the policy the
instances' loads and carries out the flips it asks for.

Failures stay with the requests they touch. An instance whose actor dies is
marked dead (the policy no longer sees it); each request that had work or KV on
it is retried from its prompt on another instance, at most ``max_retries``
times, then failed. A request still unfinished ``request_timeout_s`` after its
arrival fails. Greedy decoding is deterministic, so a retried request produces
the same tokens.

Times are measured by the front when it receives an instance's report, so they
include the short polling delay a client would see.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field

from raysys.models.tokenizer import check_token_ids
from raysys.runtime.config import is_whole_number
from raysys.runtime.errors import RaysysError, RemoteTimeout, last_line
from raysys.serving.engine import EngineLoad, Finished, FirstToken
from raysys.serving.instance import InstanceReport, InstanceSpec, start_instances
from raysys.serving.metrics import FlipEvent, RequestRecord
from raysys.serving.policy import (
    DispatchReason,
    Flip,
    FlipReason,
    InstanceState,
    RequestInfo,
    Role,
    ServingPolicy,
)
from raysys.serving.trace import Trace, TraceRequest

logger = logging.getLogger(__name__)

# Engine-side request keys carry the attempt number, so events of an abandoned
# attempt can never be mistaken for the current one.
MAX_ATTEMPTS = 64


class FrontClosed(RaysysError):
    """The front was shut down; its instances are gone."""


class FrontConfig(BaseModel):
    """Timeouts and retry bounds of the front end."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poll_timeout_s: float = Field(
        0.02, gt=0, description="longest wait of one loop iteration"
    )
    ready_timeout_s: float = Field(
        180.0, gt=0, description="time for all instances to build their models"
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="a request unfinished this long after arrival fails"
    )
    max_retries: int = Field(
        1, ge=0, lt=MAX_ATTEMPTS, description="re-prefills of a request after a failure"
    )


class Phase:
    PREFILL = "prefill"
    HANDOFF = "handoff"
    DECODE = "decode"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (Phase.DONE, Phase.FAILED, Phase.CANCELLED)


@dataclass
class TrackedRequest:
    """The front's view of one request."""

    record: RequestRecord
    prompt: list[int]
    max_new_tokens: int
    ignore_eos: bool
    phase: str = Phase.PREFILL
    attempt: int = 0
    output: tuple[int, ...] = ()
    holders: set[int] = field(default_factory=set)  # instances that may hold it

    @property
    def key(self) -> int:
        return self.record.request_id * MAX_ATTEMPTS + self.attempt


@dataclass
class _Op:
    kind: str
    key: int
    instance_id: int
    source: int = -1  # the sender of a handoff


class ServingFront:
    """Serve requests on ``num_instances`` instance actors under ``policy``.

    Args:
        policy: decides dispatch and flips (`raysys.serving.policy`); a fresh
            one (it keeps cooldown state and learns the engine's step limit).
        spec: how to start the instances (model, engine, resources).
        num_instances: instances to start.
        config: timeouts and retries.
        on_handoff: called as ``(request_id, source, target)`` when a handoff
            starts, before its orders are sent (tests inject failures with it).

    Raises:
        RemoteTimeout: the instances were not ready within ``ready_timeout_s``.
        RaysysError: an instance failed to start (its error is chained).
    """

    def __init__(
        self,
        policy: ServingPolicy,
        spec: InstanceSpec,
        num_instances: int,
        config: FrontConfig | None = None,
        *,
        on_handoff: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.policy = policy
        self.spec = spec
        self.config = config or FrontConfig()
        self.on_handoff = on_handoff
        self.roles = policy.initial_roles(num_instances)
        policy.mixed_step_limit_s = spec.engine.mixed_step_limit_s
        self.polls: dict[Any, int] = {}
        self.ops: dict[Any, _Op] = {}
        self.requests: dict[int, TrackedRequest] = {}
        self.closed = False
        self.actors = start_instances(spec, self.roles)
        self.alive = [True] * num_instances
        try:
            reports = ray.get(
                [a.ready.remote() for a in self.actors],
                timeout=self.config.ready_timeout_s,
            )
            limits = ray.get(
                [a.model_limits.remote() for a in self.actors],
                timeout=self.config.ready_timeout_s,
            )
        except ray.exceptions.GetTimeoutError as e:
            self.shutdown()
            raise RemoteTimeout(
                f"{num_instances} instances were not ready within "
                f"{self.config.ready_timeout_s:g} s"
            ) from e
        except ray.exceptions.RayError as e:
            # An instance whose model cannot be built (a bad checkpoint path,
            # say) dies in its constructor: stop the others with it.
            self.shutdown()
            raise RaysysError(
                f"a serving instance failed to start: {last_line(e)}"
            ) from e
        self.loads: list[EngineLoad] = [r.load for r in reports]
        # Every instance serves the same model; the front checks prompts
        # against it before sending them anywhere.
        self.vocab_size = min(v for v, _ in limits)
        self.max_positions = min(n for _, n in limits)
        self.pending: list[list[float]] = [[0, 0, 0.0, 0, 0] for _ in self.actors]
        for i in range(num_instances):
            self._long_poll(i)
        self.flips: list[FlipEvent] = []
        self.num_instance_failures = 0
        self.t0 = time.monotonic()
        self.next_monitor_s = policy.monitor_interval_s
        logger.info(
            "front: %d instances ready (%s), policy %s",
            num_instances,
            ", ".join(r.value for r in self.roles),
            policy.name,
        )

    # -- clock and views -----------------------------------------------------------

    def now(self) -> float:
        """Seconds since the front started."""
        return time.monotonic() - self.t0

    def states(self) -> list[InstanceState]:
        """What the policy sees: reported loads plus orders not yet reported."""
        states = []
        for i, load in enumerate(self.loads):
            num_p, tok_p, pairs, num_d, tok_d = self.pending[i]
            state = load.state(i, self.roles[i], self.alive[i])
            state.num_prefill += int(num_p)
            state.prefill_tokens += int(tok_p)
            state.prefill_pairs += pairs
            state.num_decode += int(num_d)
            state.decode_tokens += int(tok_d)
            states.append(state)
        return states

    @property
    def num_fallbacks(self) -> int:
        return self.policy.counters.num_fallbacks

    def records(self) -> list[RequestRecord]:
        return [t.record for t in self.requests.values()]

    def outputs(self) -> dict[int, tuple[int, ...]]:
        """Generated tokens of every finished request."""
        return {
            rid: t.output for rid, t in self.requests.items() if t.phase == Phase.DONE
        }

    # -- requests in ---------------------------------------------------------------

    def submit(
        self,
        request_id: int,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        ignore_eos: bool = False,
    ) -> None:
        """Accept a request now.

        A request too long for the model's context or an instance's KV memory
        is accepted and fails alone at once (no instance could ever serve it);
        see its record's ``error``.

        Raises:
            ValueError: the id is not a whole number or was used before, the
                prompt is empty or holds a token outside the vocabulary, or
                ``max_new_tokens`` is not a whole number >= 1. Nothing is
                recorded for the request then.
            FrontClosed: the front was shut down.
        """
        self._check_open()
        tokens = self._validated(request_id, prompt, max_new_tokens)
        request_id, max_new_tokens = int(request_id), int(max_new_tokens)
        record = RequestRecord(request_id, self.now(), len(tokens), max_new_tokens)
        tracked = TrackedRequest(record, tokens, max_new_tokens, ignore_eos)
        self.requests[request_id] = tracked
        # No instance could ever hold these: fail them alone, without retrying.
        needed = len(tokens) + max_new_tokens
        if needed > self.spec.kv_capacity_tokens:
            self._fail(
                tracked,
                f"needs {needed} KV tokens ({len(tokens)} prompt + "
                f"{max_new_tokens} output), more than an instance's KV capacity "
                f"of {self.spec.kv_capacity_tokens}",
            )
            return
        positions = len(tokens) + max_new_tokens - 1
        if positions > self.max_positions:
            self._fail(
                tracked,
                f"needs {positions} positions ({len(tokens)} prompt + "
                f"{max_new_tokens} output - 1), beyond the model's context of "
                f"{self.max_positions}; clip its prompt or max_new_tokens",
            )
            return
        self._dispatch_prefill(tracked)

    def _validated(
        self, request_id: int, prompt: Sequence[int], max_new_tokens: int
    ) -> list[int]:
        """The prompt's token ids, once the request's arguments are checked."""
        if not is_whole_number(request_id):
            raise ValueError(f"request id {request_id!r} is not a whole number")
        if int(request_id) in self.requests:
            raise ValueError(f"request id {request_id} was already submitted")
        if not is_whole_number(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(
                f"request {request_id}: max_new_tokens={max_new_tokens!r} must be a "
                "whole number >= 1"
            )
        try:
            return check_token_ids(prompt, self.vocab_size)
        except ValueError as e:
            raise ValueError(f"request {request_id}: {e}") from None

    def _check_open(self) -> None:
        if self.closed:
            raise FrontClosed(
                "this serving front was shut down and its instances are gone; "
                "start a new ServingFront"
            )

    def cancel(self, request_id: int) -> bool:
        """Cancel a request; every instance drops it and frees its KV.

        Returns:
            True if it was cancelled now, False if it had already finished,
            failed or been cancelled (its record is left as it was).

        Raises:
            ValueError: no request with this id was submitted.
            FrontClosed: the front was shut down.
        """
        self._check_open()
        tracked = self.requests.get(request_id)
        if tracked is None:
            raise ValueError(f"request id {request_id!r} was never submitted")
        if tracked.phase in TERMINAL:
            return False
        tracked.phase = Phase.CANCELLED
        tracked.record.failed = True
        tracked.record.error = "cancelled"
        for i, actor in enumerate(self.actors):
            if self.alive[i]:
                self.ops[actor.cancel.remote(tracked.key)] = _Op(
                    "cancel", tracked.key, i
                )
        logger.info("front: request %d cancelled", request_id)
        return True

    def flip(self, instance_id: int, role: Role | str) -> None:
        """Relabel an instance on an operator's command (the pool may empty).

        Raises:
            ValueError: no such instance, an unknown role, or a role the
                policy does not use (``mixed`` is for colocated serving only,
                and colocated instances take both phases whatever their label).
            FrontClosed: the front was shut down.
        """
        self._check_open()
        if not is_whole_number(instance_id) or not 0 <= instance_id < len(self.roles):
            raise ValueError(
                f"instance id {instance_id!r} is not one of 0..{len(self.roles) - 1}"
            )
        try:
            role = Role(role)
        except ValueError:
            raise ValueError(
                f"role {role!r} is unknown; choose one of {[r.value for r in Role]}"
            ) from None
        instance_id = int(instance_id)
        old = self.roles[instance_id]
        if old is role:
            return
        if Role.MIXED in (old, role):
            raise ValueError(
                f"instance {instance_id} cannot flip {old.value} -> {role.value}: "
                "only prefill and decode roles flip (policy "
                f"{self.policy.name})"
            )
        self._carry_out(Flip(instance_id, old, role, FlipReason.COMMAND))

    # -- the event loop ------------------------------------------------------------

    def poll(self, timeout_s: float | None = None) -> None:
        """Handle whatever has arrived, waiting at most ``timeout_s`` for it.

        Raises:
            FrontClosed: the front was shut down.
        """
        self._check_open()
        timeout_s = self.config.poll_timeout_s if timeout_s is None else timeout_s
        refs = [*self.polls, *self.ops]
        ready = []
        if refs:
            ready, rest = ray.wait(refs, num_returns=1, timeout=timeout_s)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
        else:
            time.sleep(timeout_s)
        for ref in ready:
            if ref in self.polls:
                self._on_poll(ref, self.polls.pop(ref))
            elif ref in self.ops:
                self._on_op(ref, self.ops.pop(ref))
        now = self.now()
        if now >= self.next_monitor_s:
            for flip in self.policy.monitor(self.states(), now):
                self._carry_out(flip)
            self.next_monitor_s = now + self.policy.monitor_interval_s
        self._expire(now)

    def busy(self) -> bool:
        """Some request is not finished yet."""
        return any(t.phase not in TERMINAL for t in self.requests.values())

    def run_until_idle(self, timeout_s: float) -> bool:
        """Poll until every request is finished; False if ``timeout_s`` ran out."""
        deadline = time.monotonic() + timeout_s
        while self.busy():
            if time.monotonic() > deadline:
                return False
            self.poll()
        return True

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        ignore_eos: bool = True,
        timeout_s: float = 300.0,
    ) -> list[tuple[int, ...]]:
        """Serve ``prompts`` (ids 0..n-1 after those already used) and return outputs.

        A request that failed (too long for the model, say) gives ``()``.

        Raises:
            ValueError: a prompt or ``max_new_tokens`` is invalid; raised before
                any prompt is sent.
            RemoteTimeout: not all finished within ``timeout_s``.
        """
        self._check_open()
        first = max(self.requests, default=-1) + 1
        ids = list(range(first, first + len(prompts)))
        for rid, prompt in zip(ids, prompts, strict=True):
            self._validated(rid, prompt, max_new_tokens)
        for rid, prompt in zip(ids, prompts, strict=True):
            self.submit(rid, prompt, max_new_tokens, ignore_eos=ignore_eos)
        if not self.run_until_idle(timeout_s):
            raise RemoteTimeout(f"{len(prompts)} requests not done in {timeout_s:g} s")
        outputs = self.outputs()
        return [outputs.get(rid, ()) for rid in ids]

    def replay(
        self,
        trace: Trace,
        prompt_of: Callable[[int, int], list[int]],
        *,
        rate_scale: float = 1.0,
        drain_timeout_s: float = 300.0,
        progress: Callable[[int], None] | None = None,
    ) -> list[RequestRecord]:
        """Open-loop replay: request k is submitted at its scaled arrival time,
        whatever happened to the ones before.

        Args:
            trace: requests (lengths must fit the model's context).
            prompt_of: ``(request_id, prompt_tokens) -> token ids``.
            rate_scale: arrivals ``rate_scale`` times faster than the trace.
            drain_timeout_s: bound on the wait for the last requests.
            progress: called with the number submitted so far.

        A request the front refuses (an output length below 1, a prompt from
        ``prompt_of`` with a token outside the vocabulary) fails alone: its
        record holds the reason and the replay goes on.

        Raises:
            ValueError: the trace repeats a request id, or uses one already
                submitted to this front; raised before anything is sent.
        """
        self._check_open()
        scaled = trace.scaled(rate_scale)
        ids = [r.request_id for r in scaled]
        repeated = sorted({i for i in ids if i in self.requests})
        if len(set(ids)) != len(ids) or repeated:
            seen: set[int] = set()
            twice = [i for i in ids if i in seen or seen.add(i)]
            raise ValueError(
                f"trace {trace.name}: request ids must be new and unique; "
                f"{(repeated or twice)[:5]} "
                + ("were already submitted" if repeated else "appear more than once")
            )
        start = self.now()
        for count, request in enumerate(scaled, start=1):
            while (wait := start + request.arrival_s - self.now()) > 0:
                self.poll(min(wait, self.config.poll_timeout_s))
            prompt = prompt_of(request.request_id, request.prompt_tokens)
            try:
                self.submit(
                    request.request_id, prompt, request.output_tokens, ignore_eos=True
                )
            except ValueError as e:
                self._refused(request.request_id, request, str(e))
            if progress is not None:
                progress(count)
        if not self.run_until_idle(drain_timeout_s):
            logger.warning("front: replay drain ran out after %g s", drain_timeout_s)
        return [self.requests[r.request_id].record for r in scaled]

    def _refused(self, request_id: int, request: TraceRequest, why: str) -> None:
        """Record a replayed request the front refused as failed."""
        record = RequestRecord(
            request_id, self.now(), request.prompt_tokens, request.output_tokens
        )
        record.failed = True
        record.error = why
        tracked = TrackedRequest(record, [], request.output_tokens, True)
        tracked.phase = Phase.FAILED
        self.requests[request_id] = tracked
        logger.warning("front: request %d refused: %s", request_id, why)

    def shutdown(self) -> None:
        """Kill every instance actor; requests not finished yet fail.

        Finished requests keep their outputs and records. Calling it again does
        nothing.
        """
        if self.closed:
            return
        self.closed = True
        for tracked in self.requests.values():
            if tracked.phase not in TERMINAL:
                tracked.holders.clear()  # their instances go away with the rest
                self._fail(tracked, "the front was shut down before it finished")
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                logger.debug("actor already gone", exc_info=True)
        self.alive = [False] * len(self.actors)
        self.polls.clear()
        self.ops.clear()

    # -- dispatch ------------------------------------------------------------------

    def _carry_out(self, flip: Flip | None) -> None:
        if flip is None:
            return
        i = flip.instance_id
        self.roles[i] = flip.to_role
        self.flips.append(
            FlipEvent(
                self.now(),
                i,
                flip.from_role.value,
                flip.to_role.value,
                flip.reason.value,
            )
        )
        if self.alive[i]:
            self.ops[self.actors[i].set_role.remote(flip.to_role.value)] = _Op(
                "role", -1, i
            )

    def _dispatch_prefill(self, tracked: TrackedRequest) -> None:
        info = RequestInfo(tracked.record.request_id, len(tracked.prompt))
        dispatch = self.policy.dispatch_prefill(info, self.states(), self.now())
        if dispatch is None:
            self._fail(tracked, "no instance is alive")
            return
        self._carry_out(dispatch.flip)
        i = dispatch.instance_id
        tracked.phase = Phase.PREFILL
        tracked.record.prefill_instance = i
        tracked.holders.add(i)
        ref = self.actors[i].submit_prefill.remote(
            tracked.key, tracked.prompt, tracked.max_new_tokens, tracked.ignore_eos
        )
        self.ops[ref] = _Op("submit", tracked.key, i)
        n = float(len(tracked.prompt))
        self._pend(i, [1, n, n * n, 0, 0])

    def _dispatch_decode(self, tracked: TrackedRequest, source: int) -> None:
        info = RequestInfo(tracked.record.request_id, len(tracked.prompt))
        dispatch = self.policy.dispatch_decode(info, source, self.states(), self.now())
        if dispatch is None:
            self._retry(tracked, "no instance is alive for its decode")
            return
        self._carry_out(dispatch.flip)
        target = dispatch.instance_id
        tracked.record.decode_instance = target
        tracked.holders.add(target)
        context = len(tracked.prompt) + 1
        self._pend(target, [0, 0, 0.0, 1, context])
        if dispatch.reason is DispatchReason.FALLBACK:
            logger.warning(
                "front: request %d decodes on instance %d by fallback (no decode "
                "instance); %d fallbacks so far",
                tracked.record.request_id,
                target,
                self.num_fallbacks,
            )
        if target == source:
            tracked.phase = Phase.DECODE
            ref = self.actors[source].continue_here.remote(tracked.key)
            self.ops[ref] = _Op("continue", tracked.key, source)
            return
        tracked.phase = Phase.HANDOFF
        if self.on_handoff is not None:
            self.on_handoff(tracked.record.request_id, source, target)
            if tracked.phase != Phase.HANDOFF or not self.alive[target]:
                return  # the hook cancelled it, or retried it elsewhere
        exported = self.actors[source].export_kv.remote(tracked.key)
        accepted = self.actors[target].accept_kv.remote(tracked.key, exported)
        self.ops[accepted] = _Op("accept", tracked.key, target, source)

    def _pend(self, i: int, delta: list[float]) -> None:
        self.pending[i] = [a + b for a, b in zip(self.pending[i], delta, strict=True)]

    # -- reports in ----------------------------------------------------------------

    def _tracked(self, key: int) -> TrackedRequest | None:
        tracked = self.requests.get(key // MAX_ATTEMPTS)
        if tracked is None or tracked.key != key:
            return None  # an abandoned attempt
        return tracked

    def _long_poll(self, i: int) -> None:
        ref = self.actors[i].next_events.remote(self.config.poll_timeout_s * 5)
        self.polls[ref] = i

    def _get(self, ref: Any, i: int) -> InstanceReport | None:
        """The result of a finished call; None (after handling it) if it failed."""
        try:
            return ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError:
            self._instance_died(i)
        return None

    def _instance_of(self, actor_id: str | None) -> int | None:
        """The instance whose actor has this (hex) id."""
        if actor_id is None:
            return None
        for i, actor in enumerate(self.actors):
            if actor._actor_id.hex() == actor_id:
                return i
        return None

    def _on_poll(self, ref: Any, i: int) -> None:
        if not self.alive[i]:
            return
        report = self._get(ref, i)
        if report is None:
            return
        self.loads[i] = report.load
        self._long_poll(i)
        now = self.now()
        # A prompt whose first token is a stop token ends in the same report:
        # it has no decode to place.
        ended = {e.request_id for e in report.events if isinstance(e, Finished)}
        for event in report.events:
            tracked = self._tracked(event.request_id)
            if tracked is None or tracked.phase in TERMINAL:
                continue
            if isinstance(event, FirstToken):
                if math.isnan(tracked.record.first_token_s):
                    tracked.record.first_token_s = now
                if tracked.max_new_tokens > 1 and event.request_id not in ended:
                    self._dispatch_decode(tracked, i)
            elif isinstance(event, Finished):
                if event.error:
                    self._retry(tracked, f"instance {i}: {event.error}")
                    continue
                tracked.phase = Phase.DONE
                tracked.output = event.output
                tracked.record.finish_s = now
                # A stop token may end it early: its TPOT is over the tokens
                # it generated, not the most it was allowed.
                tracked.record.output_tokens = len(event.output)
                # The report of the handoff may come after the end of the
                # request: free the sender's copy now.
                tracked.holders.discard(i)
                self._drop_everywhere(tracked)

    def _on_op(self, ref: Any, op: _Op) -> None:
        try:
            report = ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError as e:
            # A handoff involves two actors; the error names the dead one.
            dead = self._instance_of(e.actor_id)
            if dead is None and op.kind != "accept":
                dead = op.instance_id
            if dead is not None:
                self._instance_died(dead)
            self._op_failed(op, f"instance {dead} died")
            return
        except ray.exceptions.RayTaskError as e:
            self._op_failed(op, str(e.cause if e.cause is not None else e))
            return
        except ray.exceptions.RayError as e:
            # Any other Ray fault of this one operation (an exported KV cache
            # lost with its node, say) fails it alone, retried like the others.
            self._op_failed(op, f"{type(e).__name__}: {last_line(e)}")
            return
        self._op_done(op, report)

    def _op_done(self, op: _Op, report: InstanceReport) -> None:
        i = op.instance_id
        if isinstance(report, InstanceReport):
            self.loads[i] = report.load
        if op.kind == "submit":
            self._settle(op)
        elif op.kind in ("continue", "accept"):
            self._settle(op)
            tracked = self._tracked(op.key)
            if op.kind == "accept":
                if tracked is not None and tracked.phase is Phase.DONE:
                    # It finished on the receiver before this report came in
                    # (the sender's copy was freed at the end).
                    tracked.record.handoff = True
                    return
                if tracked is None or tracked.phase in TERMINAL:
                    # Cancelled or abandoned while the KV was on its way.
                    self.ops[self.actors[i].release.remote(op.key)] = _Op(
                        "release", op.key, i
                    )
                    return
                tracked.phase = Phase.DECODE
                tracked.record.handoff = True
                tracked.holders.discard(op.source)
                if self.alive[op.source]:
                    ref = self.actors[op.source].release.remote(op.key)
                    self.ops[ref] = _Op("release", op.key, op.source)

    def _settle(self, op: _Op) -> None:
        """An order's report now includes the work it added: stop counting it."""
        tracked = self._tracked(op.key)
        prompt = len(tracked.prompt) if tracked else 0
        if op.kind == "submit":
            n = float(prompt)
            self._pend(op.instance_id, [-1, -n, -n * n, 0, 0])
        else:
            self._pend(op.instance_id, [0, 0, 0.0, -1, -(prompt + 1)])
        self.pending[op.instance_id] = [max(v, 0) for v in self.pending[op.instance_id]]

    def _op_failed(self, op: _Op, why: str) -> None:
        if op.kind in ("submit", "continue", "accept"):
            self._settle(op)
        tracked = self._tracked(op.key)
        if tracked is None or tracked.phase in TERMINAL:
            return
        if op.kind in ("submit", "continue", "accept"):
            self._retry(
                tracked, f"{op.kind} on instance {op.instance_id} failed: {why}"
            )
        else:
            logger.warning(
                "front: %s on instance %d failed: %s", op.kind, op.instance_id, why
            )

    # -- failures ------------------------------------------------------------------

    def _instance_died(self, i: int) -> None:
        if not self.alive[i]:
            return
        self.alive[i] = False
        self.num_instance_failures += 1
        for ref in [r for r, j in self.polls.items() if j == i]:
            del self.polls[ref]
        affected = [
            t
            for t in self.requests.values()
            if t.phase not in TERMINAL and i in t.holders
        ]
        logger.warning(
            "front: instance %d died; %d affected request(s) will be retried or failed",
            i,
            len(affected),
        )
        for tracked in affected:
            self._retry(tracked, f"instance {i} died")

    def _retry(self, tracked: TrackedRequest, why: str) -> None:
        if tracked.record.num_retries >= self.config.max_retries:
            self._fail(tracked, why)
            return
        self._drop_everywhere(tracked)
        tracked.record.num_retries += 1
        tracked.attempt += 1
        logger.info(
            "front: retrying request %d (attempt %d): %s",
            tracked.record.request_id,
            tracked.attempt + 1,
            why,
        )
        self._dispatch_prefill(tracked)

    def _fail(self, tracked: TrackedRequest, why: str) -> None:
        self._drop_everywhere(tracked)
        tracked.phase = Phase.FAILED
        tracked.record.failed = True
        tracked.record.error = why
        logger.warning("front: request %d failed: %s", tracked.record.request_id, why)

    def _drop_everywhere(self, tracked: TrackedRequest) -> None:
        """Free whatever the current attempt holds on the instances still alive."""
        for i in tracked.holders:
            if self.alive[i]:
                ref = self.actors[i].release.remote(tracked.key)
                self.ops[ref] = _Op("release", tracked.key, i)
        tracked.holders.clear()

    def _expire(self, now: float) -> None:
        limit = self.config.request_timeout_s
        for tracked in self.requests.values():
            if tracked.phase not in TERMINAL and now - tracked.record.arrival_s > limit:
                self._fail(tracked, f"not finished within {limit:g} s")
