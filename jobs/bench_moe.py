"""Benchmark SP-MoE: the target alone, SD on demand and SD with prefetch, side by side.

    python jobs/bench_moe.py --out out/moe/bench.json

One engine (one set of expert hosts, one cache of at most a quarter of all
experts) runs the three modes prompt by prompt, interleaved, so every mode sees
the same machine load; then sd-prefetch runs once per cutoff (0 .. L) for the
sweep. Prints TPOT per mode and the speedups, checks that greedy outputs agree,
writes JSON and plots TPOT against the cutoff (``<out>.png``).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
from pathlib import Path

from pydantic import Field, model_validator

from raysys.moe.cache import EvictionPolicy
from raysys.moe.engine import (
    MODES,
    MoEEngine,
    MoEEngineConfig,
    SequenceRun,
    cache_capacity,
    store_facts,
)
from raysys.moe.prompts import DEFAULT_TEMPLATE, read_prompts
from raysys.moe.reports import GenerationReport, fmt_figure
from raysys.runtime import ConfigError, Report, run_job
from raysys.runtime.config import OutputFile

logger = logging.getLogger("bench_moe")


class BenchConfig(MoEEngineConfig):
    """The three modes side by side, and a sweep over the prefetch cutoff."""

    prompts: str | None = Field(
        None, description="JSON-lines prompt file (default: built-in prompts)"
    )
    num_prompts: int | None = Field(None, ge=1, description="first N prompts only")
    prompt_template: str = Field(
        DEFAULT_TEMPLATE, description="framing of file prompts; {prompt} is replaced"
    )
    cache_policy: EvictionPolicy = Field(
        "layer-lru",
        description="eviction of every mode's cache; layer-lru (even slots per "
        "layer, LRU within each) is the mixtral-offloading baseline",
    )
    max_new_tokens: int = Field(96, ge=2, description="tokens per prompt")
    sweep: bool = Field(True, description="also sweep sd-prefetch over every cutoff")
    out: OutputFile = Field(Path("out/moe/bench.json"), description="report JSON path")

    @model_validator(mode="after")
    def _greedy_only(self) -> BenchConfig:
        if self.temperature != 0:
            raise ValueError(
                "the benchmark compares greedy outputs across modes; use temperature 0"
            )
        return self


class ModeSummary(Report):
    """The headline numbers of one mode."""

    tpot_ms: float | None = Field(description="time per output token")
    tokens_per_s: float = Field(description="tokens over wall time")
    acceptance_rate: float | None = Field(description="drafted tokens accepted")
    cache_hit_rate: float | None = Field(description="lookups ready in the cache")
    bytes_fetched: int = Field(description="bytes moved while decoding")
    stall_ms_per_token: float | None = Field(description="waiting for experts")
    experts_per_pass: float | None = Field(
        description="distinct experts one decoding target pass routes to"
    )
    held_needed_per_pass: float | None = Field(
        description="of those, held in the cache when the pass's round began"
    )
    link_floor_ms_per_token: float | None = Field(
        description="link time per token no cache policy or prefetch can avoid"
    )


class BenchReport(Report):
    """TPOT of the three modes, speedups, and TPOT against the cutoff."""

    tpot_ms: dict[str, float | None] = Field(
        description="per mode: ar, sd, sd-prefetch"
    )
    speedup_vs_sd: float | None = Field(description="TPOT of sd over sd-prefetch")
    speedup_vs_ar: float | None = Field(description="TPOT of ar over sd-prefetch")
    speedup_vs_sd_median: float | None = Field(
        description="median over prompts of the per-prompt TPOT ratio sd/sd-prefetch"
    )
    speedup_vs_ar_median: float | None = Field(
        description="median over prompts of the per-prompt TPOT ratio ar/sd-prefetch"
    )
    prefetch_recall: float | None = Field(
        description="routed experts below the cutoff that were predicted"
    )
    predictor_recall: float | None = Field(description="the same over every layer")
    cutoff: int | None = Field(description="cutoff of the sd-prefetch mode")
    cutoff_decision: dict | None = Field(description="the policy's prediction")
    sweep_tpot_ms: dict[int, float | None] = Field(
        description="sd-prefetch TPOT per cutoff"
    )
    outputs_identical: bool = Field(description="greedy outputs equal in every run")
    cache_experts: int = Field(description="cache capacity in experts")
    cache_policy: str = Field(description="eviction policy of every mode's cache")
    num_experts_total: int = Field(description="experts of the model")
    expert_bytes: int = Field(description="bytes per expert transfer")
    link_bandwidth_bytes_per_s: float | None = Field(description="modelled link")
    link_ms_per_expert: float = Field(description="modelled time per expert")
    fetch_real_ms_mean: float | None = Field(
        description="measured Ray get per expert, without the link model"
    )
    draft_length: int = Field(description="tokens drafted per round")
    max_new_tokens: int = Field(description="budget per prompt")
    num_prompts: int = Field(description="prompts per mode")
    load_average: list[float] = Field(description="1/5/15-minute load at the end")
    modes: dict[str, ModeSummary] = Field(description="headline numbers per mode")
    reports: dict[str, GenerationReport] = Field(description="full report per mode")


def _summary(report: GenerationReport) -> ModeSummary:
    return ModeSummary(
        tpot_ms=report.tpot_ms,
        tokens_per_s=report.tokens_per_s,
        acceptance_rate=report.acceptance_rate,
        cache_hit_rate=report.cache_hit_rate,
        bytes_fetched=report.bytes_fetched,
        stall_ms_per_token=report.stall_ms_per_token,
        experts_per_pass=report.experts_per_pass,
        held_needed_per_pass=report.held_needed_per_pass,
        link_floor_ms_per_token=report.link_floor_ms_per_token,
    )


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


def _median_ratio(slow: GenerationReport, fast: GenerationReport) -> float | None:
    ratios = [
        _ratio(a.tpot_ms, b.tpot_ms)
        for a, b in zip(slow.outputs, fast.outputs, strict=True)
    ]
    ratios = [r for r in ratios if r is not None]
    return statistics.median(ratios) if ratios else None


def main(cfg: BenchConfig) -> BenchReport:
    prompts = read_prompts(cfg.prompts, cfg.num_prompts, cfg.prompt_template)
    expert_nbytes, num_experts = store_facts(cfg)
    # The engine's default cache is a quarter of the experts, at least one: a
    # model of fewer than 4 experts gets one, and the bench must accept it.
    capacity, quarter = (
        cache_capacity(cfg, expert_nbytes, num_experts),
        max(1, num_experts // 4),
    )
    if capacity > quarter:
        asked = (
            f"cache_bytes {cfg.cache_bytes} ({capacity} experts)"
            if cfg.cache_bytes is not None
            else f"cache_experts {capacity}"
        )
        raise ConfigError(
            f"{asked} is more than a quarter of the {num_experts} experts; the "
            f"benchmark needs --cache-experts <= {quarter}"
        )
    with MoEEngine(MoEEngineConfig.of(cfg)) as engine:
        if engine.mode != "sd-prefetch":  # else the engine has chosen it already
            engine.set_mode("sd-prefetch", cfg.cutoff)
        cutoff, decision = engine.cutoff, engine.decision

        # The three modes, interleaved prompt by prompt.
        runs: dict[str, list[SequenceRun]] = {m: [] for m in MODES}
        for i, prompt in enumerate(prompts):
            for mode in MODES:
                engine.set_mode(mode, cutoff if mode == "sd-prefetch" else None)
                runs[mode].append(
                    engine.run_sequence(prompt, cfg.max_new_tokens, seed=i)
                )
            logger.info("prompt %d/%d done", i + 1, len(prompts))
        reports = {}
        for mode in MODES:
            engine.set_mode(mode, cutoff if mode == "sd-prefetch" else None)
            reports[mode] = engine.report(runs[mode], cfg.max_new_tokens)
        engine.decision = decision

        # The sweep over cutoffs, interleaved the same way.
        sweep: dict[int, list[SequenceRun]] = {}
        if cfg.sweep:
            cutoffs = list(range(engine.num_layers + 1))
            sweep = {c: [] for c in cutoffs}
            for i, prompt in enumerate(prompts):
                for c in cutoffs:
                    engine.set_mode("sd-prefetch", c)
                    sweep[c].append(
                        engine.run_sequence(prompt, cfg.max_new_tokens, seed=i)
                    )
        sweep_tpot = {
            c: engine.report(r, cfg.max_new_tokens).tpot_ms for c, r in sweep.items()
        }

    outputs = [[o.token_ids for o in r.outputs] for r in reports.values()]
    outputs += [[run.trace.tokens for run in r] for r in sweep.values()]
    tpot = {mode: r.tpot_ms for mode, r in reports.items()}
    prefetch = reports["sd-prefetch"]
    bench = BenchReport(
        tpot_ms=tpot,
        speedup_vs_sd=_ratio(tpot["sd"], tpot["sd-prefetch"]),
        speedup_vs_ar=_ratio(tpot["ar"], tpot["sd-prefetch"]),
        speedup_vs_sd_median=_median_ratio(reports["sd"], prefetch),
        speedup_vs_ar_median=_median_ratio(reports["ar"], prefetch),
        prefetch_recall=prefetch.prefetch_recall,
        predictor_recall=prefetch.predictor_recall,
        cutoff=cutoff,
        cutoff_decision=prefetch.cutoff_decision,
        sweep_tpot_ms=sweep_tpot,
        outputs_identical=all(o == outputs[0] for o in outputs),
        cache_experts=prefetch.cache_experts,
        cache_policy=cfg.cache_policy,
        num_experts_total=prefetch.num_experts_total,
        expert_bytes=prefetch.expert_bytes,
        link_bandwidth_bytes_per_s=prefetch.link_bandwidth_bytes_per_s,
        link_ms_per_expert=prefetch.link_ms_per_expert,
        fetch_real_ms_mean=prefetch.fetch_real_ms_mean,
        draft_length=cfg.draft_length,
        max_new_tokens=cfg.max_new_tokens,
        num_prompts=len(prompts),
        load_average=list(os.getloadavg()),
        modes={mode: _summary(r) for mode, r in reports.items()},
        reports=reports,
    )
    out = Path(cfg.out)
    bench.write(out)
    _plot(bench, out.with_suffix(".png"))
    _print(bench, out)
    return bench


def _print(bench: BenchReport, out: Path) -> None:
    print(
        f"cache {bench.cache_experts} of {bench.num_experts_total} experts "
        f"({bench.cache_policy}), link "
        f"{bench.link_ms_per_expert:.2f} ms/expert (real Ray get "
        f"{bench.fetch_real_ms_mean or 0:.2f} ms), draft length {bench.draft_length}"
    )
    for mode, summary in bench.modes.items():
        print(
            f"  {mode:<12} TPOT {fmt_figure(summary.tpot_ms, '7.2f', ' ms')}  acceptance "
            f"{fmt_figure(summary.acceptance_rate, '.3f')}"
            f"  cache hits {fmt_figure(summary.cache_hit_rate, '.3f')}  stall "
            f"{fmt_figure(summary.stall_ms_per_token, '.2f', ' ms/token')}  experts/pass "
            f"{fmt_figure(summary.experts_per_pass, '.1f')} (held "
            f"{fmt_figure(summary.held_needed_per_pass, '.1f')})  link floor "
            f"{fmt_figure(summary.link_floor_ms_per_token, '.2f', ' ms/token')}"
        )
    print(
        f"sd-prefetch (cutoff {bench.cutoff}) is {fmt_figure(bench.speedup_vs_sd, '.2f', 'x')} "
        f"faster per token than sd and {fmt_figure(bench.speedup_vs_ar, '.2f', 'x')} faster "
        f"than ar; prefetch recall {fmt_figure(bench.prefetch_recall, '.3f')}"
    )
    print(
        f"median per-prompt speedups: {fmt_figure(bench.speedup_vs_sd_median, '.2f', 'x')} "
        f"vs sd, {fmt_figure(bench.speedup_vs_ar_median, '.2f', 'x')} vs ar"
    )
    if bench.sweep_tpot_ms:
        row = ", ".join(
            f"{c}: {fmt_figure(t, '.2f')}" for c, t in bench.sweep_tpot_ms.items()
        )
        print(f"TPOT (ms) by cutoff: {row}")
    print(f"greedy outputs identical in every run: {bench.outputs_identical}")
    print(f"report: {out}, plot: {out.with_suffix('.png')}")


def _plot(bench: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if bench.sweep_tpot_ms:
        cutoffs = list(bench.sweep_tpot_ms)
        ax.plot(
            cutoffs,
            list(bench.sweep_tpot_ms.values()),
            "o-",
            label="sd-prefetch (measured)",
        )
        decision = bench.cutoff_decision
        per_round = bench.reports["sd-prefetch"].tokens_per_round
        if decision and per_round:
            predicted = [t / per_round for t in decision["predicted_round_ms"]]
            ax.plot(cutoffs, predicted, "s--", alpha=0.7, label="policy model")
        ax.set_xticks(cutoffs)
    for mode, style in (("ar", ":"), ("sd", "--")):
        if bench.tpot_ms.get(mode):
            ax.axhline(bench.tpot_ms[mode], ls=style, color="grey")
            ax.annotate(
                mode,
                (0, bench.tpot_ms[mode]),
                textcoords="offset points",
                xytext=(2, 3),
                color="grey",
            )
    if bench.cutoff is not None:
        ax.axvline(
            bench.cutoff, color="green", lw=0.8, label=f"chosen cutoff {bench.cutoff}"
        )
    ax.set_xlabel("prefetch cutoff (layers prefetched while drafting)")
    ax.set_ylabel("TPOT (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"cache {bench.cache_experts}/{bench.num_experts_total} experts, "
        f"{bench.link_ms_per_expert:.1f} ms per expert transfer"
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run_job(BenchConfig, main))
