"""Solve PDE instances cold (x0 = 0) and warm (x0 = neural-operator prediction).

    python jobs/nows_solve.py --generate 16 --resolution 64 --solver cg --rtol 1e-5 \
        --out out/nows/report.json
    python jobs/nows_solve.py --model DIR --data darcy_test_16.npz --solver amg-cg \
        --rtol 1e-6 --out report.json

Predictions are made in batches by an actor, solves fan out as Ray tasks and
stream back with a progress bar; a bad instance fails alone. Writes the JSON
report (per instance and a summary) and a PNG of cold vs warm iterations next to
it, and prints the summary.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raysys.runtime import init_ray, run_job
from raysys.runtime.config import OutputFile, check_plot_path
from raysys.runtime.errors import RaysysError
from raysys.solvers.options import GuessOptions
from raysys.solvers.predictor import DEFAULT_MODEL
from raysys.solvers.warmstart import RefinementSettings

logger = logging.getLogger("nows_solve")


class NowsSolveConfig(GuessOptions):
    """Solve instances cold and warm-started from a neural operator."""

    model: str = Field(
        str(DEFAULT_MODEL),
        description="saved operator directory (default: the pretrained 64x64 Darcy one)",
    )
    data: str | None = Field(
        None,
        description="instances file (.npz/.pt: FNO benchmark 'x', or 'a', or "
        "'vx','vy','epsilon'); exclusive with --generate",
    )
    generate: int | None = Field(None, ge=1, description="generate N instances")
    family: Literal["darcy", "convection-diffusion"] = Field(
        "darcy", description="PDE family of generated instances"
    )
    resolution: int = Field(64, ge=4, le=2048, description="grid size n (n x n)")
    seed: int = Field(
        1000, description="seed of generated instances (training used 0 and 1)"
    )
    solver: Literal["cg", "gmres", "bicgstab", "amg-cg"] = Field(
        "cg", description="Krylov solver"
    )
    rtol: float = Field(
        1e-5, ge=0, lt=1, description="relative tolerance on ||b - Ax|| (below 1)"
    )
    atol: float = Field(
        0.0, ge=0, description="absolute tolerance on ||b - Ax|| (finite)"
    )
    maxiter: int | None = Field(
        None, ge=1, description="iteration cap (default 10 x unknowns)"
    )
    guess: Literal["operator", "coarse-grid", "zero"] = Field(
        "operator",
        description="initial guess of the warm solve (zero: x0 = 0 through the "
        "refinement, to see what the refinement does alone)",
    )
    timeout_s: float = Field(3600, gt=0, description="bound on the whole run")
    out: OutputFile = Field(
        Path("out/nows/report.json"), description="JSON report path"
    )

    @model_validator(mode="after")
    def _check(self) -> NowsSolveConfig:
        check_plot_path(self.out, None)  # the plot goes next to the report
        if (self.data is None) == (self.generate is None):
            raise ValueError(
                "give exactly one of --data FILE or --generate N "
                f"(got data={self.data!r}, generate={self.generate!r})"
            )
        if self.family == "convection-diffusion" and self.solver in ("cg", "amg-cg"):
            raise ValueError(
                f"solver {self.solver!r} needs a symmetric matrix; "
                "convection-diffusion takes --solver gmres or bicgstab"
            )
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("rtol and atol are both 0: give a positive tolerance")
        if self.guess == "zero" and (
            self.refinement == "none" or self.solver not in ("cg",)
        ):
            raise ValueError(
                "--guess zero is x0 = 0 through the refinement, which applies to "
                "--solver cg with --refinement two-grid only"
            )
        return self


def plot_iterations(results, path: Path, title: str) -> None:
    """Scatter of cold vs warm iterations per instance, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    fig, ax = plt.subplots(figsize=(5, 5))
    cold = [r.iterations_cold for r in done]
    warm = [r.iterations_warm for r in done]
    ax.scatter(cold, warm, s=14, label="instance")
    fb = [r for r in done if r.fallback]
    if fb:
        ax.scatter(
            [r.iterations_cold for r in fb],
            [r.iterations_warm for r in fb],
            s=30,
            marker="x",
            color="red",
            label="fallback to x0 = 0",
        )
    top = max(cold + warm + [1])
    ax.plot([0, top], [0, top], "k--", lw=1, label="no saving")
    ax.set_xlabel("iterations, cold (x0 = 0)")
    ax.set_ylabel("iterations, warm")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: NowsSolveConfig) -> None:
    import time

    from raysys.solvers.datasets import generate_instances, load_instances
    from raysys.solvers.predictor import load_model
    from raysys.solvers.reports import SolveReport, summarise
    from raysys.solvers.runner import check_model_fits, run_solves
    from raysys.solvers.worker import SolveSettings

    start = time.perf_counter()
    model = load_model(cfg.model) if cfg.guess == "operator" else None
    # a bad file, or a model of another family, is refused before Ray starts
    instances = load_instances(cfg.data) if cfg.data is not None else None
    if model is not None:
        families = {i.family for i in instances} if instances else {cfg.family}
        for family in sorted(families):
            check_model_fits(
                model,
                family,
                data=cfg.data or "--family",
                fix="give a --model trained on that family (jobs/nows_train.py)",
            )
    init_ray()
    if instances is None:
        instances = generate_instances(
            cfg.family, cfg.resolution, cfg.generate, cfg.seed, with_reference=False
        )
    settings = SolveSettings(
        solvers=(cfg.solver,),
        rtols=(cfg.rtol,),
        atol=cfg.atol,
        maxiter=cfg.maxiter,
        num_smoothing_sweeps=cfg.num_smoothing_sweeps,
        guesses=(cfg.guess,),
        coarse_factor=cfg.coarse_factor,
        refinement=cfg.refinement_settings(),
    )
    outcome = run_solves(
        instances,
        settings,
        model=model,
        batch_size=cfg.batch_size,
        timeout_s=cfg.timeout_s,
    )
    summary = summarise(outcome.results)
    report = SolveReport(
        config=cfg.model_dump(),
        model=cfg.model if model is not None else None,
        family=instances[0].family if instances else cfg.family,
        solver=cfg.solver,
        rtol=cfg.rtol,
        atol=cfg.atol,
        num_smoothing_sweeps=settings.sweeps_for(cfg.solver),
        refinement=_describe(settings.refinement_for(cfg.solver)),
        instances=outcome.results,
        summary=summary,
        inference_time_s=outcome.inference_time_s,
        wall_time_s=time.perf_counter() - start,
    )
    out = Path(cfg.out)
    report.write(out)
    plot_path = check_plot_path(out, None)
    plot_iterations(
        outcome.results,
        plot_path,
        f"{cfg.solver}, rtol {cfg.rtol:g}, {cfg.guess} guess + "
        f"{post_processing(settings, cfg.solver)}",
    )
    print_summary(report, out, plot_path)
    if summary.num_failed == summary.num_instances:
        num_cold = sum(r.iterations_cold is not None for r in outcome.results)
        kept = (
            f"; the {num_cold} cold solves that ran are in the report"
            if num_cold
            else ""
        )
        raise RaysysError(
            f"none of the {summary.num_instances} instances was solved both ways "
            f"(see the errors above and in {out}){kept}"
        )


def _describe(refinement: RefinementSettings | None) -> dict[str, int] | None:
    return None if refinement is None else dict(vars(refinement))


def post_processing(settings, solver: str) -> str:
    """The guess's post-processing for ``solver`` in a few words."""
    refine = settings.refinement_for(solver)
    if refine is not None:
        return (
            f"two-grid refinement ({refine.num_pre_sweeps} + "
            f"{refine.num_post_sweeps} GS sweeps, coarse n/{refine.coarse_factor}"
            + (f", {refine.num_cycles} cycles" if refine.num_cycles > 1 else "")
            + ")"
        )
    return f"{settings.sweeps_for(solver)} GS sweeps"


def print_summary(report, out: Path, plot_path: Path) -> None:
    """The summary in a few lines, plus the failed instances' errors."""
    s = report.summary

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(
        f"NOWS {report.family} solve: {report.solver}, rtol {report.rtol:g}, "
        f"guess {report.config['guess']}, refinement {report.refinement or 'none'}"
    )
    print(
        f"  instances {s.num_instances}  failed {s.num_failed}  "
        f"fallbacks {s.num_fallbacks}  converged cold {s.num_converged_cold} "
        f"warm {s.num_converged_warm}"
    )
    print(
        f"  median iterations cold {s.median_iterations_cold}  "
        f"warm {s.median_iterations_warm}"
    )
    print(f"  median matvec reduction {pct(s.median_matvec_reduction)}")
    print(
        f"  time reduction (inference included) {pct(s.time_reduction)}  "
        f"[cold {s.total_time_cold_s:.3f} s, warm {s.total_time_warm_s:.3f} s + "
        f"guess {s.total_time_guess_s:.3f} s]; without the guess's time "
        f"{pct(s.time_reduction_without_guess)}"
    )
    for r in report.instances:
        if r.error:
            print(f"  FAILED {r.name}: {r.error}")
    print(f"  report {out.resolve()}  plot {plot_path.resolve()}")


if __name__ == "__main__":
    sys.exit(run_job(NowsSolveConfig, main))
