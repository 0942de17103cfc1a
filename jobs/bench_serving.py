"""Goodput of Arrow vs the best static prefill:decode split vs colocated serving.

In one run:

1. simulation: on a trace (default: the Azure LLM conversation trace) and a
   latency profile (default: Llama-3.1-70B on 4 H100s per instance, roofline
   estimate), the goodput of each policy on N instances: the highest request
   rate keeping at least 90% of requests within both SLOs. The static split is
   searched over every ratio 1:N-1 .. N-1:1; the even split is reported too.
   It also prints the fluid headroom: the most any role-adaptive policy could
   gain over the best fixed split on this trace (see
   `raysys.serving.simulator.adaptive_headroom`);
2. a small real run: the project's tiny Llama on instance actors of the local
   Ray cluster, the same trace clipped to the model's context, each policy at
   one rate, with SLO attainment side by side.

    python jobs/bench_serving.py --out out/serving/bench.json
    python jobs/bench_serving.py --trace ../shared/data/llm-traces/mooncake-synthetic.jsonl

Writes the JSON report (``goodput_rps`` per policy, the best static ratio,
``ratio_arrow_vs_static``) and PNG curves of SLO attainment against rate.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import time
from pathlib import Path

from pydantic import BaseModel, Field
from tqdm import tqdm

from raysys.runtime import Config, Report, init_ray, run_job
from raysys.runtime.config import OutputFile
from raysys.runtime.errors import RaysysError
from raysys.runtime.ray_env import PROJECT_ROOT
from raysys.serving.batching import EngineConfig
from raysys.serving.metrics import summarize
from raysys.serving.policy import ArrowConfig, SloTargets, make_policy
from raysys.serving.profile import LatencyProfile, RooflineAssumptions, resolve_profile
from raysys.serving.simulator import (
    GoodputResult,
    adaptive_headroom,
    check_slos_reachable,
    find_goodput,
    simulate,
)
from raysys.serving.trace import Trace, generate_shifting_trace, load_trace

logger = logging.getLogger("bench_serving")

AZURE_CONV = (
    PROJECT_ROOT.parent / "shared" / "data" / "llm-traces" / "azure-2023-conv.csv"
)


class BenchConfig(Config):
    """Arrow vs the best static split vs colocated: simulated goodput and a real run."""

    trace: Path | None = Field(
        AZURE_CONV,
        description="Azure .csv or Mooncake .jsonl trace; 'synthetic' or a missing "
        "default file: the built-in shifting trace",
    )
    instances: int = Field(8, ge=2, le=64, description="instances in simulation")
    profile: str = Field(
        "llama-3.1-70b@h100-sxm",
        description="latency profile: a JSON file or a MODEL@GPU roofline preset",
    )
    roofline: RooflineAssumptions = Field(
        default_factory=RooflineAssumptions,
        description="assumptions of a roofline preset (--set roofline.x=...)",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="local scheduler of every instance"
    )
    arrow: ArrowConfig = Field(
        default_factory=ArrowConfig, description="Arrow thresholds and cooldown"
    )
    ttft_slo_s: float = Field(3.0, gt=0, description="time-to-first-token target, s")
    tpot_slo_s: float = Field(0.1, gt=0, description="time-per-output-token target, s")
    target_attainment: float = Field(
        0.9, gt=0, le=1, description="share of requests within both SLOs"
    )
    max_requests: int | None = Field(
        None, ge=10, description="simulate only the first N requests"
    )
    start_scale: float = Field(4.0, gt=0, description="first rate scale tried")
    rel_tol: float = Field(0.03, gt=0, description="goodput search precision")
    curve_points: int = Field(
        8, ge=0, description="full runs per policy for the attainment curves"
    )
    real: bool = Field(True, description="also run the small real comparison")
    real_instances: int = Field(4, ge=2, description="instance actors in the real run")
    real_requests: int = Field(120, ge=4, description="requests in the real run")
    real_rate_scale: float = Field(
        1.0, gt=0, description="rate scale of the trace in the real run"
    )
    real_ttft_slo_s: float = Field(2.0, gt=0, description="real-run TTFT target, s")
    real_tpot_slo_s: float = Field(0.1, gt=0, description="real-run TPOT target, s")
    sim_workers: int = Field(
        2, ge=1, description="local processes running simulations in parallel"
    )
    sim_timeout_s: float = Field(
        6 * 3600.0, gt=0, description="bound on all simulations of one stage, s"
    )
    out: OutputFile = Field(
        Path("out/serving/bench.json"), description="JSON report path"
    )


class PolicyGoodput(BaseModel):
    """One policy's goodput search."""

    policy: str
    goodput_scale: float
    goodput_rps: float
    curve: list[tuple[float, float]]


class RealRunResult(BaseModel):
    """One policy on real instances."""

    policy: str
    rate_rps: float
    slo_attainment: float
    num_requests: int
    num_completed: int
    num_failed: int
    num_clipped: int
    num_role_flips: int
    num_fallbacks: int
    ttft_p90_s: float | None
    tpot_p90_s: float | None


class BenchReport(Report):
    """Goodput of each policy and the ratios between them."""

    trace: str
    num_requests: int
    trace_rate_rps: float
    profile: str
    profile_notes: str
    instances: int
    ttft_slo_s: float
    tpot_slo_s: float
    target_attainment: float
    goodput_rps: dict[str, float]
    best_static_ratio: str
    static_goodput_rps: dict[str, float]
    ratio_arrow_vs_static: float
    ratio_arrow_vs_even_split: float
    ratio_arrow_vs_colocated: float
    headroom_ratio: float
    headroom_best_static: str
    searches: list[PolicyGoodput]
    curves: dict[str, list[tuple[float, float]]]
    real: list[RealRunResult]
    real_profile: str
    wall_s: float


def read_trace(cfg: BenchConfig) -> Trace:
    if cfg.trace is None or str(cfg.trace) == "synthetic":
        trace = generate_shifting_trace()
    elif not cfg.trace.exists() and cfg.trace == AZURE_CONV:
        logger.warning(
            "the Azure conversation trace is not at %s; using the built-in shifting "
            "trace (pass --trace FILE to choose)",
            AZURE_CONV,
        )
        trace = generate_shifting_trace()
    else:
        trace = load_trace(cfg.trace)
    return trace.head(cfg.max_requests)


def _times(ratio: float | None) -> str:
    """A goodput ratio for the console; the JSON keeps inf and NaN as null."""
    if ratio is None or math.isnan(ratio):
        return "- (neither reaches the target)"
    if math.isinf(ratio):
        return "- (only arrow reaches the target)"
    return f"{ratio:.2f}x"


def ratio_label(num_prefill: int, num_instances: int) -> str:
    return f"{num_prefill}P:{num_instances - num_prefill}D"


def _search(
    name: str,
    num_prefill: int | None,
    profile: LatencyProfile,
    slo: SloTargets,
    trace: Trace,
    cfg: BenchConfig,
) -> GoodputResult:
    factory = functools.partial(
        make_policy, name, profile, slo, num_prefill=num_prefill, arrow=cfg.arrow
    )
    return find_goodput(
        factory,
        profile,
        trace,
        num_instances=cfg.instances,
        engine=cfg.engine,
        target=cfg.target_attainment,
        start_scale=cfg.start_scale,
        rel_tol=cfg.rel_tol,
    )


def _attainment(
    name: str,
    num_prefill: int | None,
    profile: LatencyProfile,
    slo: SloTargets,
    trace: Trace,
    cfg: BenchConfig,
    scale: float,
) -> float:
    factory = functools.partial(
        make_policy, name, profile, slo, num_prefill=num_prefill, arrow=cfg.arrow
    )
    result = simulate(
        factory,
        profile,
        trace,
        num_instances=cfg.instances,
        rate_scale=scale,
        engine=cfg.engine,
    )
    return result.attainment(slo)


def run_all(cfg: BenchConfig, calls: list[tuple], what: str) -> list:
    """Run ``(function, *args)`` calls on ``sim_workers`` processes, in order.

    Simulations are plain CPU work, so they run in local processes rather than
    on the Ray cluster. All of them together are bounded by ``sim_timeout_s``:
    past it the processes are stopped and the stage fails with how far it got
    (with one worker the runs go in this process, and the bound is checked
    between runs).

    Raises:
        RaysysError: the stage did not finish within ``sim_timeout_s``.
    """
    deadline = time.monotonic() + cfg.sim_timeout_s
    if cfg.sim_workers == 1:  # in this process: the bound holds between runs
        results = []
        for fn, *args in tqdm(calls, desc=what, unit="run"):
            if time.monotonic() > deadline:
                raise RaysysError(
                    f"{what}: {len(results)} of {len(calls)} simulations finished "
                    f"within --sim-timeout-s {cfg.sim_timeout_s:g} s"
                )
            results.append(fn(*args))
        return results
    workers = min(cfg.sim_workers, len(calls))
    with (
        multiprocessing.Pool(workers) as pool,
        tqdm(total=len(calls), desc=what, unit="run") as bar,
    ):
        pending = [pool.apply_async(fn, args) for fn, *args in calls]
        results = []
        for result in pending:
            try:
                results.append(result.get(max(deadline - time.monotonic(), 0.0)))
            except multiprocessing.TimeoutError:
                pool.terminate()
                raise RaysysError(
                    f"{what}: {len(results)} of {len(calls)} simulations finished "
                    f"within --sim-timeout-s {cfg.sim_timeout_s:g} s; the rest were "
                    "stopped (raise the bound, or shorten the trace with "
                    "--max-requests)"
                ) from None
            bar.update(1)
    return results


def simulate_policies(cfg: BenchConfig, trace: Trace, profile: LatencyProfile):
    slo = SloTargets(ttft_s=cfg.ttft_slo_s, tpot_s=cfg.tpot_slo_s)
    specs = [("arrow", None), ("colocated", None)]
    specs += [("static", k) for k in range(1, cfg.instances)]
    calls = [(_search, n, k, profile, slo, trace, cfg) for n, k in specs]
    results = run_all(cfg, calls, "goodput searches")
    by_name = {}
    for (name, k), result in zip(specs, results, strict=True):
        by_name[name if k is None else ratio_label(k, cfg.instances)] = result
    return by_name


def curves_for(cfg, trace, profile, chosen: dict[str, tuple[str, int | None]], top):
    """Full runs at evenly spaced scales from 0.4x to 1.4x the best goodput."""
    slo = SloTargets(ttft_s=cfg.ttft_slo_s, tpot_s=cfg.tpot_slo_s)
    if cfg.curve_points == 0 or top <= 0:
        return {}
    n = cfg.curve_points
    scales = [top * (0.4 + 1.0 * i / max(n - 1, 1)) for i in range(n)]
    jobs = [(label, scale) for label in chosen for scale in scales]
    calls = [
        (_attainment, *chosen[label], profile, slo, trace, cfg, scale)
        for label, scale in jobs
    ]
    values = run_all(cfg, calls, "attainment curves")
    curves: dict[str, list[tuple[float, float]]] = {label: [] for label in chosen}
    for (label, scale), value in zip(jobs, values, strict=True):
        curves[label].append((scale * trace.mean_rate_rps, value))
    return curves


def real_comparison(cfg: BenchConfig, trace: Trace, best_static: int):
    from raysys.serving.realrun import RealRunSettings, engine_profile, run_real

    settings = RealRunSettings()
    slo = SloTargets(ttft_s=cfg.real_ttft_slo_s, tpot_s=cfg.real_tpot_slo_s)
    profile = engine_profile(settings, None)
    part = trace.head(cfg.real_requests)
    # The best simulated split, mapped to the real pool's size.
    num_prefill = min(
        max(round(best_static * cfg.real_instances / cfg.instances), 1),
        cfg.real_instances - 1,
    )
    results = []
    for name, k in (("arrow", None), ("static", num_prefill), ("colocated", None)):
        outcome = run_real(
            part,
            name,
            cfg.real_instances,
            slo,
            settings,
            rate_scale=cfg.real_rate_scale,
            num_prefill=k,
            arrow=cfg.arrow,
            profile=profile,
        )
        summary = summarize(outcome.records, slo)
        label = name if k is None else f"static {ratio_label(k, cfg.real_instances)}"
        results.append(
            RealRunResult(
                policy=label,
                rate_rps=part.mean_rate_rps * cfg.real_rate_scale,
                slo_attainment=summary.slo_attainment,
                num_requests=summary.num_requests,
                num_completed=summary.num_completed,
                num_failed=summary.num_failed,
                num_clipped=outcome.num_clipped,
                num_role_flips=len(outcome.flips),
                num_fallbacks=outcome.policy.counters.num_fallbacks,
                ttft_p90_s=summary.ttft_p90_s,
                tpot_p90_s=summary.tpot_p90_s,
            )
        )
        logger.info("real %s: %s", label, results[-1])
    return results, profile


def run(cfg: BenchConfig) -> BenchReport:
    start = time.monotonic()
    trace = read_trace(cfg)
    profile = resolve_profile(cfg.profile, cfg.roofline)
    logger.info("trace %s: %s", trace.name, trace.summary())
    logger.info("profile %s: %s", profile.name, profile.notes)
    check_slos_reachable(
        trace, profile, cfg.ttft_slo_s, cfg.target_attainment, cfg.tpot_slo_s
    )
    results = simulate_policies(cfg, trace, profile)
    statics = {k: v for k, v in results.items() if k not in ("arrow", "colocated")}
    best_label = max(statics, key=lambda k: statics[k].goodput_scale)
    best_k = int(best_label.split("P")[0])
    even_label = ratio_label(cfg.instances // 2, cfg.instances)
    arrow, colocated = results["arrow"], results["colocated"]
    best = statics[best_label]

    def ratio(a: GoodputResult, b: GoodputResult) -> float:
        if b.goodput_scale > 0:
            return a.goodput_scale / b.goodput_scale
        return math.inf if a.goodput_scale > 0 else math.nan

    # Windows of the TTFT target's length at the rate Arrow sustains.
    window = cfg.ttft_slo_s * (arrow.goodput_scale or cfg.start_scale)
    headroom = adaptive_headroom(
        trace, profile, cfg.instances, window_s=window, tpot_s=cfg.tpot_slo_s
    )
    top = max(arrow.goodput_scale, colocated.goodput_scale, best.goodput_scale)
    curves = curves_for(
        cfg,
        trace,
        profile,
        {
            "arrow": ("arrow", None),
            f"static {best_label}": ("static", best_k),
            f"static {even_label}": ("static", cfg.instances // 2),
            "colocated": ("colocated", None),
        },
        top,
    )

    real, real_profile = [], ""
    if cfg.real:
        init_ray()
        real, measured = real_comparison(cfg, trace, best_k)
        real_profile = measured.notes

    report = BenchReport(
        trace=trace.name,
        num_requests=len(trace),
        trace_rate_rps=trace.mean_rate_rps,
        profile=profile.name,
        profile_notes=profile.notes,
        instances=cfg.instances,
        ttft_slo_s=cfg.ttft_slo_s,
        tpot_slo_s=cfg.tpot_slo_s,
        target_attainment=cfg.target_attainment,
        goodput_rps={
            "arrow": arrow.goodput_rps,
            "static_best": best.goodput_rps,
            "colocated": colocated.goodput_rps,
        },
        best_static_ratio=best_label,
        static_goodput_rps={k: v.goodput_rps for k, v in statics.items()},
        ratio_arrow_vs_static=ratio(arrow, best),
        ratio_arrow_vs_even_split=ratio(arrow, statics[even_label]),
        ratio_arrow_vs_colocated=ratio(arrow, colocated),
        headroom_ratio=headroom.ratio,
        headroom_best_static=ratio_label(headroom.best_num_prefill, cfg.instances),
        searches=[
            PolicyGoodput(
                policy=name,
                goodput_scale=r.goodput_scale,
                goodput_rps=r.goodput_rps,
                curve=r.curve,
            )
            for name, r in results.items()
        ],
        curves=curves,
        real=real,
        real_profile=real_profile,
        wall_s=time.monotonic() - start,
    )
    report.write(cfg.out)
    if curves:
        from raysys.serving.plots import plot_curves

        plot_curves(
            curves,
            cfg.target_attainment,
            cfg.out.with_suffix(".png"),
            title=(
                f"{trace.name}, {profile.name}, {cfg.instances} instances, "
                f"TTFT {cfg.ttft_slo_s:g} s, TPOT {cfg.tpot_slo_s:g} s"
            ),
        )

    print(
        f"trace {trace.name} ({len(trace)} requests), {profile.name}, "
        f"{cfg.instances} instances, SLO TTFT {cfg.ttft_slo_s:g} s / TPOT "
        f"{cfg.tpot_slo_s:g} s at {cfg.target_attainment:.0%}"
    )
    print(f"  goodput arrow      {arrow.goodput_rps:8.2f} req/s")
    which = (
        f"best split {best_label}"
        if best.goodput_scale > 0
        else f"no split reaches {cfg.target_attainment:.0%}"
    )
    print(f"  goodput static     {best.goodput_rps:8.2f} req/s ({which})")
    print(f"  goodput colocated  {colocated.goodput_rps:8.2f} req/s")
    for label, r in statics.items():
        print(f"    static {label:<7} {r.goodput_rps:8.2f} req/s")
    print(f"  arrow / best static  {_times(report.ratio_arrow_vs_static)}")
    print(f"  arrow / {even_label} split {_times(report.ratio_arrow_vs_even_split)}")
    print(f"  arrow / colocated    {_times(report.ratio_arrow_vs_colocated)}")
    print(
        f"  fluid headroom of any role-adaptive policy over the best split: "
        f"{headroom.ratio:.2f}x (prefill share of work "
        f"{headroom.prefill_share_min:.2f}-{headroom.prefill_share_max:.2f} "
        f"over {window:.0f} s windows)"
    )
    for r in real:
        print(
            f"  real {r.policy:<16} at {r.rate_rps:.2f} req/s: SLO attainment "
            f"{r.slo_attainment:.3f}, {r.num_completed}/{r.num_requests} done, "
            f"{r.num_role_flips} flips, {r.num_fallbacks} fallbacks"
        )
    print(f"report: {cfg.out}")
    return report


if __name__ == "__main__":
    raise SystemExit(run_job(BenchConfig, run))
