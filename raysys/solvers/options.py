"""Options of the warm-start guess shared by the solve and benchmark jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raysys.runtime import Config
from raysys.solvers.warmstart import RefinementSettings

REFINE = RefinementSettings()


class GuessOptions(Config):
    """How every guess is post-processed before the warm solve (each product counted).

    Job configs inherit these fields, so `nows_solve` and `bench_nows` take the
    same flags with the same defaults.
    """

    refinement: Literal["two-grid", "none"] = Field(
        "two-grid",
        description="post-processing of every cg guess: a two-grid cycle "
        "(counted in products with A), or plain sweeps",
    )
    refine_coarse_factor: int = Field(
        REFINE.coarse_factor, ge=2, description="refinement's coarse grid: n // this"
    )
    refine_pre_sweeps: int = Field(
        REFINE.num_pre_sweeps, ge=0, description="sweeps before the coarse correction"
    )
    refine_post_sweeps: int = Field(
        REFINE.num_post_sweeps, ge=0, description="sweeps after the coarse correction"
    )
    refine_cycles: int = Field(REFINE.num_cycles, ge=1, description="two-grid cycles")
    num_smoothing_sweeps: int = Field(
        2,
        ge=0,
        description="Gauss-Seidel sweeps on the guess where no refinement applies "
        "(gmres, bicgstab, --refinement none; each counted)",
    )
    coarse_factor: int = Field(2, ge=2, description="coarsening of the coarse guess")
    batch_size: int = Field(16, ge=1, description="instances per prediction batch")

    def refinement_settings(self) -> RefinementSettings | None:
        """The two-grid refinement asked for (None: plain sweeps)."""
        if self.refinement == "none":
            return None
        return RefinementSettings(
            coarse_factor=self.refine_coarse_factor,
            num_pre_sweeps=self.refine_pre_sweeps,
            num_post_sweeps=self.refine_post_sweeps,
            num_cycles=self.refine_cycles,
        )
