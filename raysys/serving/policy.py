"""Serving policies: which instance runs each phase, and when an instance flips role.

Policies are plain objects. They read snapshots of the instances
(`InstanceState`, buildable by hand) and return decisions (`Dispatch`, `Flip`);
whoever calls them carries the decisions out, be it the Ray front end or the
discrete-event simulator. Three policies share one interface:

- `ArrowPolicy`: adaptive disaggregation after Arrow (Wu et al., "Arrow:
  Adaptive Scheduling Mechanisms for Disaggregated LLM Inference", 2025, §5).
  Instances are stateless, so a role is a label and a flip is a relabel; work
  already on an instance stays there and finishes.
- `StaticSplitPolicy`: a fixed prefill:decode split with the same dispatch
  costs and no flips (DistServe / vLLM-style disaggregation).
- `ColocatedPolicy`: every instance runs both phases of the requests it takes.

Design note on Arrow's rules, as implemented here. Loads are ratios to the
SLOs: an instance's prefill load is the predicted time of its queued prefill
work over the TTFT target; its decode load is the share of a step's room
(the TPOT target less the step's fixed cost) that its observed inter-token
latency uses beyond that fixed cost, or its resident batch tokens over MT (the
most batch tokens a step may hold within the TPOT target, capped by KV
memory), whichever is higher, so a decode instance whose KV memory is full
counts as loaded even while its steps are fast. (Arrow reads latency / TPOT
target, which under a tight target never falls below fixed cost / target.) A
pool's load is the mean over its instances.

Dispatch (Algorithm 1) ranks candidates by lexicographic costs:

- prefill on i: ``(Σ_{d∈D_i} L(d), Σ_{p∈P_i∪{r}} T(p, i))``: first the decode
  tokens that would suffer interference, then the predicted TTFT; feasible when
  the predicted TTFT is within the target;
- decode on i: ``(Σ_{p∈P_i} L(p), Σ_{d∈D_i∪{r}} L(d) − MT(i))``: first the
  prefill tokens that would interfere, then the batch tokens above MT;
  feasible when that excess is at most 0.

A decode whose prefill instance has meanwhile flipped to decode stays there
(no KV handoff). So does one whose handoff alone would stall it longer than
``handoff_limit_tpot`` TPOT targets, when its prefill instance has room, and
either less queued prefill than the handoff takes or a mixed-step limit that
keeps the steps it would share within the TPOT target (this rule is ours).
With no feasible candidate a flip is tried (P→D for a decode, D→P for a
prefill only while the decode pool's load is below the shrink threshold);
otherwise the cheapest candidate takes the request.

The monitor (Algorithm 2) flips one prefill instance to decode when the decode
pool's load has stayed at or above the expand threshold for ``num_intervals``
consecutive ticks, or when the prefill load has been at or below the shrink
threshold while the decode load is at or above it for as many ticks and no D→P
flip happened within the cooldown; P→D flips respect a cooldown. A pool is
never emptied, and the instance to flip (Algorithm 3) minimises
``(𝟙[it holds none of the target phase's work], its resident work)``.
"""

from __future__ import annotations

import enum
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysys.runtime.errors import ConfigError
from raysys.serving.profile import LatencyProfile

logger = logging.getLogger(__name__)


class Role(str, enum.Enum):
    """What new work an instance receives."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"  # colocated: both phases

    def opposite(self) -> Role:
        if self is Role.MIXED:
            return Role.MIXED
        return Role.DECODE if self is Role.PREFILL else Role.PREFILL


@dataclass(frozen=True)
class PrefillWork:
    """A prompt queued or being prefilled on an instance (a member of P_i)."""

    request_id: int
    prompt_tokens: int
    remaining_tokens: int  # not yet prefilled


@dataclass(slots=True)
class InstanceState:
    """A snapshot of one instance, as the policies see it.

    Prefill work is summarised by three sums, enough to predict its time under
    a quadratic profile: the number of prompts, their tokens still to prefill
    (Σ L(p)) and the attention pairs still to compute (Σ end² − done²). Decode
    work is summarised by the number of sequences and their context tokens
    (Σ L(d)). `InstanceState.of` builds one from lists of work. Policies
    read snapshots and never change them.
    """

    instance_id: int
    role: Role
    num_prefill: int = 0
    prefill_tokens: int = 0
    prefill_pairs: float = 0.0
    num_decode: int = 0
    decode_tokens: int = 0
    observed_itl_s: float = 0.0  # recent mean time between decode steps
    alive: bool = True

    @classmethod
    def of(
        cls,
        instance_id: int,
        role: Role,
        prefill: Sequence[PrefillWork] = (),
        decode_context_tokens: Sequence[int] = (),
        observed_itl_s: float = 0.0,
        alive: bool = True,
    ) -> InstanceState:
        """A snapshot from the prompts on an instance and the context lengths of
        its decoding sequences."""
        pairs = 0.0
        for p in prefill:
            done = p.prompt_tokens - p.remaining_tokens
            pairs += float(p.prompt_tokens) ** 2 - float(done) ** 2
        return cls(
            instance_id=instance_id,
            role=role,
            num_prefill=len(prefill),
            prefill_tokens=sum(p.remaining_tokens for p in prefill),
            prefill_pairs=pairs,
            num_decode=len(decode_context_tokens),
            decode_tokens=sum(decode_context_tokens),
            observed_itl_s=observed_itl_s,
            alive=alive,
        )


@dataclass(frozen=True)
class RequestInfo:
    """What dispatch knows of a request: its id and prompt length."""

    request_id: int
    prompt_tokens: int


class DispatchReason(str, enum.Enum):
    FEASIBLE = "feasible"  # the cheapest candidate that meets the SLO
    STAY_ON_FLIPPED = "stay_on_flipped"  # prefill instance became decode: no handoff
    STAY_AVOIDS_HANDOFF = "stay_avoids_handoff"  # the KV handoff alone would stall
    FLIPPED = "flipped"  # no candidate met the SLO; a flip made one
    CHEAPEST = "cheapest"  # none met the SLO and no flip was allowed
    COLOCATED = "colocated"  # both phases on one instance by design
    FALLBACK = "fallback"  # the pool of the needed role is empty or dead


class FlipReason(str, enum.Enum):
    DECODE_OVERLOAD = "decode_overload"  # decode load >= expand for long enough
    PREFILL_IDLE = "prefill_idle"  # prefill load <= shrink <= decode load
    DISPATCH_DECODE = "dispatch_decode"  # no decode instance met the TPOT target
    DISPATCH_PREFILL = "dispatch_prefill"  # no prefill instance met the TTFT target
    COMMAND = "command"  # an operator asked for it


@dataclass(frozen=True)
class Flip:
    """Relabel ``instance_id`` from ``from_role`` to ``to_role``."""

    instance_id: int
    from_role: Role
    to_role: Role
    reason: FlipReason


@dataclass(frozen=True)
class Dispatch:
    """Send a phase of a request to ``instance_id``, flipping it first if ``flip``."""

    instance_id: int
    reason: DispatchReason
    flip: Flip | None = None
    cost: tuple[float, float] = (0.0, 0.0)


class SloTargets(BaseModel):
    """Service-level objectives a request is held to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_s: float = Field(gt=0, description="time-to-first-token target, seconds")
    tpot_s: float = Field(gt=0, description="time-per-output-token target, seconds")


class ArrowConfig(BaseModel):
    """Knobs of the Arrow monitor and dispatcher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expand_threshold: float = Field(
        1.0, gt=0, description="decode pool load that asks for more decode instances"
    )
    shrink_threshold: float = Field(
        0.5,
        gt=0,
        description="load below which a pool may give an instance away",
    )
    cooldown_s: float = Field(
        10.0,
        ge=0,
        description="minimum seconds between two P->D flips, and between a D->P "
        "flip and a P->D flip of an idle prefill pool",
    )
    num_intervals: int = Field(
        3,
        ge=1,
        description="consecutive monitor ticks of decode overload (or of an idle "
        "prefill pool beside a busy decode pool) to flip",
    )
    monitor_interval_s: float = Field(
        1.0, gt=0, description="seconds between two monitor ticks"
    )
    ttft_margin: float = Field(
        1.0,
        gt=0,
        le=1,
        description="a prefill instance is feasible while its predicted TTFT is "
        "within this share of the target (1: the target itself)",
    )
    initial_prefill_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of instances that start as prefill"
    )
    handoff_limit_tpot: float = Field(
        1.0,
        ge=0,
        description="a decode stays on its prefill instance (when that instance "
        "has room under MT and less queued prefill than the handoff takes, or a "
        "mixed-step limit keeps its steps within TPOT) if handing its KV over "
        "would take longer than this many TPOT targets; 0: always hand over",
    )

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> ArrowConfig:
        if self.shrink_threshold > self.expand_threshold:
            raise ValueError(
                f"shrink_threshold={self.shrink_threshold} exceeds "
                f"expand_threshold={self.expand_threshold}; keep shrink <= expand"
            )
        return self


@dataclass
class PolicyCounters:
    """Decisions a policy has taken, for reports."""

    num_flips: int = 0
    num_fallbacks: int = 0
    dispatch_reasons: dict[str, int] = field(default_factory=dict)

    def count(self, dispatch: Dispatch) -> None:
        key = dispatch.reason.value
        self.dispatch_reasons[key] = self.dispatch_reasons.get(key, 0) + 1
        if dispatch.reason is DispatchReason.FALLBACK:
            self.num_fallbacks += 1
        if dispatch.flip is not None:
            self.num_flips += 1


class ServingPolicy(ABC):
    """Decides where each phase of a request runs and when instances flip.

    Args:
        profiles: one profile for every instance, or a mapping from instance id
            to its profile (instances missing from the mapping are an error).
        slo: the TTFT and TPOT targets.
    """

    name = "policy"
    monitor_interval_s = math.inf  # no monitor unless a policy sets one
    # The longest step that holds decodes, when the instances' local scheduler
    # cuts prompt chunks to a time (`EngineConfig.mixed_step_limit_s`); set by
    # whoever runs the instances (the simulator, the serving front).
    mixed_step_limit_s: float | None = None

    def __init__(
        self, profiles: LatencyProfile | Mapping[int, LatencyProfile], slo: SloTargets
    ) -> None:
        self.profiles = profiles
        self.slo = slo
        self.counters = PolicyCounters()

    def profile(self, instance_id: int) -> LatencyProfile:
        if isinstance(self.profiles, LatencyProfile):
            return self.profiles
        try:
            return self.profiles[instance_id]
        except KeyError as e:
            raise ConfigError(
                f"no latency profile for instance {instance_id}; give one per instance"
            ) from e

    @abstractmethod
    def initial_roles(self, num_instances: int) -> list[Role]:
        """The role of each instance at start."""

    @abstractmethod
    def dispatch_prefill(
        self, request: RequestInfo, states: Sequence[InstanceState], now_s: float
    ) -> Dispatch | None:
        """Where ``request`` is prefilled; None when no instance is alive."""

    @abstractmethod
    def dispatch_decode(
        self,
        request: RequestInfo,
        prefill_instance: int,
        states: Sequence[InstanceState],
        now_s: float,
    ) -> Dispatch | None:
        """Where ``request`` decodes after its prefill on ``prefill_instance``."""

    def monitor(self, states: Sequence[InstanceState], now_s: float) -> list[Flip]:
        """Flips the monitor asks for at ``now_s`` (none by default)."""
        return []

    # -- shared cost model --------------------------------------------------------

    def queued_prefill_s(self, state: InstanceState) -> float:
        """Σ T(p, i): predicted time to finish the prefill work on an instance."""
        profile = self.profile(state.instance_id)
        return (
            state.num_prefill * profile.prefill_overhead_s
            + profile.prefill_s_per_token * state.prefill_tokens
            + profile.prefill_s_per_token_sq * state.prefill_pairs
        )

    def prefill_cost(
        self, state: InstanceState, request: RequestInfo
    ) -> tuple[float, float]:
        """(decode tokens that would be interfered with, predicted TTFT)."""
        own = self.profile(state.instance_id).prefill_time_s(request.prompt_tokens)
        return (float(state.decode_tokens), self.queued_prefill_s(state) + own)

    def max_batch_tokens(
        self, instance_id: int, tokens_per_seq: float | None = None
    ) -> int:
        """MT(i): the most batch tokens within the TPOT target (and KV memory),
        spreading any per-sequence cost over ``tokens_per_seq``."""
        return self.profile(instance_id).max_batch_tokens(
            self.slo.tpot_s, tokens_per_seq
        )

    def decode_cost(
        self, state: InstanceState, context_tokens: int
    ) -> tuple[float, float]:
        """(prefill tokens that would interfere, batch tokens above MT)."""
        tokens = state.decode_tokens + context_tokens
        mt = self.max_batch_tokens(state.instance_id, tokens / (state.num_decode + 1))
        return (float(state.prefill_tokens), float(tokens - mt))

    def prefill_load(self, state: InstanceState) -> float:
        """Predicted queued prefill time over the TTFT target."""
        return self.queued_prefill_s(state) / self.slo.ttft_s

    def decode_load(self, state: InstanceState) -> float:
        """The share of the TPOT target's room that decode steps use.

        A step's fixed cost is paid whatever the batch, so the room a step has
        for work is the target less that cost: the load is the observed
        inter-token latency beyond the fixed cost over that room, or batch
        tokens over MT (the same room counted in tokens), whichever is higher.
        Where the fixed cost is small next to the target this is close to
        Arrow's ITL / TPOT; where it is not, ITL / TPOT never falls below
        (fixed cost / target) and an idle decode pool would read as loaded.
        """
        overhead = self.profile(state.instance_id).decode_overhead_s
        room = self.slo.tpot_s - overhead
        busy = max(state.observed_itl_s - overhead, 0.0)
        itl = (busy / room if room > 0 else math.inf) if state.observed_itl_s else 0.0
        if state.num_decode == 0:
            return itl
        per_seq = state.decode_tokens / state.num_decode
        mt = self.max_batch_tokens(state.instance_id, per_seq)
        memory = state.decode_tokens / mt if mt > 0 else math.inf
        return max(itl, memory)

    def _fallback(
        self, candidates: Sequence[InstanceState], what: str, why: str
    ) -> Dispatch | None:
        alive = [s for s in candidates if s.alive]
        if not alive:
            return None
        # Least loaded by queued work of both kinds.
        target = min(
            alive, key=lambda s: (s.prefill_tokens + s.decode_tokens, s.instance_id)
        )
        logger.warning(
            "%s: %s falls back to instance %d (%s)",
            self.name,
            what,
            target.instance_id,
            why,
        )
        return Dispatch(target.instance_id, DispatchReason.FALLBACK)

    def _decide(self, dispatch: Dispatch | None) -> Dispatch | None:
        if dispatch is not None:
            self.counters.count(dispatch)
        return dispatch


def _pool(states: Sequence[InstanceState], role: Role) -> list[InstanceState]:
    return [s for s in states if s.alive and s.role is role]


def _by_id(states: Sequence[InstanceState], instance_id: int) -> InstanceState | None:
    return next((s for s in states if s.instance_id == instance_id), None)


def _cheapest(
    costs: Sequence[tuple[tuple[float, float], InstanceState]],
) -> tuple[tuple[float, float], InstanceState]:
    return min(costs, key=lambda c: (c[0], c[1].instance_id))


class ArrowPolicy(ServingPolicy):
    """Adaptive prefill/decode roles after Arrow (Wu et al., 2025, Algorithms 1-3)."""

    name = "arrow"

    def __init__(
        self,
        profiles: LatencyProfile | Mapping[int, LatencyProfile],
        slo: SloTargets,
        config: ArrowConfig | None = None,
    ) -> None:
        super().__init__(profiles, slo)
        self.config = config or ArrowConfig()
        self.monitor_interval_s = self.config.monitor_interval_s
        self.last_expand_s = -math.inf
        self.last_shrink_s = -math.inf
        self.num_overloaded_ticks = 0
        self.num_idle_ticks = 0

    def initial_roles(self, num_instances: int) -> list[Role]:
        if num_instances < 2:
            raise ConfigError(
                f"Arrow needs at least 2 instances (one per role), got {num_instances}"
            )
        num_prefill = round(num_instances * self.config.initial_prefill_fraction)
        num_prefill = min(max(num_prefill, 1), num_instances - 1)
        return [Role.PREFILL] * num_prefill + [Role.DECODE] * (
            num_instances - num_prefill
        )

    def pool_load(self, states: Sequence[InstanceState], role: Role) -> float:
        """Mean prefill (or decode) load over the alive instances of ``role``."""
        pool = _pool(states, role)
        if not pool:
            return 0.0
        load = self.prefill_load if role is Role.PREFILL else self.decode_load
        return sum(load(s) for s in pool) / len(pool)

    def choose_flip(
        self, states: Sequence[InstanceState], from_role: Role
    ) -> InstanceState | None:
        """Algorithm 3: the instance of ``from_role`` to flip, or None if that
        would empty the pool."""
        pool = _pool(states, from_role)
        if len(pool) <= 1:
            return None
        if from_role is Role.PREFILL:
            key = lambda s: (s.num_decode == 0, self.queued_prefill_s(s), s.instance_id)  # noqa: E731
        else:
            key = lambda s: (s.num_prefill == 0, s.decode_tokens, s.instance_id)  # noqa: E731
        return min(pool, key=key)

    def _flip(
        self, state: InstanceState, reason: FlipReason, now_s: float, why: str
    ) -> Flip:
        to_role = state.role.opposite()
        if to_role is Role.DECODE:
            self.last_expand_s = now_s
            self.num_overloaded_ticks = 0
            self.num_idle_ticks = 0
        else:
            self.last_shrink_s = now_s
        logger.info(
            "arrow: flip instance %d %s->%s at %.2f s (%s: %s)",
            state.instance_id,
            state.role.value,
            to_role.value,
            now_s,
            reason.value,
            why,
        )
        return Flip(state.instance_id, state.role, to_role, reason)

    def _cooled_down(self, now_s: float) -> bool:
        return now_s - self.last_expand_s >= self.config.cooldown_s

    def dispatch_prefill(
        self, request: RequestInfo, states: Sequence[InstanceState], now_s: float
    ) -> Dispatch | None:
        pool = _pool(states, Role.PREFILL)
        if not pool:
            return self._decide(
                self._fallback(
                    states, f"prefill of {request.request_id}", "no prefill instance"
                )
            )
        costs = [(self.prefill_cost(s, request), s) for s in pool]
        budget = self.config.ttft_margin * self.slo.ttft_s

        def flip() -> tuple[InstanceState, Flip] | None:
            decode_load = self.pool_load(states, Role.DECODE)
            if decode_load >= self.config.shrink_threshold:
                return None
            victim = self.choose_flip(states, Role.DECODE)
            if victim is None:
                return None
            return victim, self._flip(
                victim,
                FlipReason.DISPATCH_PREFILL,
                now_s,
                f"no prefill instance meets TTFT {budget:g} s "
                f"(best predicts {min(c[0][1] for c in costs):.2f} s), decode "
                f"load {decode_load:.2f} < {self.config.shrink_threshold:g}",
            )

        return self._dispatch_in_pool(
            costs, budget, flip, lambda s: self.prefill_cost(s, request)
        )

    def dispatch_decode(
        self,
        request: RequestInfo,
        prefill_instance: int,
        states: Sequence[InstanceState],
        now_s: float,
    ) -> Dispatch | None:
        context = request.prompt_tokens + 1
        origin = _by_id(states, prefill_instance)
        if origin is not None and origin.alive and origin.role is Role.DECODE:
            return self._decide(
                Dispatch(prefill_instance, DispatchReason.STAY_ON_FLIPPED)
            )
        stay = self._stay_to_avoid_handoff(origin, context)
        if stay is not None:
            return self._decide(stay)
        pool = _pool(states, Role.DECODE)
        if not pool:
            stay = [origin] if origin is not None and origin.alive else states
            return self._decide(
                self._fallback(
                    stay, f"decode of {request.request_id}", "no decode instance"
                )
            )
        costs = [(self.decode_cost(s, context), s) for s in pool]

        def flip() -> tuple[InstanceState, Flip] | None:
            if not self._cooled_down(now_s):
                return None
            victim = self.choose_flip(states, Role.PREFILL)
            if victim is None:
                return None
            return victim, self._flip(
                victim,
                FlipReason.DISPATCH_DECODE,
                now_s,
                f"no decode instance has room for {context} tokens under MT",
            )

        return self._dispatch_in_pool(
            costs, 0.0, flip, lambda s: self.decode_cost(s, context)
        )

    def _dispatch_in_pool(
        self,
        costs: list[tuple[tuple[float, float], InstanceState]],
        limit: float,
        flip: Callable[[], tuple[InstanceState, Flip] | None],
        cost_of: Callable[[InstanceState], tuple[float, float]],
    ) -> Dispatch:
        # Algorithm 1, steps 2-4, for either phase: the cheapest instance
        # whose second cost term is within ``limit``; else a flip if ``flip``
        # makes one (the flipped instance takes the request); else the
        # cheapest instance regardless.
        feasible = [c for c in costs if c[0][1] <= limit]
        if feasible:
            cost, best = _cheapest(feasible)
            return self._decide(
                Dispatch(best.instance_id, DispatchReason.FEASIBLE, cost=cost)
            )
        flipped = flip()
        if flipped is not None:
            victim, change = flipped
            return self._decide(
                Dispatch(
                    victim.instance_id, DispatchReason.FLIPPED, change, cost_of(victim)
                )
            )
        cost, best = _cheapest(costs)
        return self._decide(
            Dispatch(best.instance_id, DispatchReason.CHEAPEST, cost=cost)
        )

    def _stay_to_avoid_handoff(
        self, origin: InstanceState | None, context: int
    ) -> Dispatch | None:
        # A handoff moves the whole prompt's KV before the second token; when
        # that alone exceeds the TPOT budget of a few tokens, a short answer
        # misses its target however idle the decode pool is. Keeping the decode
        # where its KV already is avoids the stall, if the instance has room.
        limit = self.config.handoff_limit_tpot
        if limit <= 0 or origin is None or not origin.alive:
            return None
        handoff_s = self.profile(origin.instance_id).kv_transfer_time_s(context)
        if handoff_s <= limit * self.slo.tpot_s:
            return None
        # Staying shares the instance's steps with the prompts queued there:
        # until they are prefilled, each of the decode's steps carries a chunk.
        # That costs at most the queued prefill time, so stay only when it is
        # shorter than the handoff's stall, unless the local scheduler keeps
        # such steps within the TPOT target.
        if (
            not self._shared_steps_fit(origin, context)
            and self.queued_prefill_s(origin) >= handoff_s
        ):
            return None
        cost = self.decode_cost(origin, context)
        if cost[1] > 0:
            return None
        return Dispatch(
            origin.instance_id, DispatchReason.STAY_AVOIDS_HANDOFF, cost=cost
        )

    def _shared_steps_fit(self, origin: InstanceState, context: int) -> bool:
        # With a mixed-step limit within the TPOT target, the local scheduler
        # gives prompt chunks only the time left in the limit; the steps fit
        # if the fixed cost and the decodes (this one added) leave some.
        limit_s = self.mixed_step_limit_s
        if limit_s is None or limit_s > self.slo.tpot_s:
            return False
        room_s = self.profile(origin.instance_id).mixed_step_room_s(
            limit_s, origin.decode_tokens + context, origin.num_decode + 1
        )
        return room_s > 0

    def monitor(self, states: Sequence[InstanceState], now_s: float) -> list[Flip]:
        prefill_load = self.pool_load(states, Role.PREFILL)
        decode_load = self.pool_load(states, Role.DECODE)
        expand, shrink = self.config.expand_threshold, self.config.shrink_threshold
        if decode_load >= expand:
            self.num_overloaded_ticks += 1
        else:
            self.num_overloaded_ticks = 0
        overloaded = self.num_overloaded_ticks >= self.config.num_intervals
        if prefill_load <= shrink <= decode_load:
            self.num_idle_ticks += 1
        else:
            self.num_idle_ticks = 0
        # An idle prefill pool gives an instance away only when it has stayed
        # idle a while and no decode instance was flipped to prefill lately
        # (that flip answered a prefill burst the queue no longer shows).
        idle_prefill = (
            self.num_idle_ticks >= self.config.num_intervals
            and now_s - self.last_shrink_s >= self.config.cooldown_s
        )
        if not (overloaded or idle_prefill) or not self._cooled_down(now_s):
            return []
        victim = self.choose_flip(states, Role.PREFILL)
        if victim is None:
            return []
        reason = FlipReason.DECODE_OVERLOAD if overloaded else FlipReason.PREFILL_IDLE
        flip = self._flip(
            victim,
            reason,
            now_s,
            f"prefill load {prefill_load:.2f}, decode load {decode_load:.2f} "
            f"(expand {expand:g}, shrink {shrink:g})",
        )
        self.counters.num_flips += 1
        return [flip]


class StaticSplitPolicy(ServingPolicy):
    """A fixed split: the first ``num_prefill`` instances prefill, the rest decode.

    Dispatch ranks candidates by the same costs as Arrow, within a pool that
    never changes.
    """

    name = "static"

    def __init__(
        self,
        profiles: LatencyProfile | Mapping[int, LatencyProfile],
        slo: SloTargets,
        num_prefill: int,
    ) -> None:
        super().__init__(profiles, slo)
        if num_prefill < 1:
            raise ConfigError(f"num_prefill={num_prefill} must be at least 1")
        self.num_prefill = num_prefill

    def initial_roles(self, num_instances: int) -> list[Role]:
        if not 1 <= self.num_prefill < num_instances:
            raise ConfigError(
                f"a static split of {num_instances} instances needs 1 <= num_prefill "
                f"< {num_instances}, got {self.num_prefill}"
            )
        return [Role.PREFILL] * self.num_prefill + [Role.DECODE] * (
            num_instances - self.num_prefill
        )

    def dispatch_prefill(
        self, request: RequestInfo, states: Sequence[InstanceState], now_s: float
    ) -> Dispatch | None:
        pool = _pool(states, Role.PREFILL)
        if not pool:
            return self._decide(
                self._fallback(
                    states, f"prefill of {request.request_id}", "no prefill instance"
                )
            )
        costs = [(self.prefill_cost(s, request), s) for s in pool]
        feasible = [c for c in costs if c[0][1] <= self.slo.ttft_s]
        cost, best = _cheapest(feasible or costs)
        reason = DispatchReason.FEASIBLE if feasible else DispatchReason.CHEAPEST
        return self._decide(Dispatch(best.instance_id, reason, cost=cost))

    def dispatch_decode(
        self,
        request: RequestInfo,
        prefill_instance: int,
        states: Sequence[InstanceState],
        now_s: float,
    ) -> Dispatch | None:
        context = request.prompt_tokens + 1
        pool = _pool(states, Role.DECODE)
        if not pool:
            origin = _by_id(states, prefill_instance)
            stay = [origin] if origin is not None and origin.alive else states
            return self._decide(
                self._fallback(
                    stay, f"decode of {request.request_id}", "no decode instance"
                )
            )
        costs = [(self.decode_cost(s, context), s) for s in pool]
        feasible = [c for c in costs if c[0][1] <= 0]
        cost, best = _cheapest(feasible or costs)
        reason = DispatchReason.FEASIBLE if feasible else DispatchReason.CHEAPEST
        return self._decide(Dispatch(best.instance_id, reason, cost=cost))


class ColocatedPolicy(ServingPolicy):
    """Every instance runs both phases; a request never leaves its instance.

    Prefill goes to the instance with the smallest predicted TTFT, ties broken
    by fewer resident decode tokens (least interference).
    """

    name = "colocated"

    def initial_roles(self, num_instances: int) -> list[Role]:
        if num_instances < 1:
            raise ConfigError(f"need at least 1 instance, got {num_instances}")
        return [Role.MIXED] * num_instances

    def dispatch_prefill(
        self, request: RequestInfo, states: Sequence[InstanceState], now_s: float
    ) -> Dispatch | None:
        pool = [s for s in states if s.alive]
        if not pool:
            return None
        costs = []
        for s in pool:
            interference, ttft = self.prefill_cost(s, request)
            costs.append(((ttft, interference), s))
        cost, best = _cheapest(costs)
        return self._decide(
            Dispatch(best.instance_id, DispatchReason.COLOCATED, cost=cost)
        )

    def dispatch_decode(
        self,
        request: RequestInfo,
        prefill_instance: int,
        states: Sequence[InstanceState],
        now_s: float,
    ) -> Dispatch | None:
        origin = _by_id(states, prefill_instance)
        if origin is not None and origin.alive:
            return self._decide(Dispatch(prefill_instance, DispatchReason.COLOCATED))
        return self._decide(
            self._fallback(
                states, f"decode of {request.request_id}", "its instance is gone"
            )
        )


def make_policy(
    name: str,
    profiles: LatencyProfile | Mapping[int, LatencyProfile],
    slo: SloTargets,
    *,
    num_prefill: int | None = None,
    arrow: ArrowConfig | None = None,
) -> ServingPolicy:
    """Build a policy by name: ``arrow``, ``static`` (needs ``num_prefill``) or
    ``colocated``.

    Raises:
        ConfigError: an unknown name, or a static split without ``num_prefill``.
    """
    if name == "arrow":
        return ArrowPolicy(profiles, slo, arrow)
    if name == "static":
        if num_prefill is None:
            raise ConfigError("the static policy needs num_prefill (prefill instances)")
        return StaticSplitPolicy(profiles, slo, num_prefill)
    if name == "colocated":
        return ColocatedPolicy(profiles, slo)
    raise ConfigError(f"unknown policy {name!r}; choose arrow, static or colocated")
