"""Discrete-event simulation of a pool of serving instances driven by a policy.

The simulator replays a trace against ``num_instances`` simulated instances.
The policy objects are the very ones the real front end uses
(`raysys.serving.policy`); the simulator only carries their decisions out, so
policies differ in their decisions and in nothing else.

Every instance runs the local scheduler of `raysys.serving.batching` (the one
the real engine runs), one step at a time:

1. sequences whose KV is on the instance join the decode batch, up to
   ``max_num_seqs``;
2. the rest of the step's token budget goes to queued prompts in chunks
   (`plan_prefill`);
3. the step lasts `LatencyProfile.step_time_s` of what it holds, so decodes
   that share a step with a prefill chunk wait for it (interference);
4. at the end of the step each decoding sequence has one more token; a prompt
   whose last chunk ran has its first token, and the policy picks where it
   decodes. Decoding elsewhere hands the KV over a link per instance (one
   handoff at a time per link, `LatencyProfile.kv_transfer_time_s` each) once
   the receiver has KV room for it.

KV memory is reserved for a request's whole length (prompt plus output) when its
prefill starts and again on the receiver when a handoff starts; the sender's
copy is freed when the handoff ends. Reserving the final length up front uses
the trace's output length, which a real engine does not know (vLLM allocates
blocks as it goes and preempts when memory runs out); it keeps the simulation
free of preemption while treating every policy alike.

A request meets its SLOs when its TTFT (first token time minus arrival) and its
TPOT (time from first to last token over the number of tokens after the first)
are both within the targets; a single-token request is held to TTFT only.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from raysys.runtime.errors import ConfigError
from raysys.serving.batching import EngineConfig, MixedStepBudget, plan_prefill
from raysys.serving.metrics import FlipEvent, RequestRecord, summarize
from raysys.serving.policy import (
    Dispatch,
    Flip,
    InstanceState,
    RequestInfo,
    Role,
    ServingPolicy,
    SloTargets,
)
from raysys.serving.profile import LatencyProfile
from raysys.serving.trace import Trace

logger = logging.getLogger(__name__)

# Monitor ticks in a row over an idle pool above which the simulator skips them.
IDLE_TICKS_TO_SKIP = 1000


@dataclass
class SimResult:
    """Outcome of one simulated replay."""

    policy: str
    rate_scale: float
    records: list[RequestRecord]
    flips: list[FlipEvent]
    num_fallbacks: int
    end_s: float
    aborted: bool = False  # stopped early: attainment could no longer reach the bar
    dispatch_reasons: dict[str, int] = field(default_factory=dict)

    def attainment(self, slo: SloTargets) -> float:
        """Share of all requests that completed within both SLOs."""
        return summarize(self.records, slo).slo_attainment


class _Job:
    """One request's state on the instance holding it."""

    __slots__ = ("record", "remaining", "done", "admitted", "start_step", "source")

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.remaining = record.prompt_tokens  # prompt tokens still to prefill
        self.done = 0
        self.admitted = False  # KV reserved on the prefill instance
        self.start_step = 0  # step count when it joined the decode batch
        self.source: _Instance | None = None  # sender of a handoff

    @property
    def kv_tokens(self) -> int:
        return self.record.prompt_tokens + self.record.output_tokens

    @property
    def context_tokens(self) -> int:
        return self.record.prompt_tokens + 1


class _Instance:
    def __init__(self, instance_id: int, role: Role, profile: LatencyProfile) -> None:
        self.instance_id = instance_id
        self.role = role
        self.profile = profile
        self.kv_used = 0
        self.prefill_queue: deque[_Job] = deque()
        self.prefill_tokens = 0
        self.prefill_pairs = 0.0
        self.running: list[tuple[int, int, _Job]] = []  # (finish step, tiebreak, job)
        self.batch_tokens = 0
        self.ready: deque[_Job] = deque()  # KV here, waiting for a batch slot
        self.incoming: deque[_Job] = deque()  # waiting for KV room to hand over
        self.num_pending = 0  # ready + incoming + in flight
        self.pending_tokens = 0
        self.busy = False
        self.step_count = 0
        self.itl_s = 0.0
        self.link_free_s = 0.0
        self.step_chunks: list[tuple[_Job, int]] = []

    def state(self) -> InstanceState:
        num_running = len(self.running)
        return InstanceState(
            instance_id=self.instance_id,
            role=self.role,
            num_prefill=len(self.prefill_queue),
            prefill_tokens=self.prefill_tokens,
            prefill_pairs=self.prefill_pairs,
            num_decode=num_running + self.num_pending,
            decode_tokens=self.batch_tokens + self.pending_tokens,
            observed_itl_s=self.itl_s if num_running else 0.0,
        )


class Simulator:
    """Replays a trace on simulated instances with a policy's decisions.

    Args:
        policy: a fresh policy object (it keeps counters and cooldown state).
        profile: the latency profile of every instance.
        num_instances: instances in the pool.
        engine: the local scheduler's knobs.
        stop_below: stop early once the SLO attainment can no longer reach this
            share (for goodput searches); None runs to the end.
    """

    def __init__(
        self,
        policy: ServingPolicy,
        profile: LatencyProfile,
        num_instances: int,
        engine: EngineConfig | None = None,
        stop_below: float | None = None,
    ) -> None:
        if num_instances < 1:
            raise ConfigError(f"num_instances={num_instances} must be at least 1")
        self.policy = policy
        self.slo = policy.slo
        self.engine = engine or EngineConfig()
        self.stop_below = stop_below
        roles = policy.initial_roles(num_instances)
        policy.mixed_step_limit_s = self.engine.mixed_step_limit_s
        self.instances = [_Instance(i, r, profile) for i, r in enumerate(roles)]
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.now = 0.0
        self.flips: list[FlipEvent] = []
        self.num_violations = 0
        self.violated: set[int] = set()
        self.num_finished = 0
        self.num_requests = 0

    # -- event plumbing --------------------------------------------------------

    def _at(self, time_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (time_s, next(self.counter), action))

    def _states(self) -> list[InstanceState]:
        return [inst.state() for inst in self.instances]

    def _apply(self, flip: Flip | None) -> None:
        if flip is None:
            return
        inst = self.instances[flip.instance_id]
        inst.role = flip.to_role
        self.flips.append(
            FlipEvent(
                self.now,
                flip.instance_id,
                flip.from_role.value,
                flip.to_role.value,
                flip.reason.value,
            )
        )

    def _violate(self, record: RequestRecord) -> None:
        if record.request_id not in self.violated:
            self.violated.add(record.request_id)
            self.num_violations += 1

    # -- request life ----------------------------------------------------------

    # TODO: no preemption: each request reserves its final length up front,
    # which a real engine cannot do; memory-bound overload is gentler here.
    def _arrive(self, record: RequestRecord) -> None:
        info = RequestInfo(record.request_id, record.prompt_tokens)
        dispatch = self.policy.dispatch_prefill(info, self._states(), self.now)
        if dispatch is None:
            self._fail(record, "no instance alive")
            return
        self._apply(dispatch.flip)
        inst = self.instances[dispatch.instance_id]
        if (
            record.prompt_tokens + record.output_tokens
            > inst.profile.kv_capacity_tokens
        ):
            self._fail(record, "longer than the instance's KV capacity")
            return
        record.prefill_instance = inst.instance_id
        job = _Job(record)
        inst.prefill_queue.append(job)
        inst.prefill_tokens += job.remaining
        inst.prefill_pairs += float(record.prompt_tokens) ** 2
        self._kick(inst)

    def _fail(self, record: RequestRecord, why: str) -> None:
        record.failed = True
        record.error = why
        self.num_finished += 1
        self._violate(record)

    def _first_token(self, inst: _Instance, job: _Job) -> None:
        record = job.record
        record.first_token_s = self.now
        if record.ttft_s > self.slo.ttft_s:
            self._violate(record)
        if record.output_tokens <= 1:
            record.decode_instance = inst.instance_id
            self._finish(inst, job)
            return
        info = RequestInfo(record.request_id, record.prompt_tokens)
        dispatch: Dispatch | None = self.policy.dispatch_decode(
            info, inst.instance_id, self._states(), self.now
        )
        if dispatch is None:
            inst.kv_used -= job.kv_tokens
            self._fail(record, "no instance alive for decode")
            return
        self._apply(dispatch.flip)
        target = self.instances[dispatch.instance_id]
        record.decode_instance = target.instance_id
        target.num_pending += 1
        target.pending_tokens += job.context_tokens
        if target is inst:
            target.ready.append(job)
        else:
            record.handoff = True
            job.source = inst
            target.incoming.append(job)
            self._start_handoffs(target)

    def _start_handoffs(self, dst: _Instance) -> None:
        capacity = dst.profile.kv_capacity_tokens
        while dst.incoming and dst.kv_used + dst.incoming[0].kv_tokens <= capacity:
            job = dst.incoming.popleft()
            dst.kv_used += job.kv_tokens
            src = job.source
            start = max(self.now, src.link_free_s, dst.link_free_s)
            end = start + dst.profile.kv_transfer_time_s(job.context_tokens)
            src.link_free_s = dst.link_free_s = end
            self._at(end, lambda job=job, dst=dst: self._handoff_done(job, dst))

    def _handoff_done(self, job: _Job, dst: _Instance) -> None:
        src = job.source
        src.kv_used -= job.kv_tokens
        job.source = None
        dst.ready.append(job)
        self._start_handoffs(src)
        self._kick(src)
        self._kick(dst)

    def _finish(self, inst: _Instance, job: _Job) -> None:
        record = job.record
        record.finish_s = self.now
        inst.kv_used -= job.kv_tokens
        self.num_finished += 1
        if record.tpot_s is not None and record.tpot_s > self.slo.tpot_s:
            self._violate(record)

    # -- the local scheduler ---------------------------------------------------

    def _kick(self, inst: _Instance) -> None:
        if not inst.busy:
            self._start_step(inst)

    def _start_step(self, inst: _Instance) -> None:
        # 1. ready sequences join the decode batch.
        while inst.ready and len(inst.running) < self.engine.max_num_seqs:
            job = inst.ready.popleft()
            job.start_step = inst.step_count
            finish_step = inst.step_count + job.record.output_tokens - 1
            heapq.heappush(inst.running, (finish_step, job.record.request_id, job))
            inst.batch_tokens += job.context_tokens
            inst.num_pending -= 1
            inst.pending_tokens -= job.context_tokens

        # 2. the rest of the token budget goes to queued prompts, in order.
        free = inst.profile.kv_capacity_tokens - inst.kv_used
        budget = MixedStepBudget.for_step(
            self.engine, inst.profile, inst.batch_tokens, len(inst.running)
        )
        chunks = plan_prefill(
            inst.prefill_queue, len(inst.running), free, self.engine, budget
        )
        for job, _ in chunks:
            if not job.admitted:
                inst.kv_used += job.kv_tokens
                job.admitted = True
        if not chunks and not inst.running:
            inst.busy = False
            return

        # 3. the step lasts what the profile says of its content.
        duration = inst.profile.step_time_s(
            [(n, job.done) for job, n in chunks], inst.batch_tokens, len(inst.running)
        )
        inst.busy = True
        inst.step_chunks = chunks
        self._at(self.now + duration, lambda: self._end_step(inst, duration))

    def _end_step(self, inst: _Instance, duration: float) -> None:
        # 4a. every decoding sequence has one more token.
        if inst.running:
            inst.step_count += 1
            inst.batch_tokens += len(inst.running)
            w = self.engine.itl_smoothing
            inst.itl_s = (
                duration if inst.itl_s == 0 else w * duration + (1 - w) * inst.itl_s
            )
            freed = False
            while inst.running and inst.running[0][0] <= inst.step_count:
                _, _, job = heapq.heappop(inst.running)
                inst.batch_tokens -= (
                    job.context_tokens + inst.step_count - job.start_step
                )
                self._finish(inst, job)
                freed = True
            if freed:
                self._start_handoffs(inst)
            if not inst.running:
                inst.itl_s = 0.0

        # 4b. prompts whose last chunk ran have their first token.
        for job, num_tokens in inst.step_chunks:
            end = job.done + num_tokens
            inst.prefill_tokens -= num_tokens
            inst.prefill_pairs -= float(end) ** 2 - float(job.done) ** 2
            job.done = end
            job.remaining -= num_tokens
            if job.remaining == 0:
                inst.prefill_queue.remove(job)
                self._first_token(inst, job)
        inst.step_chunks = []
        if not inst.prefill_queue:
            inst.prefill_pairs = 0.0  # drop float round-off
        inst.busy = False
        self._start_step(inst)

    # -- the run ---------------------------------------------------------------

    def _idle(self) -> bool:
        return not any(
            inst.busy or inst.prefill_queue or inst.running or inst.num_pending
            for inst in self.instances
        )

    def _monitor(self) -> None:
        flips = self.policy.monitor(self._states(), self.now)
        for flip in flips:
            self._apply(flip)
        if self.num_finished >= self.num_requests:
            return
        interval = self.policy.monitor_interval_s
        next_tick = self.now + interval
        # A monitor acts on load, and an idle pool has none: once a tick has
        # seen the pool idle and flipped nothing, the ticks until the next
        # event would see the same and do the same. Over a long quiet gap (a
        # trace with hours between two requests) they are skipped, to the
        # first tick at or after the next event; short gaps tick as usual.
        if not flips and self.events and self._idle():
            ticks = (self.events[0][0] - self.now) / interval
            if ticks > IDLE_TICKS_TO_SKIP:
                next_tick = self.now + math.ceil(ticks) * interval
        self._at(next_tick, self._monitor)

    def run(self, trace: Trace, rate_scale: float = 1.0) -> SimResult:
        """Replay ``trace`` with arrivals ``rate_scale`` times faster."""
        scaled = trace.scaled(rate_scale)
        records = [
            RequestRecord(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens)
            for r in scaled.requests
        ]
        self.num_requests = len(records)
        allowed = (
            math.inf
            if self.stop_below is None
            else (1.0 - self.stop_below) * len(records)
        )
        for record in records:
            self._at(record.arrival_s, lambda r=record: self._arrive(r))
        if math.isfinite(self.policy.monitor_interval_s):
            self._at(self.policy.monitor_interval_s, self._monitor)
        aborted = False
        while self.events:
            self.now, _, action = heapq.heappop(self.events)
            action()
            if self.num_violations > allowed:
                aborted = True
                break
        if not aborted and self.num_finished < self.num_requests:
            raise RuntimeError(
                f"simulation stalled with {self.num_requests - self.num_finished} "
                "requests unfinished"
            )
        return SimResult(
            policy=self.policy.name,
            rate_scale=rate_scale,
            records=records,
            flips=self.flips,
            num_fallbacks=self.policy.counters.num_fallbacks,
            end_s=self.now,
            aborted=aborted,
            dispatch_reasons=dict(self.policy.counters.dispatch_reasons),
        )


def simulate(
    make_policy: Callable[[], ServingPolicy],
    profile: LatencyProfile,
    trace: Trace,
    *,
    num_instances: int,
    rate_scale: float = 1.0,
    engine: EngineConfig | None = None,
    stop_below: float | None = None,
) -> SimResult:
    """One replay of ``trace`` with a fresh policy from ``make_policy``."""
    sim = Simulator(make_policy(), profile, num_instances, engine, stop_below)
    return sim.run(trace, rate_scale)


@dataclass
class GoodputResult:
    """The highest rate scale found that keeps the attainment at the bar."""

    policy: str
    goodput_scale: float  # 0 when even the lowest scale tried misses the bar
    goodput_rps: float
    curve: list[tuple[float, float]]  # (rate scale, attainment) of every run


def find_goodput(
    make_policy: Callable[[], ServingPolicy],
    profile: LatencyProfile,
    trace: Trace,
    *,
    num_instances: int,
    engine: EngineConfig | None = None,
    target: float = 0.9,
    start_scale: float = 1.0,
    rel_tol: float = 0.03,
    max_runs: int = 24,
) -> GoodputResult:
    """Goodput: the highest rate scale whose SLO attainment is at least ``target``.

    Scales up (or down) by doubling from ``start_scale`` until the attainment
    crosses ``target``, then bisects geometrically until the bracket is within
    ``rel_tol``. Runs above the bar stop early once the bar can no longer be
    met; the attainment recorded for them counts only the requests finished by
    then (a lower bound, below ``target`` either way). The goodput in requests
    per second is the scale times the trace's mean rate. Attainment falls
    steeply past the goodput, and not always monotonically (a flip more or
    less changes a run), so the search is precise to about ``rel_tol``.

    Raises:
        ConfigError: every request of the trace arrives at the same time.
    """
    _check_spans_time(trace)
    curve: list[tuple[float, float]] = []
    name = make_policy().name

    def attain(scale: float) -> float:
        result = simulate(
            make_policy,
            profile,
            trace,
            num_instances=num_instances,
            rate_scale=scale,
            engine=engine,
            stop_below=target,
        )
        value = result.attainment(make_policy().slo)
        curve.append((scale, value))
        logger.debug("%s at scale %.3f: attainment %.3f", name, scale, value)
        return value

    lo, hi = 0.0, math.inf
    scale = start_scale
    while len(curve) < max_runs:
        if attain(scale) >= target:
            lo = scale
            if math.isfinite(hi):
                break
            scale *= 2
        else:
            hi = scale
            if lo > 0:
                break
            scale /= 2
            if scale < start_scale / 1024:
                break
    while lo > 0 and math.isfinite(hi) and hi / lo > 1 + rel_tol:
        if len(curve) >= max_runs:
            break
        mid = math.sqrt(lo * hi)
        if attain(mid) >= target:
            lo = mid
        else:
            hi = mid
    curve.sort()
    return GoodputResult(name, lo, lo * trace.mean_rate_rps, curve)


@dataclass
class Headroom:
    """A fluid estimate of what changing roles can gain over a fixed split."""

    ratio: float  # best static split's peak need / adaptive peak need (>= 1)
    best_num_prefill: int
    window_s: float
    prefill_share_min: float
    prefill_share_max: float


def adaptive_headroom(
    trace: Trace,
    profile: LatencyProfile,
    num_instances: int,
    *,
    window_s: float,
    tpot_s: float,
) -> Headroom:
    """How much more load than the best fixed split an ideal role-adaptive pool
    carries, in a fluid model of the trace.

    Each request's work is its prefill time plus its decode tokens at the cost
    per token of a full decode batch (the largest within ``tpot_s`` and KV
    memory, at the trace's mean context). Per window of ``window_s`` trace
    seconds, the work rate of each phase is in instances busy. An adaptive
    pool needs ``max_w (P_w + D_w)`` instances; a split with ``k`` prefill
    instances needs ``N·max(max_w P_w / k, max_w D_w / (N - k))``. Their ratio,
    at the best ``k``, estimates the goodput gain of a policy that only changes
    roles. It is not a strict bound: queueing inside a window and interference
    are left out, and a fixed split that misses targets in bursts shorter than
    a window loses more than this model says.
    """
    if num_instances < 2:
        raise ConfigError("a split needs at least 2 instances")
    # At most 100,000 windows, whatever window length is asked for.
    window_s = max(window_s, trace.duration_s / 100_000, 1e-9)
    arrivals = np.array([r.arrival_s for r in trace])
    prompts = np.array([r.prompt_tokens for r in trace], dtype=float)
    outputs = np.array([r.output_tokens for r in trace], dtype=float)
    context = float(np.mean(prompts + outputs / 2))
    batch_tokens = profile.max_batch_tokens(tpot_s, context)
    num_seqs = max(batch_tokens / context, 1.0)
    per_token_s = (
        profile.decode_step_time_s(int(batch_tokens), int(num_seqs)) / num_seqs
    )
    prefill = np.array([profile.prefill_time_s(int(n)) for n in prompts])
    decode = np.maximum(outputs - 1, 0) * per_token_s
    windows = (arrivals // window_s).astype(int)
    p = np.bincount(windows, prefill) / window_s
    d = np.bincount(windows, decode) / window_s
    adaptive = float((p + d).max())
    needs = {
        k: num_instances * max(p.max() / k, d.max() / (num_instances - k))
        for k in range(1, num_instances)
    }
    best = min(needs, key=needs.get)
    busy = (p + d) > 0
    share = p[busy] / (p + d)[busy]
    return Headroom(
        ratio=float(needs[best] / adaptive),
        best_num_prefill=best,
        window_s=window_s,
        prefill_share_min=float(share.min()),
        prefill_share_max=float(share.max()),
    )


def _check_spans_time(trace: Trace) -> None:
    if trace.duration_s <= 0:
        raise ConfigError(
            f"trace {trace.name}: all {len(trace)} requests arrive at the same "
            "time, so it has no request rate to scale and no goodput; give a "
            "trace whose arrivals span some time"
        )


def check_slos_reachable(
    trace: Trace,
    profile: LatencyProfile,
    ttft_slo_s: float,
    target_attainment: float,
    tpot_slo_s: float | None = None,
) -> None:
    """Refuse SLOs that no policy can meet at any rate.

    A request whose prefill alone, on an idle instance, takes longer than the
    TTFT target misses it under every policy; so does one whose first decode
    step alone, on an idle instance, takes longer than the TPOT target (later
    steps only hold more context). When more than ``1 - target_attainment`` of
    the trace are such requests, every goodput is zero and a search would only
    say so after minutes of simulation. A trace whose requests all arrive at
    once has no rate to scale, so it has no goodput either.

    Raises:
        ConfigError: naming the target, the share of requests out of reach
            and the shortest target that leaves enough of them; or the trace
            spans no time.
    """
    _check_spans_time(trace)
    prefill = np.array([profile.prefill_time_s(r.prompt_tokens) for r in trace])
    _refuse_out_of_reach(
        prefill, ttft_slo_s, target_attainment, trace, profile,
        target="TTFT", flag="--ttft-slo-s", precision=".2f",
        need="for their prefill alone",
    )  # fmt: skip
    if tpot_slo_s is not None:
        # A one-token answer has no TPOT; every other one takes at least its
        # first decode step alone on an idle instance per token.
        alone = np.array(
            [
                profile.decode_step_time_s(r.prompt_tokens + 1, 1)
                if r.output_tokens > 1
                else 0.0
                for r in trace
            ]
        )
        _refuse_out_of_reach(
            alone, tpot_slo_s, target_attainment, trace, profile,
            target="TPOT", flag="--tpot-slo-s", precision=".3f",
            need="per token even decoding alone",
            why=f" (a decode step costs at least {profile.decode_overhead_s:.3g} s)",
        )  # fmt: skip


def _refuse_out_of_reach(
    times: np.ndarray,
    slo_s: float,
    target_attainment: float,
    trace: Trace,
    profile: LatencyProfile,
    *,
    target: str,
    flag: str,
    precision: str,
    need: str,
    why: str = "",
) -> None:
    out_of_reach = float(np.mean(times > slo_s))
    if out_of_reach > 1.0 - target_attainment + 1e-9:
        needed = float(np.quantile(times, target_attainment, method="higher"))
        raise ConfigError(
            f"{target} target {slo_s:g} s: {out_of_reach:.1%} of the requests of "
            f"{trace.name} need longer than that {need} on {profile.name}{why}, so "
            f"no policy reaches {target_attainment:.0%} attainment at any rate; use "
            f"a {target} target above {needed:{precision}} s ({flag})"
        )
