"""The SP-MoE engine: expert hosts, bounded cache, draft, predictor, verifier.

Build it from a `MoEEngineConfig`, generate for a list of prompts, read the
`raysys.moe.reports.GenerationReport`::

    from raysys.moe.engine import MoEEngine, MoEEngineConfig

    with MoEEngine(MoEEngineConfig(mode="sd-prefetch", cache_experts=8)) as engine:
        report = engine.generate(["def fibonacci(n):\\n"], max_new_tokens=64)
    print(report.tpot_ms, report.outputs[0].text)

Three modes share every part but the decoding loop:

- ``ar``: the target alone, one token per forward, experts fetched on demand
  into an LRU cache (the offloading baseline);
- ``sd``: speculative decoding, experts fetched on demand when verification
  reaches a layer;
- ``sd-prefetch``: speculative decoding whose draft predicts each layer's
  experts up to the cutoff and prefetches them while drafting (SP-MoE).

The target's non-expert weights (embeddings, attention, norms, routers) are
resident; its experts come only from the expert hosts, through the cache.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from raysys.models.hf import load_model
from raysys.models.llama import DTYPES, Transformer
from raysys.models.mixtral import Mixtral
from raysys.models.tokenizer import ByteTokenizer, check_token_ids
from raysys.moe.cache import CacheStats, EvictionPolicy, ExpertCache
from raysys.moe.fetcher import ExpertFetcher, FetchStats, TransferLink
from raysys.moe.host import ExpertFetchError, ExpertHostPool
from raysys.moe.policy import CutoffDecision, CutoffPolicy, RoundProfile
from raysys.moe.predictor import ExpertPredictor, LayerScore, PredictionScore
from raysys.moe.prompts import BUILTIN_PROMPTS
from raysys.moe.reports import FailedPrompt, GenerationReport, SequenceOutput
from raysys.moe.speculative import (
    DecodeHooks,
    GenerationTrace,
    SamplingParams,
    generate_autoregressive,
    generate_speculative,
)
from raysys.moe.store import ExpertCheckpointStore
from raysys.runtime import Config, ConfigError, init_ray
from raysys.runtime.config import is_whole_number
from raysys.runtime.errors import RaysysError

logger = logging.getLogger(__name__)

PRETRAINED = Path(__file__).resolve().parent / "pretrained"
Mode = Literal["ar", "sd", "sd-prefetch"]
MODES: tuple[str, ...] = ("ar", "sd", "sd-prefetch")

# The modelled link: one stored expert of the bundled pair (73,728 bytes) takes
# about 2.9 ms, about five layers of verification compute on a CPU core and
# above the real Ray call's 1.2 to 1.6 ms; see docs/moe.md for the derivation
# and how to change it.
DEFAULT_LINK_BANDWIDTH = 25e6


class MoEEngineConfig(Config):
    """How to build an SP-MoE engine."""

    target_dir: str = Field(
        str(PRETRAINED / "target"), description="Mixtral checkpoint folder (HF format)"
    )
    draft_dir: str = Field(
        str(PRETRAINED / "draft"),
        description="dense draft checkpoint folder, same hidden size and layers",
    )
    expert_store: str | None = Field(
        None,
        description="checkpoint store the expert hosts load experts from: a folder "
        "or pyarrow.fs URI (default: target_dir)",
    )
    num_hosts: int = Field(2, ge=1, description="expert host actors")
    cache_experts: int | None = Field(
        None, ge=1, description="cache capacity in experts (default: a quarter)"
    )
    cache_bytes: int | None = Field(
        None, gt=0, description="cache capacity in bytes (instead of cache_experts)"
    )
    cache_policy: EvictionPolicy = Field(
        "lru",
        description="eviction: lru (whole cache), layer-lru (even slots per layer, "
        "as mixtral-offloading), or layer-cyclic (furthest layer first)",
    )
    link_bandwidth_bytes_per_s: float = Field(
        DEFAULT_LINK_BANDWIDTH,
        ge=0,
        description="modelled host-to-accelerator bandwidth; 0: no modelled link",
    )
    mode: Mode = Field("sd-prefetch", description="ar, sd or sd-prefetch")
    draft_length: int = Field(4, ge=1, le=16, description="tokens drafted per round")
    cutoff: Literal["auto"] | int = Field(
        "auto", description="layers prefetched while drafting, or auto"
    )
    temperature: float = Field(0.0, ge=0, description="0: greedy; > 0: sampling")
    seed: int = Field(0, description="sampling seed (prompt i uses seed + i)")
    stop_at_eos: bool = Field(True, description="end a sequence at the EOS token")
    fetch_timeout_s: float = Field(
        60.0, gt=0, description="bound on waiting for one layer's experts"
    )
    num_threads: int = Field(1, ge=1, description="torch CPU threads")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype (weights are converted on load/fetch)"
    )
    calibration_tokens: int = Field(
        48, ge=8, description="tokens generated to measure costs for cutoff=auto"
    )
    predict_last_draft: bool = Field(
        False,
        description="sd-prefetch: also run the draft on its last drafted token, so "
        "the experts of every verified token are predicted",
    )
    score_all_layers: bool = Field(
        False,
        description="sd-prefetch: predict (and score) layers beyond the cutoff too",
    )
    warm_cache: bool = Field(
        False, description="keep the cache between prompts (default: start cold)"
    )

    @field_validator("cutoff", mode="before")
    @classmethod
    def _parse_cutoff(cls, value):
        if isinstance(value, str) and value != "auto":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(
                    f"cutoff must be 'auto' or a layer count, got {value!r}"
                ) from None
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"cutoff must be >= 0 or 'auto', got {value}")
        return value

    @classmethod
    def of(cls, config: MoEEngineConfig) -> MoEEngineConfig:
        """The engine fields of a config that extends this one (a job's config)."""
        return cls(**config.model_dump(include=set(cls.model_fields)))

    @model_validator(mode="after")
    def _check(self) -> MoEEngineConfig:
        if self.cache_experts is not None and self.cache_bytes is not None:
            raise ValueError("give cache_experts or cache_bytes, not both")
        return self


@dataclass
class SequenceRun:
    """One prompt's trace and the counters gathered while decoding it."""

    prompt: str
    trace: GenerationTrace
    fetch: FetchStats
    cache: CacheStats
    prefill_fetch: FetchStats
    score: PredictionScore | None
    needed: list[float]  # summed distinct routed experts per layer, verify passes
    missing: list[float]  # summed demand fetches per layer, verify passes
    predicted: list[float]  # summed predicted experts per layer
    num_verify_passes: int
    pass_experts: list[int]  # distinct routed experts (all layers), decoding passes
    held_needed: list[int]  # of those, held in the cache when the pass's round began
    prompt_tokens: int = 0  # tokens of the prompt as given
    clipped_tokens: int = 0  # leading prompt tokens dropped to fit the context


class _EngineHooks(DecodeHooks):
    """Connects the decoding loop to the fetcher and the predictor."""

    def __init__(self, engine: MoEEngine, predictor: ExpertPredictor | None) -> None:
        num_layers = engine.num_layers
        self.engine = engine
        self.fetcher = engine.fetcher
        self.predictor = predictor
        self.prefill_fetch = FetchStats()
        self.needed = [0.0] * num_layers
        self.missing = [0.0] * num_layers
        self.predicted = [0.0] * num_layers
        self.num_verify_passes = 0
        self.pass_experts: list[int] = []
        self.held_needed: list[int] = []
        self._held: set[tuple[int, int]] = set()
        self._demand_before: Counter[int] = Counter()

    def target_pass_done(self, kind: str) -> None:
        self.fetcher.end_pass()
        if kind != "prefill":
            routed = {
                (layer, int(e))
                for layer, r in enumerate(self.engine.target.last_routing())
                if r is not None
                for e in r.expert_ids.unique().tolist()
            }
            self.pass_experts.append(len(routed))
            self.held_needed.append(len(routed & self._held))
        # Nothing is fetched between a pass's end and the next round's start (a
        # prefetch needs the draft), so this is what the next round starts with.
        with self.fetcher.lock:
            self._held = set(self.fetcher.cache.entries)
        self.engine.num_target_passes += 1
        if self.engine.on_target_pass is not None:
            self.engine.on_target_pass(self.engine.num_target_passes, kind)
        if kind == "prefill":
            self.prefill_fetch, _ = self.fetcher.take_stats()
        elif kind == "verify":
            after = self.fetcher.stats.demand_by_layer
            for layer in range(len(self.missing)):
                self.missing[layer] += after[layer] - self._demand_before[layer]

    def round_started(self) -> None:
        self._demand_before = Counter(self.fetcher.stats.demand_by_layer)
        if self.predictor is not None:
            self.predictor.begin_round()

    def draft_hook(self, skip_rows: int):
        if self.predictor is None:
            return None
        self.predictor.skip_rows = skip_rows
        return self.predictor.observe

    def round_verified(self, routings) -> None:
        self.num_verify_passes += 1
        for layer, routing in enumerate(routings):
            self.needed[layer] += len(routing.expert_ids.unique())
            if self.predictor is not None:
                self.predicted[layer] += len(self.predictor.predicted(layer).unique())
        if self.predictor is not None:
            self.predictor.score_round(routings)


class EngineClosed(RaysysError):
    """The engine was closed: its hosts and fetch thread are gone."""


class MoEEngine:
    """Speculative MoE inference with expert prefetching over Ray expert hosts.

    Follows SP-MoE (Chen et al., 2025): a structurally matched dense draft, a
    cross-model expert predictor (draft attention output -> target router), a
    cutoff layer chosen from measured costs, prefetching during drafting, and a
    bounded expert cache next to the compute.

    Raises:
        ConfigError: missing checkpoints, a draft that does not match the
            target, or a cutoff beyond the layer count.
    """

    def __init__(self, config: MoEEngineConfig) -> None:
        self.config = config
        self.closed = False
        torch.set_num_threads(config.num_threads)
        self.tokenizer = ByteTokenizer()
        self.draft, self.target = self._load_pair(config)
        c = self.target.config
        self.num_layers = c.num_hidden_layers
        self.num_experts_total = c.num_hidden_layers * c.num_local_experts
        store_uri = config.expert_store or str(Path(config.target_dir).resolve())
        store = ExpertCheckpointStore(store_uri)
        for name in (
            "num_hidden_layers",
            "num_local_experts",
            "hidden_size",
            "intermediate_size",
        ):
            if getattr(store.config, name) != getattr(c, name):
                raise ConfigError(
                    f"expert store {store_uri!r} has {name} "
                    f"{getattr(store.config, name)}, the target's is {getattr(c, name)}; "
                    "point expert_store at the target's own checkpoint"
                )
        self.expert_nbytes = store.expert_nbytes
        positions = c.max_position_embeddings
        if config.calibration_tokens >= positions:  # cutoff=auto, now or later
            raise ConfigError(
                f"calibration_tokens {config.calibration_tokens} leaves no room "
                f"for a prompt in the target's {positions} positions; give at "
                f"most {positions - 1}"
            )
        self.capacity = cache_capacity(
            config, self.expert_nbytes, self.num_experts_total
        )
        if isinstance(config.cutoff, int):
            self._check_cutoff(config.cutoff)
        if config.cache_policy == "layer-lru" and self.capacity < self.num_layers:
            raise ConfigError(
                f"cache_policy layer-lru needs a slot per layer: cache of "
                f"{self.capacity} experts < {self.num_layers} layers; give at least "
                f"{self.num_layers} experts or another policy"
            )
        init_ray()  # after every check that needs no cluster
        self.pool = ExpertHostPool(
            store_uri,
            c,
            config.num_hosts,
            timeout_s=config.fetch_timeout_s,
            dtype=self.target.dtype,
        )
        self.link = TransferLink(config.link_bandwidth_bytes_per_s)
        try:
            self.fetcher = ExpertFetcher(
                self.pool.fetch,
                ExpertCache(self.capacity, config.cache_policy, self.num_layers),
                self.expert_nbytes,
                self.link,
                timeout_s=config.fetch_timeout_s,
            )
        except BaseException:
            self.pool.close()
            raise
        self.target.set_expert_source(self.fetcher)
        self.policy = CutoffPolicy()
        self.mode: str = config.mode
        self.draft_length = config.draft_length
        self.cutoff: int | None = None
        self.decision: CutoffDecision | None = None
        self.profile: RoundProfile | None = None
        # Called after every target forward with (count so far, kind); a place
        # for progress reporting or, in tests, fault injection.
        self.on_target_pass: Callable[[int, str], None] | None = None
        self.num_target_passes = 0
        self._calibrating = False
        if config.mode == "sd-prefetch":
            try:
                self.set_mode("sd-prefetch", config.cutoff)
            except BaseException:
                self.close()
                raise
        logger.info(
            "engine ready: %d layers x %d experts (%d bytes each), cache %d experts, "
            "%d hosts, link %s, mode %s",
            self.num_layers,
            c.num_local_experts,
            self.expert_nbytes,
            self.capacity,
            config.num_hosts,
            f"{config.link_bandwidth_bytes_per_s / 1e6:g} MB/s"
            if config.link_bandwidth_bytes_per_s
            else "not modelled",
            self.mode,
        )

    @classmethod
    def from_config(cls, config: MoEEngineConfig | dict) -> MoEEngine:
        """An engine from a config or a mapping of its fields."""
        if not isinstance(config, MoEEngineConfig):
            from raysys.runtime import validate_config

            config = validate_config(MoEEngineConfig, dict(config))
        return cls(config)

    # ------------------------------------------------------------------ build

    @staticmethod
    def _load_pair(config: MoEEngineConfig) -> tuple[Transformer, Mixtral]:
        for name in ("target_dir", "draft_dir"):
            path = Path(getattr(config, name))
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"{name} {str(path)!r} is not a checkpoint folder (no config.json); "
                    "build the bundled pair with `python jobs/moe_train.py`"
                )
        dtype = DTYPES[config.dtype]
        target = load_model(config.target_dir, dtype=dtype, resident_experts=False)
        draft = load_model(config.draft_dir, dtype=dtype)
        if not isinstance(target, Mixtral):
            raise ConfigError(
                f"target_dir {config.target_dir!r} holds a "
                f"{target.config.model_type} model; the target must be a Mixtral"
            )
        t, d = target.config, draft.config
        for field_name in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if getattr(t, field_name) != getattr(d, field_name):
                raise ConfigError(
                    f"draft {field_name} {getattr(d, field_name)} differs from the "
                    f"target's {getattr(t, field_name)}; the expert predictor needs a "
                    "structurally matched draft (same hidden size and layer count)"
                )
        return draft, target

    # ------------------------------------------------------------------ modes

    def set_mode(
        self,
        mode: str,
        cutoff: Literal["auto"] | int | None = None,
        draft_length: int | None = None,
    ) -> None:
        """Switch decoding mode (and for sd-prefetch the cutoff; auto calibrates).

        Raises:
            ConfigError: unknown mode, a cutoff beyond the layer count or a
                draft length outside [1, 16]; the engine is then unchanged.
        """
        self._check_open()
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if draft_length is not None:
            _check_draft_length(draft_length)
        if mode == "sd-prefetch":
            cutoff = self.config.cutoff if cutoff is None else cutoff
            if cutoff != "auto":
                self._check_cutoff(cutoff)
        # Every value is checked above: a refused call leaves the engine as it was.
        if draft_length is not None:
            self.draft_length = int(draft_length)
        if mode != "sd-prefetch":
            self.mode = mode
            self.cutoff = None
            return
        if cutoff == "auto":
            self.mode = mode
            self.calibrate()
            return
        self.mode = mode
        self.cutoff = cutoff

    def _check_cutoff(self, cutoff: object) -> None:
        if (
            not isinstance(cutoff, int)
            or isinstance(cutoff, bool)
            or not 0 <= cutoff <= self.num_layers
        ):
            raise ConfigError(
                f"cutoff {cutoff!r} is outside [0, {self.num_layers}] (the target has "
                f"{self.num_layers} layers); give a layer count or 'auto'"
            )

    def calibrate(self, prompt: str | None = None) -> CutoffDecision:
        """Measure this engine's costs on one prompt and let the policy pick the cutoff.

        The measuring run drafts as sd-prefetch does and scores the predictor on
        every layer, but prefetches nothing (so it also measures what on-demand
        fetching misses).
        """
        self._check_open()
        mode, self.mode = self.mode, "sd-prefetch"
        self.cutoff = 0
        self._calibrating = True
        try:
            run = self.run_sequence(
                prompt or BUILTIN_PROMPTS[0], self.config.calibration_tokens, seed=0
            )
        finally:
            self._calibrating = False
        self.mode = mode
        self.fetcher.reset()
        self.profile = self.profile_from(run)
        self.decision = self.policy.decide(self.profile)
        self.cutoff = self.decision.cutoff
        logger.info("prefetch cutoff %d chosen: %s", self.cutoff, self.decision.reason)
        return self.decision

    def profile_from(self, run: SequenceRun) -> RoundProfile:
        """The policy's view of a measured sd-prefetch run."""
        trace, L = run.trace, self.num_layers
        passes = max(1, run.num_verify_passes)
        draft_token_ms = 1e3 * trace.draft_s / max(1, trace.num_draft_forwards)
        verify_ms = 1e3 * max(0.0, trace.verify_s - run.fetch.stall_s) / passes
        fetch_ms = (
            1e3 * statistics.mean(run.fetch.fetch_s)
            if run.fetch.fetch_s
            else 1e3 * self.link.transfer_s(self.expert_nbytes)
        )
        score = run.score or PredictionScore([LayerScore() for _ in range(L)])
        return RoundProfile(
            num_draft_tokens=self.draft_length + int(self.config.predict_last_draft),
            draft_layer_ms=[draft_token_ms / L] * L,
            verify_layer_ms=[verify_ms / L] * L,
            fetch_ms=fetch_ms,
            needed=[n / passes for n in run.needed],
            missing=[m / passes for m in run.missing],
            predicted=[p / passes for p in run.predicted],
            recall=[r if r is not None else 0.0 for r in score.per_layer("recall")],
            capacity=self.capacity,
        )

    # ------------------------------------------------------------- generation

    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a sequence."""
        return (
            tuple(self.target.config.stop_token_ids) if self.config.stop_at_eos else ()
        )

    def run_sequence(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        *,
        seed: int,
        stop_ids: Sequence[int] | None = None,
    ) -> SequenceRun:
        """Generate for one prompt (text or ids) in the current mode; `report` sums runs.

        Raises:
            ConfigError: a budget outside [1, max positions - 1], or token ids
                that are empty or outside the vocabulary.
        """
        self._check_budget(max_new_tokens)
        ids = self._check_ids(
            self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        )
        if stop_ids is not None:
            stop_ids = self._check_stop_ids(stop_ids)
        limit = self.target.config.max_position_embeddings - max_new_tokens
        prompt_tokens = len(ids)
        if len(ids) > limit:
            logger.info(
                "prompt of %d tokens clipped to its last %d (max positions %d)",
                len(ids),
                limit,
                self.target.config.max_position_embeddings,
            )
            ids = ids[-limit:]
        if not self.config.warm_cache:
            self.fetcher.reset()
        self.fetcher.take_stats()
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.config.temperature,
            stop_ids=self.stop_ids() if stop_ids is None else tuple(stop_ids),
            generator=torch.Generator().manual_seed(seed),
        )
        predictor = None
        if self.mode == "sd-prefetch":
            predictor = ExpertPredictor(
                self.target,
                prefetch_layers=self.cutoff or 0,
                on_predict=self.fetcher.prefetch,
                measure_all=self.config.score_all_layers or self._calibrating,
            )
        hooks = _EngineHooks(self, predictor)
        try:
            if self.mode == "ar":
                trace = generate_autoregressive(self.target, ids, params, hooks)
            else:
                trace = generate_speculative(
                    self.target,
                    self.draft,
                    ids,
                    params,
                    draft_length=self.draft_length,
                    extra_draft_step=(
                        self.mode == "sd-prefetch" and self.config.predict_last_draft
                    ),
                    hooks=hooks,
                )
        except BaseException:
            # A pass that failed (a fetch error) never ended: release its pins
            # and queued prefetches, or they would hold cache slots for good.
            self.fetcher.end_pass()
            raise
        fetch, cache = self.fetcher.take_stats()
        return SequenceRun(
            prompt=prompt if isinstance(prompt, str) else self.tokenizer.decode(ids),
            trace=trace,
            fetch=fetch,
            cache=cache,
            prefill_fetch=hooks.prefill_fetch,
            score=predictor.score if predictor else None,
            needed=hooks.needed,
            missing=hooks.missing,
            predicted=hooks.predicted,
            num_verify_passes=hooks.num_verify_passes,
            pass_experts=hooks.pass_experts,
            held_needed=hooks.held_needed,
            prompt_tokens=prompt_tokens,
            clipped_tokens=prompt_tokens - len(ids),
        )

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        stop_ids: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> SequenceRun:
        """Generate for one tokenised prompt in the current mode."""
        self._check_budget(max_new_tokens)
        return self.run_sequence(
            prompt_ids,
            max_new_tokens,
            seed=self.config.seed if seed is None else seed,
            stop_ids=stop_ids,
        )

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> GenerationReport:
        """Generate for each prompt in the current mode; one report over all."""
        self._check_budget(max_new_tokens)
        if isinstance(prompts, str | bytes):
            raise ConfigError(
                f"prompts is one {type(prompts).__name__}, not a list of prompts; "
                "pass [prompt]"
            )
        if not prompts:
            raise ConfigError("no prompts given; pass at least one prompt")
        for i, p in enumerate(prompts):  # every prompt is checked before any work
            if not isinstance(p, str):
                raise ConfigError(
                    f"prompt {i} is {p!r}, a {type(p).__name__}, not text; "
                    "generate_ids takes token ids"
                )
            try:
                self.tokenizer.encode(p)
            except UnicodeEncodeError as e:
                raise ConfigError(
                    f"prompt {i} holds {p[e.start]!r} at character {e.start}, which "
                    f"UTF-8 cannot encode ({e.reason})"
                ) from e
        restarts = sum(self.pool.num_replacements)
        runs, failed = [], []
        for i, p in enumerate(prompts):
            # A fetch that fails for good (its host cannot be brought back)
            # fails this prompt alone; the finished ones are kept.
            try:
                runs.append(
                    self.run_sequence(p, max_new_tokens, seed=self.config.seed + i)
                )
            except ExpertFetchError as e:
                logger.warning("prompt %d failed: %s", i, e)
                failed.append(FailedPrompt(index=i, prompt=p, error=str(e)))
        if not runs:  # nothing to report
            raise ExpertFetchError(
                f"all {len(prompts)} prompt(s) failed; the first: {failed[0].error}"
            )
        report = self.report(
            runs, max_new_tokens, sum(self.pool.num_replacements) - restarts
        )
        report.failed_prompts = failed
        return report

    def _check_ids(self, prompt: Sequence[int]) -> list[int]:
        """The prompt's token ids as plain ints, each checked against the vocabulary.

        Numpy and torch integers (an array's elements, ids that came through
        Ray) are token ids like ints.
        """
        try:
            return check_token_ids(prompt, self.target.config.vocab_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check_stop_ids(self, stop_ids: Sequence[int]) -> tuple[int, ...]:
        vocab = self.target.config.vocab_size
        ids = stop_ids.tolist() if hasattr(stop_ids, "tolist") else stop_ids
        if isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
            raise ConfigError(f"stop_ids is {stop_ids!r}; give a list of token ids")
        ids = list(ids)
        for i, token in enumerate(ids):
            if not is_whole_number(token) or not 0 <= token < vocab:
                raise ConfigError(
                    f"stop_ids[{i}] is {token!r}; give token ids in [0, {vocab})"
                )
        return tuple(int(t) for t in ids)

    def _check_open(self) -> None:
        if self.closed:
            raise EngineClosed(
                "the engine is closed (its expert hosts are stopped); build a new one"
            )

    def _check_budget(self, max_new_tokens: int) -> None:
        self._check_open()
        if not is_whole_number(max_new_tokens):
            raise ConfigError(
                f"max_new_tokens must be a whole number, got {max_new_tokens!r}"
            )
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        positions = self.target.config.max_position_embeddings
        if max_new_tokens >= positions:
            raise ConfigError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                f"target's {positions} positions; give at most {positions - 1}"
            )

    # ---------------------------------------------------------------- reports

    def report(
        self, runs: Sequence[SequenceRun], max_new_tokens: int, num_restarts: int = 0
    ) -> GenerationReport:
        """Aggregate sequence runs of the current mode into a report."""
        traces = [r.trace for r in runs]
        num_tokens = sum(len(t.tokens) for t in traces)
        decode_tokens = sum(len(t.tokens) - 1 for t in traces)
        decode_s = sum(t.decode_s for t in traces)
        drafted = sum(t.num_drafted for t in traces)
        rounds = sum(t.num_rounds for t in traces)
        accepted = sum(t.num_accepted for t in traces)
        fetches = [r.fetch for r in runs]
        caches = [r.cache for r in runs]
        lookups = sum(c.num_lookups for c in caches)
        fetch_s = [x for f in fetches for x in f.fetch_s]
        real_s = [x for f in fetches for x in f.real_s]
        score = _merge_scores([r.score for r in runs if r.score is not None])
        below = list(range(self.cutoff or 0))
        speculative = self.mode != "ar"
        pass_experts = [n for r in runs for n in r.pass_experts]
        held_needed = [n for r in runs for n in r.held_needed]
        link_ms = 1e3 * self.link.transfer_s(self.expert_nbytes)
        # Every expert a pass routes to is either among the at most capacity + 1
        # (one transfer in flight) held when its round begins, or moved during
        # the round; moves are serial, so this much link time is unavoidable.
        floor_ms = sum(max(0, n - self.capacity - 1) for n in pass_experts) * link_ms
        return GenerationReport(
            mode=self.mode,
            cutoff=self.cutoff,
            cutoff_decision=(
                {
                    "cutoff": self.decision.cutoff,
                    "predicted_round_ms": self.decision.round_ms,
                    "reason": self.decision.reason,
                }
                if self.decision is not None and self.mode == "sd-prefetch"
                else None
            ),
            draft_length=self.draft_length if speculative else None,
            temperature=self.config.temperature,
            max_new_tokens=max_new_tokens,
            num_prompts=len(runs),
            num_prompts_clipped=sum(1 for r in runs if r.clipped_tokens),
            num_tokens=num_tokens,
            tpot_ms=1e3 * decode_s / decode_tokens if decode_tokens else None,
            tokens_per_s=num_tokens / max(1e-9, sum(t.total_s for t in traces)),
            ttft_ms=1e3 * statistics.mean(t.ttft_s for t in traces),
            acceptance_rate=accepted / drafted if speculative and drafted else None,
            tokens_per_round=(accepted + rounds) / rounds
            if speculative and rounds
            else None,
            prefetch_precision=score.precision(below) if score and below else None,
            prefetch_recall=score.recall(below) if score and below else None,
            predictor_precision=score.precision() if score else None,
            predictor_recall=score.recall() if score else None,
            predictor_top1=score.top1() if score else None,
            predictor_recall_per_layer=score.per_layer("recall") if score else [],
            cache_experts=self.capacity,
            num_experts_total=self.num_experts_total,
            cache_hit_rate=sum(c.num_hits for c in caches) / lookups
            if lookups
            else None,
            cache_inflight_rate=(
                sum(c.num_inflight_hits for c in caches) / lookups if lookups else None
            ),
            num_evictions=sum(c.num_evictions for c in caches),
            max_cache_overflow=max((c.max_overflow for c in caches), default=0),
            experts_per_pass=statistics.mean(pass_experts) if pass_experts else None,
            held_needed_per_pass=(
                statistics.mean(held_needed) if held_needed else None
            ),
            link_floor_ms_per_token=floor_ms / decode_tokens if decode_tokens else None,
            bytes_fetched=sum(f.bytes_fetched for f in fetches),
            prefill_bytes_fetched=sum(r.prefill_fetch.bytes_fetched for r in runs),
            num_fetches=sum(f.num_fetches for f in fetches),
            num_prefetches=sum(f.num_prefetch for f in fetches),
            num_prefetch_dropped=sum(f.num_prefetch_dropped for f in fetches),
            expert_bytes=self.expert_nbytes,
            link_bandwidth_bytes_per_s=self.link.bandwidth_bytes_per_s,
            link_ms_per_expert=link_ms,
            fetch_ms_mean=1e3 * statistics.mean(fetch_s) if fetch_s else None,
            fetch_real_ms_mean=1e3 * statistics.mean(real_s) if real_s else None,
            stall_ms_per_token=(
                1e3 * sum(f.stall_s for f in fetches) / decode_tokens
                if decode_tokens
                else None
            ),
            draft_ms_per_token=(
                1e3
                * sum(t.draft_s for t in traces)
                / sum(t.num_draft_forwards for t in traces)
                if speculative and any(t.num_draft_forwards for t in traces)
                else None
            ),
            num_hosts=self.pool.num_hosts,
            num_host_restarts=num_restarts,
            outputs=[
                SequenceOutput(
                    prompt=r.prompt,
                    text=self.tokenizer.decode(r.trace.tokens),
                    token_ids=r.trace.tokens,
                    num_tokens=len(r.trace.tokens),
                    ttft_ms=1e3 * r.trace.ttft_s,
                    tpot_ms=1e3 * r.trace.tpot_s
                    if r.trace.tpot_s is not None
                    else None,
                    stopped=r.trace.stopped,
                    prompt_tokens=r.prompt_tokens,
                    clipped_tokens=r.clipped_tokens,
                )
                for r in runs
            ],
        )

    # ---------------------------------------------------------------- control

    def resize_cache(self, capacity: int) -> None:
        """Change the cache capacity (in experts); extra entries are evicted.

        Raises:
            ConfigError: capacity below one expert, above the model's experts,
                or (``layer-lru``) below one slot per layer.
        """
        self._check_open()
        if not is_whole_number(capacity) or not 1 <= capacity <= self.num_experts_total:
            raise ConfigError(
                f"cache capacity must be 1 to {self.num_experts_total} experts (the "
                f"model's), got {capacity!r}"
            )
        if self.config.cache_policy == "layer-lru" and capacity < self.num_layers:
            raise ConfigError(
                f"cache_policy layer-lru needs a slot per layer: cache of {capacity} "
                f"experts < {self.num_layers} layers; give at least {self.num_layers}"
            )
        capacity = int(capacity)  # a numpy integer, say
        with self.fetcher.lock:
            self.fetcher.cache.resize(capacity)
        self.capacity = capacity
        logger.info("expert cache resized to %d experts", capacity)

    def close(self) -> None:
        """Stop the fetch thread and the expert hosts; later calls are refused."""
        self.closed = True
        self.fetcher.close()
        self.pool.close()

    def __enter__(self) -> MoEEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_draft_length(draft_length: object) -> None:
    limits = MoEEngineConfig.model_fields["draft_length"].metadata
    low = next(m.ge for m in limits if hasattr(m, "ge"))
    high = next(m.le for m in limits if hasattr(m, "le"))
    if not is_whole_number(draft_length) or not low <= draft_length <= high:
        raise ConfigError(
            f"draft_length must be {low} to {high} tokens, got {draft_length!r}"
        )


def cache_capacity(
    config: MoEEngineConfig, expert_nbytes: int, num_experts_total: int
) -> int:
    """The cache capacity in experts a config asks for (default: a quarter).

    Raises:
        ConfigError: ``cache_bytes`` is smaller than one expert, or the cache
            would hold more experts than the model has.
    """
    if config.cache_bytes is not None:
        capacity = config.cache_bytes // expert_nbytes
        if capacity < 1:
            raise ConfigError(
                f"cache_bytes {config.cache_bytes} holds no expert of "
                f"{expert_nbytes} bytes; give at least that much"
            )
        if capacity > num_experts_total:
            raise ConfigError(
                f"cache_bytes {config.cache_bytes} holds {capacity} experts of "
                f"{expert_nbytes} bytes, more than the model's {num_experts_total}; "
                f"give at most {num_experts_total * expert_nbytes}"
            )
        return capacity
    if config.cache_experts is not None:
        if config.cache_experts > num_experts_total:
            raise ConfigError(
                f"cache_experts {config.cache_experts} is more than the model's "
                f"{num_experts_total} experts; give at most {num_experts_total}"
            )
        return config.cache_experts
    return max(1, num_experts_total // 4)


def store_facts(config: MoEEngineConfig) -> tuple[int, int]:
    """(bytes of one expert, number of experts) of the configured target, cheaply."""
    store = ExpertCheckpointStore(
        config.expert_store or str(Path(config.target_dir).resolve())
    )
    return store.expert_nbytes, len(store.all_experts)


def _merge_scores(scores: Sequence[PredictionScore]) -> PredictionScore | None:
    if not scores:
        return None
    merged = PredictionScore([LayerScore() for _ in scores[0].layers])
    for score in scores:
        for total, layer in zip(merged.layers, score.layers, strict=True):
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(layer, name))
    return merged


__all__ = [
    "DEFAULT_LINK_BANDWIDTH",
    "MODES",
    "MoEEngine",
    "MoEEngineConfig",
    "SequenceRun",
    "cache_capacity",
    "store_facts",
]
