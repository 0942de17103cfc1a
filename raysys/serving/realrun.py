"""A trace replayed on real instance actors: model, profile, policy and front together.

`run_real` is what ``jobs/serve_trace.py --mode real`` and the real part of
``jobs/bench_serving.py`` run: the project's tiny Llama on each instance, a
latency profile measured on the engine itself (or read from a file), the
chosen policy, and an open-loop replay of the trace through `ServingFront`.
Requests longer than the model's context are clipped to it and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysys.runtime.errors import ConfigError
from raysys.runtime.resources import require_resources
from raysys.serving.batching import EngineConfig
from raysys.serving.engine import EngineError, measure_profile
from raysys.serving.front import FrontConfig, ServingFront
from raysys.serving.instance import InstanceSpec, ModelSource
from raysys.serving.metrics import FlipEvent, RequestRecord
from raysys.serving.policy import ArrowConfig, ServingPolicy, SloTargets, make_policy
from raysys.serving.profile import LatencyProfile
from raysys.serving.trace import Trace

logger = logging.getLogger(__name__)


class RealRunSettings(BaseModel):
    """Instances of a real run (the tiny model on CPU unless CUDA is present)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context_tokens: int = Field(512, ge=16, description="model context length")
    kv_capacity_tokens: int = Field(16384, ge=64, description="KV tokens/instance")
    num_cpus: float = Field(0.5, ge=0, description="logical CPUs per instance")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per instance (0: the model runs on CPU)"
    )
    max_step_tokens: int = Field(256, ge=8, description="token budget of a step")
    max_num_seqs: int = Field(64, ge=1, description="decode batch limit")
    seed: int = Field(0, description="seed of the weights and the prompts")
    request_timeout_s: float = Field(120.0, gt=0, description="per-request bound")
    mixed_step_limit_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="predicted time a step holding decodes may take (prompt chunks "
        "cut to fit, by the profile the policy uses); None: no limit",
    )

    def source(self) -> ModelSource:
        return ModelSource(
            max_position_embeddings=self.context_tokens,
            seed=self.seed,
            device="cuda" if self.num_gpus > 0 else "cpu",
        )

    def engine(self) -> EngineConfig:
        return EngineConfig(
            max_step_tokens=self.max_step_tokens,
            max_num_seqs=self.max_num_seqs,
            mixed_step_limit_s=self.mixed_step_limit_s,
        )


@dataclass
class RealRunOutcome:
    records: list[RequestRecord]
    flips: list[FlipEvent]
    policy: ServingPolicy
    profile: LatencyProfile
    num_clipped: int


def prompt_tokens(seed: int, request_id: int, num_tokens: int) -> list[int]:
    """Deterministic byte-token prompt of a request (the trace has lengths only)."""
    rng = np.random.default_rng((seed, request_id))
    return rng.integers(0, 256, num_tokens).tolist()


def engine_profile(
    settings: RealRunSettings, profile_file: str | None
) -> LatencyProfile:
    """The profile the policy predicts with: a file, or measured on the engine."""
    if profile_file is not None:
        return LatencyProfile.load(profile_file)
    import torch

    torch.set_num_threads(1)
    # TODO: measured in the driver (on CUDA when it has one); instances on
    # other hardware than the driver would need their own measurement.
    model = settings.source().model_copy(update={"device": "auto"}).build()
    try:
        profile = measure_profile(
            model,
            settings.engine(),
            kv_capacity_tokens=settings.kv_capacity_tokens,
            name=f"tiny-llama-{settings.context_tokens}/measured",
        )
    except EngineError as e:
        raise ConfigError(
            f"measuring the engine's latency profile with a KV capacity of "
            f"{settings.kv_capacity_tokens} tokens failed ({e}); give a larger KV "
            "capacity or a profile file"
        ) from e
    logger.info(
        "measured profile: prefill %.2e s/token + %.2e s/token^2 + %.3f s; decode "
        "%.2e s/batch token + %.2e s/seq + %.3f s",
        profile.prefill_s_per_token,
        profile.prefill_s_per_token_sq,
        profile.prefill_overhead_s,
        profile.decode_s_per_batch_token,
        profile.decode_s_per_seq,
        profile.decode_overhead_s,
    )
    return profile


def run_real(
    trace: Trace,
    policy_name: str,
    num_instances: int,
    slo: SloTargets,
    settings: RealRunSettings,
    *,
    rate_scale: float = 1.0,
    num_prefill: int | None = None,
    arrow: ArrowConfig | None = None,
    profile_file: str | None = None,
    profile: LatencyProfile | None = None,
    progress: Any = None,
    on_front: Callable[[ServingFront], None] | None = None,
) -> RealRunOutcome:
    """Replay ``trace`` on ``num_instances`` actors under the named policy.

    Raises:
        UnsatisfiableResources: the cluster can never hold the instances.
    """
    require_resources(
        [{"CPU": settings.num_cpus, "GPU": settings.num_gpus}] * num_instances,
        what=f"{num_instances} serving instances of {settings.num_cpus:g} CPU and "
        f"{settings.num_gpus:g} GPU each",
    )
    clipped, num_clipped = trace.clipped(settings.context_tokens)
    if num_clipped:
        logger.info(
            "clipped %d of %d requests to the model's %d-token context",
            num_clipped,
            len(trace),
            settings.context_tokens,
        )
    profile = profile or engine_profile(settings, profile_file)
    policy = make_policy(
        policy_name, profile, slo, num_prefill=num_prefill, arrow=arrow
    )
    spec = InstanceSpec(
        source=settings.source(),
        engine=settings.engine(),
        kv_capacity_tokens=settings.kv_capacity_tokens,
        num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus,
        profile=profile,
    )
    front = ServingFront(
        policy,
        spec,
        num_instances,
        FrontConfig(request_timeout_s=settings.request_timeout_s),
    )
    if on_front is not None:
        on_front(front)
    try:
        records = front.replay(
            clipped,
            lambda rid, n: prompt_tokens(settings.seed, rid, n),
            rate_scale=rate_scale,
            progress=(lambda n: progress.update(1)) if progress is not None else None,
        )
    finally:
        front.shutdown()
        if progress is not None:
            progress.close()
    return RealRunOutcome(records, front.flips, policy, profile, num_clipped)
