"""Replay an LLM request trace under one serving policy, simulated or on real instances.

    # simulation: a 70B-class model on 8 instances of 4 H100s (roofline profile)
    python jobs/serve_trace.py --trace ../shared/data/llm-traces/azure-2023-conv.csv \\
        --policy arrow --instances 8 --mode sim --rate-scale 6 \\
        --ttft-slo-s 3 --tpot-slo-s 0.1 --out out/serving/sim.json

    # real: the project's tiny Llama on 4 instance actors of the local Ray cluster
    python jobs/serve_trace.py --policy arrow --instances 4 --mode real \\
        --max-requests 200 --ttft-slo-s 1 --tpot-slo-s 0.1 --out out/serving/real.json

Without ``--trace`` the built-in shifting trace is used (prompt-heavy and
output-heavy phases alternating). In real mode the latency profile the policy
predicts with is measured on the real engine first (or read from ``--profile``
when that names a file) and saved next to the report (``*.profile.json``);
requests longer than the model's context are clipped to it and counted. Writes
the JSON report and a PNG timeline next to it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from tqdm import tqdm

from raysys.runtime import Config, Report, init_ray, run_job
from raysys.runtime.config import OutputFile
from raysys.serving.batching import EngineConfig
from raysys.serving.metrics import (
    FlipReport,
    RequestReport,
    flip_reports,
    request_reports,
    summarize,
)
from raysys.serving.policy import ArrowConfig, SloTargets, make_policy
from raysys.serving.profile import RooflineAssumptions, resolve_profile
from raysys.serving.trace import Trace, generate_shifting_trace, load_trace

logger = logging.getLogger("serve_trace")


class ServeTraceConfig(Config):
    """Replay a trace under one policy, in simulation or on real instances."""

    trace: Path | None = Field(
        None,
        description="Azure .csv or Mooncake .jsonl trace; omitted: the built-in "
        "shifting trace",
    )
    policy: Literal["arrow", "static", "colocated"] = Field(
        "arrow", description="serving policy"
    )
    instances: int = Field(8, ge=1, le=256, description="number of instances")
    mode: Literal["real", "sim"] = Field(
        "sim", description="'sim': discrete-event simulation; 'real': Ray actors"
    )
    rate_scale: float = Field(
        1.0, gt=0, description="arrival rate multiplier (2 = twice as fast)"
    )
    ttft_slo_s: float = Field(3.0, gt=0, description="time-to-first-token target, s")
    tpot_slo_s: float = Field(0.1, gt=0, description="time-per-output-token target, s")
    max_requests: int | None = Field(
        None, ge=1, description="replay only the first N requests"
    )
    num_prefill: int | None = Field(
        None, ge=1, description="static policy: prefill instances (default: half)"
    )
    profile: str = Field(
        "llama-3.1-70b@h100-sxm",
        description="sim: a profile JSON file or a MODEL@GPU roofline preset; real: "
        "a profile JSON file (left out: the engine is measured)",
    )
    roofline: RooflineAssumptions = Field(
        default_factory=RooflineAssumptions,
        description="assumptions of a roofline preset (set with --set roofline.x=)",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="local scheduler of every instance"
    )
    arrow: ArrowConfig = Field(
        default_factory=ArrowConfig, description="Arrow thresholds and cooldown"
    )
    synthetic_duration_s: float = Field(
        600.0, gt=0, description="length of the built-in trace, s"
    )
    synthetic_rate_rps: float = Field(
        4.0, gt=0, description="mean arrival rate of the built-in trace, req/s"
    )
    seed: int = Field(0, description="seed of the built-in trace and the prompts")
    real_model_context: int = Field(
        512, ge=16, description="real mode: context length of the tiny model"
    )
    real_kv_capacity_tokens: int = Field(
        16384, ge=64, description="real mode: KV tokens per instance"
    )
    real_num_cpus: float = Field(
        0.5, ge=0, description="real mode: logical CPUs per instance actor"
    )
    real_num_gpus: float = Field(
        0.0, ge=0, description="real mode: GPUs per instance actor (0: CPU)"
    )
    real_max_step_tokens: int = Field(
        256, ge=8, description="real mode: token budget of one engine step"
    )
    out: OutputFile = Field(
        Path("out/serving/serve_trace.json"), description="JSON report path"
    )
    plot: bool = Field(True, description="write a PNG timeline next to the report")

    @model_validator(mode="after")
    def _check(self) -> ServeTraceConfig:
        if self.policy == "static":
            n = self.num_prefill or max(self.instances // 2, 1)
            if not 1 <= n < self.instances:
                raise ValueError(
                    f"a static split of {self.instances} instances needs 1 <= "
                    f"num_prefill < {self.instances}, got {n}"
                )
        if self.policy != "static" and self.num_prefill is not None:
            raise ValueError(
                f"--num-prefill applies to --policy static only (got --policy "
                f"{self.policy}); leave it out, or use the static split"
            )
        if self.policy == "arrow" and self.instances < 2:
            raise ValueError("arrow needs --instances >= 2 (one per role)")
        if (
            self.mode == "real"
            and "profile" in self.model_fields_set
            and not Path(self.profile).is_file()
        ):
            # Measuring instead would hide a mistyped path.
            raise ValueError(
                f"--profile {self.profile!r} is not a file; in real mode give a "
                "profile JSON file (a *.profile.json an earlier real run wrote), "
                "or leave --profile out to measure the engine"
            )
        return self


class ServeTraceReport(Report):
    """Outcome of one replay."""

    mode: str
    policy: str
    trace: str
    instances: int
    rate_scale: float
    ttft_slo_s: float
    tpot_slo_s: float
    profile: str
    num_requests: int
    num_completed: int
    num_failed: int
    num_clipped: int
    num_malformed: int
    malformed_rows: list[dict[str, int | str]] = Field(
        description="the first skipped rows of the trace: line number and why"
    )
    num_reordered: int = Field(
        description="rows out of time order in the file, sorted into arrival order"
    )
    slo_attainment: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    num_role_flips: int
    num_fallbacks: int
    num_handoffs: int
    num_retries: int
    dispatch_reasons: dict[str, int]
    wall_s: float
    flips: list[FlipReport]
    requests: list[RequestReport]


def read_trace(cfg: ServeTraceConfig) -> Trace:
    if cfg.trace is None:
        trace = generate_shifting_trace(
            duration_s=cfg.synthetic_duration_s,
            rate_rps=cfg.synthetic_rate_rps,
            seed=cfg.seed,
        )
    else:
        trace = load_trace(cfg.trace)
    return trace.head(cfg.max_requests)


def run(cfg: ServeTraceConfig) -> ServeTraceReport:
    trace = read_trace(cfg)
    slo = SloTargets(ttft_s=cfg.ttft_slo_s, tpot_s=cfg.tpot_slo_s)
    num_prefill = cfg.num_prefill or max(cfg.instances // 2, 1)
    logger.info("trace %s: %s", trace.name, trace.summary())
    start = time.monotonic()
    num_clipped = 0
    if cfg.mode == "sim":
        from raysys.serving.simulator import simulate

        profile = resolve_profile(cfg.profile, cfg.roofline)
        policy = make_policy(
            cfg.policy, profile, slo, num_prefill=num_prefill, arrow=cfg.arrow
        )
        result = simulate(
            lambda: policy,
            profile,
            trace,
            num_instances=cfg.instances,
            rate_scale=cfg.rate_scale,
            engine=cfg.engine,
        )
        records, flips = result.records, result.flips
        profile_name = profile.name
    else:
        from raysys.serving.realrun import RealRunSettings, run_real

        settings = RealRunSettings(
            context_tokens=cfg.real_model_context,
            kv_capacity_tokens=cfg.real_kv_capacity_tokens,
            num_cpus=cfg.real_num_cpus,
            num_gpus=cfg.real_num_gpus,
            max_step_tokens=cfg.real_max_step_tokens,
            mixed_step_limit_s=cfg.engine.mixed_step_limit_s,
            seed=cfg.seed,
        )
        init_ray()
        outcome = run_real(
            trace,
            cfg.policy,
            cfg.instances,
            slo,
            settings,
            rate_scale=cfg.rate_scale,
            num_prefill=num_prefill,
            arrow=cfg.arrow,
            profile_file=cfg.profile if Path(cfg.profile).is_file() else None,
            progress=tqdm(total=len(trace), desc="requests", unit="req"),
        )
        records, flips, policy = outcome.records, outcome.flips, outcome.policy
        num_clipped = outcome.num_clipped
        profile_name = outcome.profile.name
        # The measured profile, reusable with --profile FILE.
        outcome.profile.save(cfg.out.with_suffix(".profile.json"))
    summary = summarize(records, slo)
    report = ServeTraceReport(
        mode=cfg.mode,
        policy=cfg.policy if cfg.policy != "static" else f"static {num_prefill}P",
        trace=trace.name,
        instances=cfg.instances,
        rate_scale=cfg.rate_scale,
        ttft_slo_s=cfg.ttft_slo_s,
        tpot_slo_s=cfg.tpot_slo_s,
        profile=profile_name,
        num_clipped=num_clipped,
        num_malformed=trace.num_malformed,
        malformed_rows=[{"line": m.line, "reason": m.reason} for m in trace.malformed],
        num_reordered=trace.num_reordered,
        num_role_flips=len(flips),
        num_fallbacks=policy.counters.num_fallbacks,
        num_retries=sum(r.num_retries for r in records),
        dispatch_reasons=dict(policy.counters.dispatch_reasons),
        wall_s=time.monotonic() - start,
        flips=flip_reports(flips),
        requests=request_reports(records, slo),
        **summary.model_dump(),
    )
    report.write(cfg.out)
    if cfg.plot:
        from raysys.serving.plots import plot_timeline

        roles = [r.value for r in policy.initial_roles(cfg.instances)]
        plot_timeline(records, flips, roles, slo, cfg.out.with_suffix(".png"))
    print(
        f"{report.policy} ({cfg.mode}, {cfg.instances} instances, rate x{cfg.rate_scale:g}): "
        f"SLO attainment {report.slo_attainment:.3f}, TTFT p50/p90 "
        f"{_fmt(report.ttft_p50_s)}/{_fmt(report.ttft_p90_s)} s, TPOT p50/p90 "
        f"{_fmt(report.tpot_p50_s)}/{_fmt(report.tpot_p90_s)} s, "
        f"{report.num_role_flips} flips, {report.num_failed} failed, "
        f"{report.num_clipped} clipped -> {cfg.out}"
    )
    return report


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(run_job(ServeTraceConfig, run))
