"""Latency profiles of a serving instance, as Arrow (Wu et al., 2025, §3.1) uses them.

A profile predicts how long an instance takes for the two phases of LLM
inference:

- prefill of a prompt of ``L`` tokens: ``T(L) = a·L² + b·L + c`` (the quadratic
  term is causal attention, the linear one the weight matmuls, ``c`` the fixed
  cost of a forward pass);
- one decode step over a batch holding ``bt`` context tokens in ``B``
  sequences: ``D(bt, B) = β + α·bt + γ·B`` (``α`` reads the KV cache, ``β``
  reads the weights once, ``γ`` is per-sequence work, often 0);
- ``MT``, the largest number of batch tokens a decode step may hold and still
  meet a time-per-output-token (TPOT) target, capped by the KV capacity.

One step of an engine may mix prefill chunks and decode tokens (chunked
prefill); its time is the larger fixed cost plus the variable cost of both
parts, so decodes sharing a step with a long prefill chunk wait for it: the
prefill/decode interference that disaggregation avoids.

Profiles come from three places: `fit_profile` (least squares on measurements
of a real engine), `LatencyProfile.load` (a JSON file written for hardware this
machine does not have), and `roofline_profile` (an estimate from a named model's
shape and a named GPU's peak numbers, with its assumptions stated).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raysys.runtime.config import format_validation_error
from raysys.runtime.errors import ConfigError

logger = logging.getLogger(__name__)


class LatencyProfile(BaseModel):
    """Predicted step times of one instance (all times in seconds).

    Attributes are named for the term they scale; see the module docstring for
    the formulas.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="what was profiled, e.g. 'llama-3.1-70b/h100x4'")
    source: str = Field("file", description="'roofline', 'fit' or 'file'")
    prefill_s_per_token_sq: float = Field(
        ge=0, description="a: seconds per squared prompt token (attention)"
    )
    prefill_s_per_token: float = Field(
        ge=0, description="b: seconds per prompt token (weight matmuls)"
    )
    prefill_overhead_s: float = Field(
        ge=0, description="c: fixed seconds of a prefill forward pass"
    )
    decode_s_per_batch_token: float = Field(
        ge=0, description="alpha: seconds per context token in a decode batch"
    )
    decode_s_per_seq: float = Field(
        0.0, ge=0, description="gamma: seconds per sequence in a decode batch"
    )
    decode_overhead_s: float = Field(
        ge=0, description="beta: fixed seconds of a decode step"
    )
    kv_capacity_tokens: int = Field(
        ge=1, description="tokens of KV cache the instance holds"
    )
    kv_bytes_per_token: int = Field(
        ge=1, description="bytes of KV cache per token (all layers)"
    )
    kv_transfer_bytes_per_s: float = Field(
        gt=0, description="bandwidth of a KV handoff between instances"
    )
    kv_transfer_latency_s: float = Field(
        0.0, ge=0, description="fixed latency of a KV handoff"
    )
    notes: str = Field("", description="assumptions behind the numbers")

    # -- predictions -----------------------------------------------------------

    def prefill_time_s(self, prompt_tokens: int) -> float:
        """T(L): time to prefill ``prompt_tokens`` tokens in one pass."""
        n = float(prompt_tokens)
        return (
            self.prefill_s_per_token_sq * n * n
            + self.prefill_s_per_token * n
            + self.prefill_overhead_s
        )

    def prefill_work_s(self, num_tokens: int, num_past_tokens: int = 0) -> float:
        """Variable cost of a prefill chunk of ``num_tokens`` after ``num_past_tokens``.

        The chunk's attention covers the pairs (query, key) with the query in the
        chunk and the key before it, so chunks of one prompt add up to
        ``a·L² + b·L``.
        """
        end = num_past_tokens + num_tokens
        pairs = float(end) * end - float(num_past_tokens) * num_past_tokens
        return self.prefill_s_per_token_sq * pairs + self.prefill_s_per_token * (
            num_tokens
        )

    def decode_work_s(self, batch_tokens: int, num_seqs: int) -> float:
        """Variable cost of a decode step over ``batch_tokens`` in ``num_seqs``."""
        return (
            self.decode_s_per_batch_token * batch_tokens
            + self.decode_s_per_seq * num_seqs
        )

    def decode_step_time_s(self, batch_tokens: int, num_seqs: int = 0) -> float:
        """D(bt, B): time of a decode-only step."""
        return self.decode_overhead_s + self.decode_work_s(batch_tokens, num_seqs)

    def step_time_s(
        self,
        prefill_chunks: Sequence[tuple[int, int]] = (),
        batch_tokens: int = 0,
        num_seqs: int = 0,
    ) -> float:
        """Time of one engine step mixing prefill chunks and decode tokens.

        Args:
            prefill_chunks: ``(num_tokens, num_past_tokens)`` per prefill chunk.
            batch_tokens: context tokens of the decoding sequences.
            num_seqs: number of decoding sequences.
        """
        has_prefill = any(n > 0 for n, _ in prefill_chunks)
        has_decode = num_seqs > 0
        if not (has_prefill or has_decode):
            return 0.0
        overhead = max(
            self.prefill_overhead_s if has_prefill else 0.0,
            self.decode_overhead_s if has_decode else 0.0,
        )
        work = sum(self.prefill_work_s(n, past) for n, past in prefill_chunks)
        if has_decode:
            work += self.decode_work_s(batch_tokens, num_seqs)
        return overhead + work

    def mixed_step_room_s(
        self, limit_s: float, batch_tokens: int, num_seqs: int
    ) -> float:
        """Seconds of prefill work a step holding decodes may add within
        ``limit_s``: the limit less the larger fixed cost and the decode work
        (0 when nothing is left)."""
        fixed = max(self.prefill_overhead_s, self.decode_overhead_s)
        return max(0.0, limit_s - fixed - self.decode_work_s(batch_tokens, num_seqs))

    def max_batch_tokens(
        self, tpot_slo_s: float, tokens_per_seq: float | None = None
    ) -> int:
        """MT: the most batch tokens a decode step holds within ``tpot_slo_s``.

        With ``tokens_per_seq`` the per-sequence cost is spread over that many
        tokens; the answer is capped by the KV capacity.
        """
        per_token = self.decode_s_per_batch_token
        if tokens_per_seq:
            per_token += self.decode_s_per_seq / tokens_per_seq
        room = tpot_slo_s - self.decode_overhead_s
        if room <= 0:
            return 0
        if per_token <= 0:
            return self.kv_capacity_tokens
        # The small slack keeps float round-off from costing a token.
        return int(min(self.kv_capacity_tokens, room / per_token + 1e-6))

    def kv_transfer_time_s(self, num_tokens: int) -> float:
        """Time to hand ``num_tokens`` tokens of KV cache to another instance."""
        return (
            self.kv_transfer_latency_s
            + num_tokens * self.kv_bytes_per_token / self.kv_transfer_bytes_per_s
        )

    # -- files -----------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        """Read a profile written by `save` (or by hand).

        Raises:
            ConfigError: the file is missing or a field is absent or invalid.
        """
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"profile file {str(path)!r} is a folder; give a profile JSON file"
            )
        if not path.is_file():
            raise ConfigError(
                f"profile file {str(path)!r} does not exist; write one with "
                "LatencyProfile.save or pass a roofline preset name"
            )
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as e:
            raise ConfigError(
                f"profile file {path}: " + format_validation_error(cls, e, flags=False)
            ) from e


# -- fitting from measurements -------------------------------------------------


def fit_profile(
    prefill_samples: Sequence[tuple[int, float]],
    decode_samples: Sequence[tuple[int, int, float]],
    *,
    name: str,
    kv_capacity_tokens: int,
    kv_bytes_per_token: int,
    kv_transfer_bytes_per_s: float,
    kv_transfer_latency_s: float = 0.0,
    notes: str = "",
) -> LatencyProfile:
    """Fit a profile to measured step times by non-negative least squares.

    Args:
        prefill_samples: ``(prompt_tokens, seconds)`` of single-prompt prefills.
        decode_samples: ``(batch_tokens, num_seqs, seconds)`` of decode steps.
        name: what was measured.
        kv_capacity_tokens: KV tokens the measured engine holds.
        kv_bytes_per_token: bytes of KV per token of the measured model.
        kv_transfer_bytes_per_s: measured (or assumed) handoff bandwidth.
        kv_transfer_latency_s: measured (or assumed) handoff latency.
        notes: how the samples were taken.

    Raises:
        ConfigError: fewer than 3 samples of either kind, or a sample with a
            size below 1 or a time that is negative or not finite.
    """
    from scipy.optimize import nnls  # a heavy import, needed only here

    if len(prefill_samples) < 3 or len(decode_samples) < 3:
        raise ConfigError(
            f"fitting needs at least 3 prefill and 3 decode samples, got "
            f"{len(prefill_samples)} and {len(decode_samples)}; measure more sizes"
        )
    for kind, samples in (("prefill", prefill_samples), ("decode", decode_samples)):
        for sample in samples:
            *sizes, seconds = sample
            if not all(n >= 1 for n in sizes) or not (
                math.isfinite(seconds) and seconds >= 0
            ):
                raise ConfigError(
                    f"{kind} sample {tuple(sample)!r}: sizes must be >= 1 and the "
                    "time a finite number of seconds >= 0; measure it again"
                )
    lengths = np.array([s[0] for s in prefill_samples], dtype=float)
    times = np.array([s[1] for s in prefill_samples], dtype=float)
    # Scale the columns so the solver sees numbers of similar size.
    scale = np.array([lengths.max() ** 2, lengths.max(), 1.0])
    design = np.stack([lengths**2, lengths, np.ones_like(lengths)], 1) / scale
    coef_p, _ = nnls(design, times)
    coef_p = coef_p / scale

    bt = np.array([s[0] for s in decode_samples], dtype=float)
    seqs = np.array([s[1] for s in decode_samples], dtype=float)
    dtimes = np.array([s[2] for s in decode_samples], dtype=float)
    scale_d = np.array([max(bt.max(), 1.0), max(seqs.max(), 1.0), 1.0])
    design_d = np.stack([bt, seqs, np.ones_like(bt)], 1) / scale_d
    coef_d, _ = nnls(design_d, dtimes)
    coef_d = coef_d / scale_d

    profile = LatencyProfile(
        name=name,
        source="fit",
        prefill_s_per_token_sq=float(coef_p[0]),
        prefill_s_per_token=float(coef_p[1]),
        prefill_overhead_s=float(coef_p[2]),
        decode_s_per_batch_token=float(coef_d[0]),
        decode_s_per_seq=float(coef_d[1]),
        decode_overhead_s=float(coef_d[2]),
        kv_capacity_tokens=kv_capacity_tokens,
        kv_bytes_per_token=kv_bytes_per_token,
        kv_transfer_bytes_per_s=kv_transfer_bytes_per_s,
        kv_transfer_latency_s=kv_transfer_latency_s,
        notes=notes,
    )
    pred_p = np.array([profile.prefill_time_s(int(n)) for n in lengths])
    pred_d = np.array(
        [
            profile.decode_step_time_s(int(b), int(s))
            for b, s in zip(bt, seqs, strict=True)
        ]
    )
    logger.info(
        "fitted profile %s: prefill mean relative error %.1f%%, decode %.1f%%",
        name,
        100 * float(np.mean(np.abs(pred_p - times) / np.maximum(times, 1e-12))),
        100 * float(np.mean(np.abs(pred_d - dtimes) / np.maximum(dtimes, 1e-12))),
    )
    return profile


# -- roofline estimates ------------------------------------------------------------


class ModelSpec(BaseModel):
    """The shape of a decoder-only transformer, enough for a roofline estimate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    num_params: float = Field(gt=0, description="parameters (all weights)")
    num_layers: int = Field(ge=1)
    attention_dim: int = Field(ge=1, description="query heads x head_dim")
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)


class GpuSpec(BaseModel):
    """Peak numbers of one accelerator, from its data sheet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    peak_flops: float = Field(gt=0, description="dense bf16 tensor FLOP/s")
    hbm_bytes_per_s: float = Field(gt=0, description="memory bandwidth")
    memory_bytes: float = Field(gt=0, description="memory capacity")


MODELS = {
    m.name: m
    for m in (
        ModelSpec(
            name="llama-3.1-70b",
            num_params=70.6e9,
            num_layers=80,
            attention_dim=8192,
            num_kv_heads=8,
            head_dim=128,
        ),
        ModelSpec(
            name="qwen3-32b",
            num_params=32.8e9,
            num_layers=64,
            attention_dim=8192,
            num_kv_heads=8,
            head_dim=128,
        ),
        ModelSpec(
            name="llama-3.1-8b",
            num_params=8.03e9,
            num_layers=32,
            attention_dim=4096,
            num_kv_heads=8,
            head_dim=128,
        ),
    )
}

GPUS = {
    g.name: g
    for g in (
        GpuSpec(
            name="h100-sxm",
            peak_flops=989e12,
            hbm_bytes_per_s=3.35e12,
            memory_bytes=80e9,
        ),
        GpuSpec(
            name="a100-sxm-80gb",
            peak_flops=312e12,
            hbm_bytes_per_s=2.039e12,
            memory_bytes=80e9,
        ),
        GpuSpec(
            name="h20",
            peak_flops=148e12,
            hbm_bytes_per_s=4.0e12,
            memory_bytes=96e9,
        ),
        GpuSpec(
            name="l40s",
            peak_flops=362e12,
            hbm_bytes_per_s=0.864e12,
            memory_bytes=48e9,
        ),
    )
}


class RooflineAssumptions(BaseModel):
    """What a roofline estimate assumes beyond the data sheets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel: int = Field(4, ge=1, description="GPUs per instance")
    bytes_per_param: float = Field(2.0, gt=0, description="2 for bf16 weights")
    kv_bytes_per_value: float = Field(2.0, gt=0, description="2 for a bf16 KV cache")
    mfu: float = Field(
        0.5, gt=0, le=1, description="fraction of peak FLOP/s prefill reaches"
    )
    mbu: float = Field(
        0.8, gt=0, le=1, description="fraction of peak bandwidth decode reaches"
    )
    memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of GPU memory the engine may use"
    )
    activation_reserve_bytes: float = Field(
        4e9, ge=0, description="memory per instance kept for activations"
    )
    step_fixed_s: float = Field(
        0.003,
        ge=0,
        description="per-step launch, scheduling and tensor-parallel sync cost",
    )
    kv_link_bytes_per_s: float = Field(
        25e9, gt=0, description="KV handoff bandwidth between instances"
    )
    kv_link_latency_s: float = Field(0.002, ge=0, description="handoff latency")


def roofline_profile(
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    assumptions: RooflineAssumptions | None = None,
) -> LatencyProfile:
    """Estimate a profile from a model's shape and a GPU's peak numbers.

    The derivation, per instance of ``tp`` GPUs:

    - prefill: ``2·params`` FLOPs per token (``b``) and ``2·layers·heads·head_dim``
      FLOPs per pair of causal attention positions (``a``), at ``mfu`` of the
      peak; ``c`` is one read of the weights at ``mbu`` of the bandwidth plus
      ``step_fixed_s`` (kept additive: an upper bound for short prompts);
    - decode: ``β`` reads the weights once and ``α`` reads one token's KV
      (``2·layers·kv_heads·head_dim`` values) at ``mbu`` of the bandwidth;
      ``γ`` is each sequence's ``2·params`` FLOPs at ``mfu``. Memory and
      compute times are added, not overlapped: exact for small batches, an
      upper bound past the batch size where compute alone reaches the weight
      read time (logged here), and in line with the step times serving
      engines report for large batches, which sit above the pure roofline;
    - KV capacity: ``tp·memory·memory_utilization`` minus weights and the
      activation reserve, divided by the KV bytes per token;
    - handoff: ``kv_link_bytes_per_s`` (25 GB/s is a 200 Gb/s RDMA link per
      instance) plus ``kv_link_latency_s``.

    Raises:
        ConfigError: an unknown model or GPU name, or weights that do not fit.
    """
    a = assumptions or RooflineAssumptions()
    if isinstance(model, str):
        if model not in MODELS:
            raise ConfigError(
                f"unknown model {model!r}; choose one of {sorted(MODELS)}"
            )
        model = MODELS[model]
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise ConfigError(f"unknown GPU {gpu!r}; choose one of {sorted(GPUS)}")
        gpu = GPUS[gpu]
    flops = a.tensor_parallel * gpu.peak_flops * a.mfu
    bandwidth = a.tensor_parallel * gpu.hbm_bytes_per_s * a.mbu
    weight_bytes = model.num_params * a.bytes_per_param
    kv_bytes_per_token = int(
        2
        * model.num_layers
        * model.num_kv_heads
        * model.head_dim
        * a.kv_bytes_per_value
    )
    free_bytes = (
        a.tensor_parallel * gpu.memory_bytes * a.memory_utilization
        - weight_bytes
        - a.activation_reserve_bytes
    )
    if free_bytes < kv_bytes_per_token * 4096:
        raise ConfigError(
            f"{model.name} ({weight_bytes / 1e9:.0f} GB of weights) leaves "
            f"{max(free_bytes, 0) / 1e9:.1f} GB of KV room on {a.tensor_parallel}x "
            f"{gpu.name}; raise tensor_parallel or lower bytes_per_param"
        )
    weight_read_s = weight_bytes / bandwidth
    per_token_s = 2 * model.num_params / flops
    crossover = weight_read_s / per_token_s
    logger.info(
        "roofline %s on %dx %s: decode compute reaches the weight read at ~%d sequences",
        model.name,
        a.tensor_parallel,
        gpu.name,
        int(crossover),
    )
    return LatencyProfile(
        name=f"{model.name}/{gpu.name}x{a.tensor_parallel}",
        source="roofline",
        prefill_s_per_token_sq=2 * model.num_layers * model.attention_dim / flops,
        prefill_s_per_token=per_token_s,
        prefill_overhead_s=weight_read_s + a.step_fixed_s,
        decode_s_per_batch_token=kv_bytes_per_token / bandwidth,
        decode_s_per_seq=per_token_s,
        decode_overhead_s=weight_read_s + a.step_fixed_s,
        kv_capacity_tokens=int(free_bytes // kv_bytes_per_token),
        kv_bytes_per_token=kv_bytes_per_token,
        kv_transfer_bytes_per_s=a.kv_link_bytes_per_s,
        kv_transfer_latency_s=a.kv_link_latency_s,
        notes=(
            f"roofline: {a.tensor_parallel}x {gpu.name} "
            f"({gpu.peak_flops / 1e12:.0f} TFLOP/s, "
            f"{gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, "
            f"{gpu.memory_bytes / 1e9:.0f} GB each), {a.bytes_per_param:g}-byte "
            f"weights, {a.kv_bytes_per_value:g}-byte KV, MFU {a.mfu:g}, "
            f"MBU {a.mbu:g}, memory utilization {a.memory_utilization:g}, "
            f"{a.step_fixed_s * 1e3:g} ms fixed per step, KV link "
            f"{a.kv_link_bytes_per_s / 1e9:g} GB/s + "
            f"{a.kv_link_latency_s * 1e3:g} ms"
        ),
    )


def resolve_profile(spec: str, assumptions: RooflineAssumptions | None = None):
    """A profile from a JSON file path or a ``model@gpu`` roofline preset.

    Examples: ``profiles/h100.json``, ``llama-3.1-70b@h100-sxm``.

    Raises:
        ConfigError: neither an existing file nor a known preset.
    """
    if "@" in spec and not Path(spec).is_file():
        model, gpu = spec.split("@", 1)
        return roofline_profile(model, gpu, assumptions)
    if not Path(spec).is_file():
        raise ConfigError(
            f"profile {spec!r} is neither a file nor a MODEL@GPU preset; models: "
            f"{sorted(MODELS)}, GPUs: {sorted(GPUS)}"
        )
    return LatencyProfile.load(spec)
