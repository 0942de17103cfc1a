"""NOWS: neural-operator warm starts for unchanged Krylov solvers, on Ray.

A Fourier neural operator (`raysys.models.fno`) trained on a PDE family predicts
each instance's solution; the solver starts from that prediction instead of
zero and runs to the same stopping rule. Modules, one role each:

- `families`: PDE families (Darcy, convection-diffusion) and their assembly;
- `fields`: Gaussian random fields and grid transfer;
- `datasets`: generation as Ray tasks and readers of benchmark and user files;
- `krylov`: solvers that count iterations and products with A the same way;
- `policy`: the plain warm-start policy (use the guess or fall back to zero);
- `warmstart`: the two-grid refinement of guesses and its cost, smoothing,
  the coarse-grid baseline guess, the warm-started solve;
- `training`: losses (relative L2, H1, energy norm, the energy error left
  after smoothing or after the refinement) and the training loop;
- `predictor`: batched predictions, locally or as a Ray actor;
- `worker`: the per-instance solve task;
- `runner`: fan-out of solves with streaming results;
- `reports`: the pydantic reports of the jobs.
"""
