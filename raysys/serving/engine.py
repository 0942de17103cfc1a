"""One serving engine: a model, its KV caches and the local scheduler, step by step.

The engine is plain Python over `raysys.models.llama`; the instance actor
(`raysys.serving.instance`) wraps it and the simulator mirrors it. Each call of
`Engine.step` runs one step of the local scheduler (`raysys.serving.batching`):
a batched prefill forward over this step's prompt chunks, then one batched
decode forward over the decoding sequences (each at its own position), with
greedy sampling.

A request's life on an engine::

    add_prefill -> QUEUED -> PREFILLING (chunks) -> first token -> AWAITING
    AWAITING --continue_here--> DECODING -> finished
    AWAITING --export--> (KV copied out) --release--> gone
    accept (KV copied in) -> INCOMING -> DECODING -> finished

After its prefill a request waits (AWAITING) until whoever placed it decides
where it decodes: here, or on another engine that `accept`s an exported copy of
its KV. The copy stays here until `release`, so a failed handoff can be retried.
KV memory is reserved for a request's prompt plus its most new tokens when its
prefill starts (or when an accepted copy is admitted) and freed when it
finishes, is released or is cancelled.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from raysys.models.llama import KVCache, KVState, Transformer, decode_step
from raysys.models.tokenizer import check_token_ids
from raysys.runtime.config import is_whole_number
from raysys.runtime.errors import ConfigError, RaysysError
from raysys.serving.batching import EngineConfig, MixedStepBudget, plan_prefill
from raysys.serving.policy import InstanceState, Role
from raysys.serving.profile import LatencyProfile

logger = logging.getLogger(__name__)


class Phase(str, enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    AWAITING = "awaiting"  # prefilled; waiting to be told where it decodes
    INCOMING = "incoming"  # accepted from another engine; waiting for KV room
    READY = "ready"  # KV here; waiting for a decode batch slot
    DECODING = "decoding"


class EngineError(RaysysError):
    """A request the engine cannot take (too long, unknown id, duplicate)."""


@dataclass
class Seq:
    """One request on an engine."""

    request_id: int
    prompt: list[int]
    max_new_tokens: int
    ignore_eos: bool
    phase: Phase
    output: list[int] = field(default_factory=list)
    cache: KVCache | None = None
    num_prefilled: int = 0
    admitted: bool = False  # KV reserved here

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.num_prefilled

    @property
    def done(self) -> int:
        return self.num_prefilled

    @property
    def kv_tokens(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    @property
    def context_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass(frozen=True)
class FirstToken:
    """A prompt is prefilled; its first output token is ``token``."""

    request_id: int
    token: int
    time_s: float


@dataclass(frozen=True)
class Finished:
    """A request finished generating (or failed, with ``error``)."""

    request_id: int
    output: tuple[int, ...]
    time_s: float
    error: str = ""


EngineEvent = FirstToken | Finished


@dataclass(frozen=True)
class Handoff:
    """A prefilled request's KV and what its decode needs, for another engine."""

    request_id: int
    prompt: tuple[int, ...]
    output: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool
    kv: KVState


@dataclass(frozen=True)
class EngineLoad:
    """Counters an engine reports; `state` turns them into a policy snapshot."""

    num_prefill: int
    prefill_tokens: int
    prefill_pairs: float
    num_decode: int
    decode_tokens: int
    observed_itl_s: float
    kv_used_tokens: int
    kv_capacity_tokens: int
    num_awaiting: int
    num_steps: int

    def state(self, instance_id: int, role: Role, alive: bool = True) -> InstanceState:
        return InstanceState(
            instance_id=instance_id,
            role=role,
            num_prefill=self.num_prefill,
            prefill_tokens=self.prefill_tokens,
            prefill_pairs=self.prefill_pairs,
            num_decode=self.num_decode,
            decode_tokens=self.decode_tokens,
            observed_itl_s=self.observed_itl_s,
            alive=alive,
        )


class Engine:
    """Continuous batching with chunked prefill over one model.

    Args:
        model: the decoder (weights on the device the engine runs on).
        config: the local scheduler's knobs.
        kv_capacity_tokens: KV tokens the engine may hold at once.
        stop_ids: token ids that end a request (unless it ignores them).
        clock: time source for event timestamps.
        profile: the engine's latency profile; needed (and only used) when
            ``config.mixed_step_limit_s`` cuts prompt chunks to fit a step time.
    """

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig | None = None,
        *,
        kv_capacity_tokens: int = 65536,
        stop_ids: Sequence[int] = (),
        clock=time.monotonic,
        profile: LatencyProfile | None = None,
    ) -> None:
        if kv_capacity_tokens < 1:
            raise ConfigError(f"kv_capacity_tokens={kv_capacity_tokens} must be >= 1")
        self.model = model
        self.config = config or EngineConfig()
        if self.config.mixed_step_limit_s is not None and profile is None:
            raise ConfigError(
                f"mixed_step_limit_s={self.config.mixed_step_limit_s} needs the "
                "engine's latency profile (measure_profile or a profile file)"
            )
        self.profile = profile
        self.kv_capacity_tokens = kv_capacity_tokens
        self.stop_ids = frozenset(stop_ids)
        self.clock = clock
        self.max_positions = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.seqs: dict[int, Seq] = {}
        self.prefill_queue: deque[Seq] = deque()  # QUEUED and PREFILLING
        self.incoming: deque[Seq] = deque()
        self.ready: deque[Seq] = deque()
        self.running: list[Seq] = []
        # TODO: KV is accounted in tokens over per-sequence caches, not a paged
        # block pool, so fragmentation and block rounding are not modelled.
        self.kv_used_tokens = 0
        self.itl_s = 0.0
        self.num_steps = 0
        self.last_step_s = 0.0

    # -- requests in ---------------------------------------------------------------

    def _check_new(self, request_id: int, num_tokens: int, max_new_tokens: int) -> None:
        if request_id in self.seqs:
            raise EngineError(f"request {request_id} is already on this engine")
        if not is_whole_number(max_new_tokens) or max_new_tokens < 1:
            raise EngineError(
                f"request {request_id}: max_new_tokens={max_new_tokens!r} must be a "
                "whole number >= 1"
            )
        # The last token generated is never fed back, so it takes no position.
        positions = num_tokens + max_new_tokens - 1
        if positions > self.max_positions:
            raise EngineError(
                f"request {request_id} needs {positions} positions, beyond the model's "
                f"{self.max_positions}; clip its prompt or max_new_tokens"
            )
        total = num_tokens + max_new_tokens
        if total > self.kv_capacity_tokens:
            raise EngineError(
                f"request {request_id} needs {total} KV tokens, more than this "
                f"engine's capacity {self.kv_capacity_tokens}"
            )

    def add_prefill(
        self,
        request_id: int,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        ignore_eos: bool = False,
    ) -> None:
        """Queue a prompt for prefill.

        Raises:
            EngineError: the id is taken, the prompt is empty or too long.
        """
        try:
            tokens = check_token_ids(prompt, self.vocab_size)
        except ValueError as e:
            raise EngineError(f"request {request_id}: {e}") from e
        self._check_new(request_id, len(tokens), max_new_tokens)
        seq = Seq(request_id, tokens, int(max_new_tokens), ignore_eos, Phase.QUEUED)
        self.seqs[request_id] = seq
        self.prefill_queue.append(seq)

    def continue_here(self, request_id: int) -> None:
        """Decode an AWAITING request on this engine."""
        seq = self._get(request_id, Phase.AWAITING)
        seq.phase = Phase.READY
        self.ready.append(seq)

    def export(self, request_id: int) -> Handoff:
        """A copy of an AWAITING request's KV and state; the original stays here."""
        seq = self._get(request_id, Phase.AWAITING)
        return Handoff(
            request_id=seq.request_id,
            prompt=tuple(seq.prompt),
            output=tuple(seq.output),
            max_new_tokens=seq.max_new_tokens,
            ignore_eos=seq.ignore_eos,
            kv=seq.cache.export(),
        )

    def accept(self, handoff: Handoff) -> None:
        """Take over the decode of a request prefilled elsewhere.

        Raises:
            EngineError: the id is taken, or the KV does not match the prompt.
        """
        self._check_new(handoff.request_id, len(handoff.prompt), handoff.max_new_tokens)
        if handoff.kv.num_tokens != len(handoff.prompt) + len(handoff.output) - 1:
            raise EngineError(
                f"request {handoff.request_id}: handed-over KV holds "
                f"{handoff.kv.num_tokens} tokens, expected "
                f"{len(handoff.prompt) + len(handoff.output) - 1}"
            )
        seq = Seq(
            handoff.request_id,
            list(handoff.prompt),
            handoff.max_new_tokens,
            handoff.ignore_eos,
            Phase.INCOMING,
            output=list(handoff.output),
            num_prefilled=len(handoff.prompt),
        )
        seq.cache = self.model.import_cache(handoff.kv)
        self.seqs[seq.request_id] = seq
        self.incoming.append(seq)

    def release(self, request_id: int) -> None:
        """Forget a request whose KV was handed over (no-op if unknown)."""
        self.cancel(request_id)

    def cancel(self, request_id: int) -> bool:
        """Drop a request wherever it is and free its KV; False if unknown."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        for queue in (self.prefill_queue, self.incoming, self.ready):
            if seq in queue:
                queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._free(seq)
        return True

    def _get(self, request_id: int, phase: Phase) -> Seq:
        seq = self.seqs.get(request_id)
        if seq is None:
            raise EngineError(f"request {request_id} is not on this engine")
        if seq.phase is not phase:
            raise EngineError(
                f"request {request_id} is {seq.phase.value}, expected {phase.value}"
            )
        return seq

    def _free(self, seq: Seq) -> None:
        if seq.admitted:
            self.kv_used_tokens -= seq.kv_tokens
            seq.admitted = False
        seq.cache = None

    # -- the step ------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.prefill_queue or self.incoming or self.ready or self.running)

    def step(self) -> list[EngineEvent]:
        """Run one step; return the first tokens and finished requests it produced."""
        start = self.clock()
        events: list[EngineEvent] = []

        # 1. accepted requests with KV room, then ready ones, join the batch.
        while self.incoming:
            seq = self.incoming[0]
            if self.kv_used_tokens + seq.kv_tokens > self.kv_capacity_tokens:
                break
            self.incoming.popleft()
            self.kv_used_tokens += seq.kv_tokens
            seq.admitted = True
            seq.phase = Phase.READY
            self.ready.append(seq)
        while self.ready and len(self.running) < self.config.max_num_seqs:
            seq = self.ready.popleft()
            seq.phase = Phase.DECODING
            self.running.append(seq)

        # 2. prompt chunks fill the rest of the token budget.
        free = self.kv_capacity_tokens - self.kv_used_tokens
        budget = MixedStepBudget.for_step(
            self.config,
            self.profile,
            sum(s.context_tokens for s in self.running),
            len(self.running),
        )
        chunks = plan_prefill(
            self.prefill_queue, len(self.running), free, self.config, budget
        )
        decoding = list(self.running)
        if chunks:
            events += self._prefill(chunks)
        if decoding:
            events += self._decode(decoding)

        duration = self.clock() - start
        self.num_steps += 1
        self.last_step_s = duration
        if decoding:
            w = self.config.itl_smoothing
            self.itl_s = (
                duration if self.itl_s == 0 else w * duration + (1 - w) * self.itl_s
            )
        if not self.running:
            self.itl_s = 0.0
        return events

    def _prefill(self, chunks: list[tuple[Seq, int]]) -> list[EngineEvent]:
        for seq, _ in chunks:
            if not seq.admitted:
                self.kv_used_tokens += seq.kv_tokens
                seq.admitted = True
                seq.phase = Phase.PREFILLING
                seq.cache = self.model.new_cache()
        width = max(n for _, n in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)  # (B, T)
        for b, (seq, n) in enumerate(chunks):
            begin = seq.num_prefilled
            tokens[b, :n] = torch.tensor(seq.prompt[begin : begin + n])
        with torch.no_grad():
            logits = self.model(
                tokens.to(self.model.device),
                [seq.cache for seq, _ in chunks],
                [n for _, n in chunks],
                last_only=True,
            )  # (B, V)
        events: list[EngineEvent] = []
        now = self.clock()
        for b, (seq, n) in enumerate(chunks):
            seq.num_prefilled += n
            if seq.remaining:
                continue
            self.prefill_queue.remove(seq)
            token = int(logits[b].argmax())
            seq.output.append(token)
            events.append(FirstToken(seq.request_id, token, now))
            if self._done(seq, token):
                events.append(self._finish(seq, now))
            else:
                seq.phase = Phase.AWAITING
        return events

    def _decode(self, batch: list[Seq]) -> list[EngineEvent]:
        tokens = torch.tensor([seq.output[-1] for seq in batch], dtype=torch.long)
        logits = decode_step(
            self.model, tokens.to(self.model.device), [seq.cache for seq in batch]
        )  # (B, V)
        chosen = logits.argmax(dim=-1).tolist()
        events: list[EngineEvent] = []
        now = self.clock()
        for seq, token in zip(batch, chosen, strict=True):
            seq.output.append(int(token))
            if self._done(seq, int(token)):
                self.running.remove(seq)
                events.append(self._finish(seq, now))
        return events

    def _done(self, seq: Seq, token: int) -> bool:
        if len(seq.output) >= seq.max_new_tokens:
            return True
        return not seq.ignore_eos and token in self.stop_ids

    def _finish(self, seq: Seq, now: float) -> Finished:
        del self.seqs[seq.request_id]
        self._free(seq)
        return Finished(seq.request_id, tuple(seq.output), now)

    # -- reporting -----------------------------------------------------------------

    def load(self) -> EngineLoad:
        """Counters for the policies (see `raysys.serving.policy.InstanceState`)."""
        pairs = 0.0
        prefill_tokens = 0
        for seq in self.prefill_queue:
            end, done = float(len(seq.prompt)), float(seq.num_prefilled)
            pairs += end * end - done * done
            prefill_tokens += seq.remaining
        decoding = [*self.running, *self.ready, *self.incoming]
        return EngineLoad(
            num_prefill=len(self.prefill_queue),
            prefill_tokens=prefill_tokens,
            prefill_pairs=pairs,
            num_decode=len(decoding),
            decode_tokens=sum(s.context_tokens for s in decoding),
            observed_itl_s=self.itl_s,
            kv_used_tokens=self.kv_used_tokens,
            kv_capacity_tokens=self.kv_capacity_tokens,
            num_awaiting=sum(s.phase is Phase.AWAITING for s in self.seqs.values()),
            num_steps=self.num_steps,
        )

    def holds(self) -> dict[int, str]:
        """Request id -> phase of every request on the engine."""
        return {rid: seq.phase.value for rid, seq in self.seqs.items()}


def kv_bytes_per_token(model: Transformer) -> int:
    """Bytes of KV cache one token takes in ``model``."""
    c = model.config
    element = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element


def measure_profile(
    model: Transformer,
    config: EngineConfig | None = None,
    *,
    prompt_lengths: Sequence[int] = (16, 64, 128, 256, 384),
    batch_sizes: Sequence[int] = (1, 4, 8, 16),
    context_tokens: Sequence[int] = (32, 128, 256),
    num_decode_steps: int = 4,
    kv_capacity_tokens: int = 65536,
    kv_transfer_bytes_per_s: float = 1e9,
    name: str = "measured",
    clock: Callable[[], float] = time.perf_counter,
):
    """Fit a `LatencyProfile` by timing this engine's own steps on ``model``.

    Prefill samples are whole prompts of ``prompt_lengths`` (within the model's
    context and the step budget); decode samples are steps over
    ``batch_sizes`` sequences of ``context_tokens`` each (median of
    ``num_decode_steps``). ``clock`` is the timer the steps are measured with,
    in seconds.
    """
    from raysys.serving.profile import fit_profile

    limit = min(
        model.config.max_position_embeddings - num_decode_steps - 2,
        (config or EngineConfig()).max_step_tokens,
    )
    lengths = sorted({min(n, limit) for n in prompt_lengths if n >= 1})
    if len(lengths) < 3:
        # A small step budget or context folds the lengths into one or two;
        # the quadratic fit needs three.
        lengths = sorted({max(1, round(limit * f)) for f in (0.25, 0.5, 1.0)})
    contexts = sorted({min(n, limit) for n in context_tokens if n >= 1})
    # Steps are timed whole: a mixed-step time limit would cut the prompts.
    engine_config = (config or EngineConfig()).model_copy(
        update={"mixed_step_limit_s": None}
    )
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    # Warm up (first calls allocate).
    warm = Engine(model, engine_config, kv_capacity_tokens=kv_capacity_tokens)
    warm.add_prefill(-1, prompt(lengths[0]), 2, ignore_eos=True)
    while warm.has_work:
        for event in warm.step():
            if isinstance(event, FirstToken):
                warm.continue_here(event.request_id)

    prefill_samples = []
    for n in lengths:
        times = []
        for _ in range(3):
            engine = Engine(model, engine_config, kv_capacity_tokens=kv_capacity_tokens)
            engine.add_prefill(0, prompt(n), 2, ignore_eos=True)
            begin = clock()
            engine.step()
            times.append(clock() - begin)
        prefill_samples.append((n, sorted(times)[1]))

    decode_samples = []
    for batch in batch_sizes:
        for context in contexts:
            engine = Engine(
                model,
                engine_config.model_copy(update={"max_num_seqs": max(batch, 1)}),
                kv_capacity_tokens=kv_capacity_tokens,
            )
            # Prompts that need several chunked steps: the first ones decode
            # while the rest prefill, so their budget covers those steps too
            # (within the context) and every sample records the sequences
            # that really decoded.
            setup_steps = -(-batch * context // engine_config.max_step_tokens) + 1
            new_tokens = min(
                num_decode_steps + 2 + setup_steps,
                model.config.max_position_embeddings - context,
            )
            for i in range(batch):
                engine.add_prefill(i, prompt(context), new_tokens, ignore_eos=True)
            while engine.prefill_queue:
                for event in engine.step():
                    if isinstance(event, FirstToken):
                        engine.continue_here(event.request_id)
            times = []
            for _ in range(num_decode_steps):
                load = engine.load()
                if not load.num_decode:
                    break
                begin = clock()
                engine.step()
                times.append((load.decode_tokens, load.num_decode, clock() - begin))
            if times:
                times.sort(key=lambda t: t[2])
                decode_samples.append(times[len(times) // 2])

    return fit_profile(
        prefill_samples,
        decode_samples,
        name=name,
        kv_capacity_tokens=kv_capacity_tokens,
        kv_bytes_per_token=kv_bytes_per_token(model),
        kv_transfer_bytes_per_s=kv_transfer_bytes_per_s,
        notes=(
            f"measured on {model.device} with {torch.get_num_threads()} threads: "
            f"prefill of {lengths} tokens, decode of {list(batch_sizes)} sequences "
            f"x {contexts} tokens"
        ),
    )
