"""Benchmark warm starts on held-out generated Darcy instances, side by side.

    python jobs/bench_nows.py --out out/nows/bench.json

For each resolution (default 64 and 128) the same instances are solved with CG
and AMG-preconditioned CG at each tolerance (default 1e-3, 1e-5, 1e-6), cold
(x0 = 0, the plain solver) and warm from three guesses with the same
post-processing (for CG the two-grid refinement, counted in products with A):
the neural operator's prediction, the classical coarse-grid guess (a direct
solve on a grid twice as coarse, interpolated) and the zero guess, which shows
what the refinement does by itself. Prints the median matvec reduction and the
time reduction (guess time included) per setting, the guesses' relative
energy-norm errors before and after the post-processing, and cold+warm solves
per second with 1 vs all workers; ``--out FILE`` writes them as JSON and a PNG
next to it.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from raysys.runtime import init_ray, run_job
from raysys.runtime.config import OutputFile
from raysys.runtime.errors import RaysysError
from raysys.solvers.options import GuessOptions
from raysys.solvers.predictor import DEFAULT_MODEL

GUESSES = ("operator", "coarse-grid", "zero")

logger = logging.getLogger("bench_nows")


class BenchNowsConfig(GuessOptions):
    """Warm-start benchmark on held-out generated Darcy instances."""

    model: str = Field(str(DEFAULT_MODEL), description="saved Darcy operator")
    num_instances: int = Field(32, ge=1, description="instances per resolution")
    resolutions: list[Annotated[int, Field(ge=4, le=2048)]] = Field(
        [64, 128], min_length=1, description="grid sizes n (n x n), 4 to 2048"
    )
    solvers: list[Literal["cg", "gmres", "bicgstab", "amg-cg"]] = Field(
        ["cg", "amg-cg"], min_length=1, description="solvers to compare"
    )
    rtols: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [1e-3, 1e-5, 1e-6],
        min_length=1,
        description="relative tolerances, each above 0 and below 1",
    )
    seed: int = Field(
        2000, description="seed of the instances (the operator trained on 0 and 1)"
    )
    throughput_instances: int = Field(
        16, ge=0, description="instances of the 1-vs-all-workers run (0 skips it)"
    )
    throughput_resolution: int = Field(128, ge=4, le=2048, description="its grid size")
    timeout_s: float = Field(3600, gt=0, description="bound on each run")
    out: OutputFile | None = Field(None, description="JSON report path (optional)")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _records(results, resolution, settings):
    from raysys.solvers.reports import BenchRecord, summarise

    records = []
    for solver in settings.solvers:
        for rtol in settings.rtols:
            for guess in settings.guesses_for(solver):
                rows = [
                    r
                    for r in results
                    if r.solver == solver and r.rtol == rtol and r.guess == guess
                ]
                s = summarise(rows)
                done = [r for r in rows if r.ok]
                records.append(
                    BenchRecord(
                        resolution=resolution,
                        solver=solver,
                        rtol=rtol,
                        guess=guess,
                        median_matvec_reduction=s.median_matvec_reduction,
                        time_reduction=s.time_reduction,
                        time_reduction_without_guess=s.time_reduction_without_guess,
                        num_instances=s.num_instances,
                        num_failed=s.num_failed,
                        num_fallbacks=s.num_fallbacks,
                        num_converged_warm=s.num_converged_warm,
                        num_converged_cold=s.num_converged_cold,
                        median_iterations_cold=s.median_iterations_cold,
                        median_iterations_warm=s.median_iterations_warm,
                        median_matvecs_cold=_median(r.matvecs_cold for r in done),
                        median_matvecs_warm=_median(r.matvecs_warm for r in done),
                        median_matvecs_refinement=_median(
                            r.matvecs_refinement for r in done
                        ),
                        time_guess_per_instance_s=_median(r.time_guess_s for r in done),
                    )
                )
    return records


def _plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {name: k for k, name in enumerate(("cg", "gmres", "bicgstab", "amg-cg"))}
    groups = sorted(
        {(r.resolution, r.solver) for r in records},
        key=lambda g: (g[0], order.get(g[1], 9)),
    )
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6))
    axes = [axes] if len(groups) == 1 else list(axes)
    for ax, (res, solver) in zip(axes, groups, strict=True):
        rows = [r for r in records if r.resolution == res and r.solver == solver]
        rtols = sorted({r.rtol for r in rows}, reverse=True)
        guesses = [g for g in GUESSES if any(r.guess == g for r in rows)]
        width = 0.8 / len(guesses)
        for k, guess in enumerate(guesses):
            vals = [
                next(
                    (
                        100 * (r.median_matvec_reduction or 0)
                        for r in rows
                        if r.rtol == t and r.guess == guess
                    ),
                    0,
                )
                for t in rtols
            ]
            xs = [i + width * k for i in range(len(rtols))]
            ax.bar(xs, vals, width, label=guess)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(rtols))], [f"{t:g}" for t in rtols]
        )
        ax.set_xlabel("rtol")
        ax.set_ylabel("median matvec reduction (%)")
        ax.set_title(f"{solver}, {res}x{res}")
        ax.axhline(0, color="k", lw=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _energy_errors(instances, model, cfg):
    """Median relative energy-norm error of each guess before and after CG's
    post-processing (the refinement, or the sweeps without one)."""
    import numpy as np
    import torch

    from raysys.solvers.families import get_family
    from raysys.solvers.warmstart import (
        TwoGridRefinement,
        coarse_grid_guess,
        smooth,
    )

    fam = get_family("darcy")
    feats = np.stack([fam.features(i) for i in instances])
    with torch.no_grad():
        preds = model(torch.from_numpy(feats)).double().numpy()[:, 0]
    refine = cfg.refinement_settings()
    after = "refined" if refine is not None else f"{cfg.num_smoothing_sweeps}gs"
    errors: dict[str, list[float]] = {}
    for inst, pred in zip(instances, preds, strict=True):
        A, b = fam.assemble(inst)
        u = inst.reference.ravel()
        norm_u = float(np.sqrt(u @ (A @ u)))
        guesses = {
            "operator": pred.ravel(),
            "coarse-grid": coarse_grid_guess(fam, inst, cfg.coarse_factor),
        }
        if refine is not None:
            guesses["zero"] = np.zeros_like(b)
            refinement = TwoGridRefinement.for_instance(fam, inst, refine, A)
        for kind, guess in guesses.items():
            if refine is not None:
                post = refinement.refine(guess, b)[0]
            else:
                post = smooth(A, guess, b, cfg.num_smoothing_sweeps)
            for label, x in ((kind, guess), (f"{kind}+{after}", post)):
                e = x - u
                errors.setdefault(label, []).append(
                    float(np.sqrt(e @ (A @ e))) / norm_u
                )
    return {k: statistics.median(v) for k, v in errors.items()}


def main(cfg: BenchNowsConfig) -> None:
    import torch

    from raysys.solvers.datasets import generate_instances
    from raysys.solvers.predictor import load_model
    from raysys.solvers.reports import BenchReport
    from raysys.solvers.runner import check_model_fits, run_solves
    from raysys.solvers.worker import SolveSettings

    start = time.perf_counter()
    torch.set_num_threads(1)
    model = load_model(cfg.model)
    # the benchmark's instances are Darcy: another family's model is refused now
    check_model_fits(
        model, "darcy", data="the benchmark's data", fix="give a Darcy --model"
    )
    init_ray()
    settings = SolveSettings(
        solvers=tuple(cfg.solvers),
        rtols=tuple(cfg.rtols),
        num_smoothing_sweeps=cfg.num_smoothing_sweeps,
        guesses=GUESSES,
        coarse_factor=cfg.coarse_factor,
        refinement=cfg.refinement_settings(),
    )
    records = []
    energy: dict[str, float] = {}
    errors: list[str] = []
    for n in cfg.resolutions:
        try:
            instances = generate_instances("darcy", n, cfg.num_instances, cfg.seed)
            outcome = run_solves(
                instances,
                settings,
                model=model,
                batch_size=cfg.batch_size,
                timeout_s=cfg.timeout_s,
            )
            records += _records(outcome.results, n, settings)
            for k, v in _energy_errors(instances, model, cfg).items():
                energy[f"{n}/{k}"] = v
        except RaysysError as e:  # the other resolutions still run and are kept
            logger.error("resolution %d failed: %s", n, e)
            errors.append(f"{n}x{n}: {e}")

    throughput = []
    if cfg.throughput_instances:
        try:
            throughput = _throughput(cfg, model)
        except RaysysError as e:
            logger.error("the throughput run failed: %s", e)
            errors.append(f"throughput: {e}")

    report = BenchReport(
        config=cfg.model_dump(),
        model=cfg.model,
        results=records,
        throughput=throughput,
        relative_energy_error=energy,
        wall_time_s=time.perf_counter() - start,
        errors=errors,
    )
    print_table(report)
    if cfg.out:
        out = Path(cfg.out)
        report.write(out)
        if records:
            _plot(records, out.with_suffix(".png"))
        print(f"report {out.resolve()}  plot {out.with_suffix('.png').resolve()}")
    if errors:
        raise RaysysError("; ".join(errors))
    solved = sum(r.num_instances - r.num_failed for r in records)
    if not solved:
        raise RaysysError(
            "no solve succeeded in any setting; see the per-setting counts above"
        )


def _throughput(cfg, model):
    """Cold+warm CG solves per second with 1 worker and with all of them."""
    import ray

    from raysys.solvers.datasets import generate_instances
    from raysys.solvers.reports import ThroughputRecord
    from raysys.solvers.runner import run_solves
    from raysys.solvers.worker import SolveSettings

    n = cfg.throughput_resolution
    instances = generate_instances(
        "darcy", n, cfg.throughput_instances, cfg.seed + 1, with_reference=False
    )
    one = SolveSettings(
        solvers=("cg",),
        rtols=(1e-6,),
        num_smoothing_sweeps=cfg.num_smoothing_sweeps,
        refinement=cfg.refinement_settings(),
    )
    num_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    throughput = []
    for workers in (1, num_cpus):
        outcome = run_solves(
            instances,
            one,
            model=model,
            batch_size=cfg.batch_size,
            timeout_s=cfg.timeout_s,
            max_in_flight=workers,
            progress=False,
        )
        throughput.append(
            ThroughputRecord(
                resolution=n,
                num_workers=workers,
                num_solves=2 * len(instances),
                solves_per_s=2 * len(instances) / outcome.wall_time_s,
            )
        )
    return throughput


def print_table(report) -> None:
    """Side-by-side table of reductions, energy errors and throughput."""

    def pct(v):
        return "   n/a" if v is None else f"{100 * v:5.1f}%"

    def num(v):
        return "n/a" if v is None else f"{v:g}"

    print(
        f"{'n':>4} {'solver':<7} {'rtol':>6}  {'guess':<11} {'matvec red.':>11} "
        f"{'time red.':>9} {'(no guess)':>10}  {'iters cold->warm':>16}  "
        f"{'matvecs cold->warm (post)':>25}  fallbacks  converged"
    )
    for r in report.results:
        iters = f"{num(r.median_iterations_cold)}->{num(r.median_iterations_warm)}"
        mvs = (
            f"{num(r.median_matvecs_cold)}->{num(r.median_matvecs_warm)} "
            f"({num(r.median_matvecs_refinement)})"
        )
        print(
            f"{r.resolution:>4} {r.solver:<7} {r.rtol:>6.0e}  {r.guess:<11} "
            f"{pct(r.median_matvec_reduction):>11} {pct(r.time_reduction):>9} "
            f"{pct(r.time_reduction_without_guess):>10}  "
            f"{iters:>16}  {mvs:>25}  {r.num_fallbacks:>9}  "
            f"{r.num_converged_warm}/{r.num_instances - r.num_failed}"
        )
    print("median relative energy-norm error of the guesses:")
    for k, v in report.relative_energy_error.items():
        print(f"  {k:<28} {v:.4f}")
    for t in report.throughput:
        print(
            f"throughput at {t.resolution}x{t.resolution}: {t.num_workers} worker(s) "
            f"{t.solves_per_s:.1f} solves/s"
        )
    if len(report.throughput) == 2:
        ratio = report.throughput[1].solves_per_s / report.throughput[0].solves_per_s
        print(f"  all workers / 1 worker: {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(run_job(BenchNowsConfig, main))
