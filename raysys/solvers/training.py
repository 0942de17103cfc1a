"""Train a `FNO` on solver-generated pairs (instance fields -> reference solution).

Losses (per sample, averaged over the batch):

- ``l2``: relative L2 error ``||u_pred - u|| / ||u||``;
- ``h1``: relative discrete H1 error (values plus finite-difference gradients);
- ``energy``: relative energy-norm error ``||u_pred - u||_A / ||u||_A`` of the
  Darcy operator with harmonic face averages (`darcy_energy`). CG's saving
  from a warm start is about ``log(||e0||_A / ||u||_A) / log(1 / rtol)`` of its
  iterations, so this is the error to make small, not the L2 one.
- ``energy+l2``: their sum.
- ``smoothed-energy``: the relative energy-norm error left after two damped
  Jacobi sweeps on the error (`jacobi_smoothed`). The warm start smooths the
  prediction with Gauss-Seidel sweeps before the solver sees it, which removes
  the high-frequency error cheaply; this loss spends the network's capacity on
  the smooth error that remains and that CG is slow to remove.
- ``refined-energy``: the relative energy-norm error left after a model of
  the warm start's two-grid refinement (`two_grid_refined`: damped Jacobi
  sweeps standing in for its Gauss-Seidel sweeps, then its coarse-grid
  correction with the energy step, on the same rediscretised coarse grid),
  plus the relative L2 error. The refinement removes rough and smooth error
  cheaply; this loss spends the network on the error it leaves, which is what
  CG then has to remove. The L2 term keeps every value of the prediction
  meaningful.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
import torch.nn.functional as F

from raysys.models.fno import FNO, FNOConfig
from raysys.runtime import bounded_get
from raysys.runtime.errors import RaysysError
from raysys.solvers.errors import TrainingDiverged
from raysys.solvers.families import Instance, get_family
from raysys.solvers.fields import interpolation_weights

logger = logging.getLogger(__name__)

LOSSES = ("l2", "h1", "energy", "energy+l2", "smoothed-energy", "refined-energy")
NUM_LOSS_SWEEPS = 2
JACOBI_DAMPING = 0.8
# the refinement modelled by the refined-energy loss (that of RefinementSettings)
REFINED_LOSS_SWEEPS = 3
REFINED_LOSS_COARSE_FACTOR = 4


@dataclass
class TrainSettings:
    """Optimisation settings of `train_operator`."""

    epochs: int = 100
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    loss: str = "energy"
    seed: int = 0
    max_train_s: float | None = None
    device: str = "cpu"


@dataclass
class TrainHistory:
    """Per-epoch losses and the final errors."""

    epoch_losses: list[float] = field(default_factory=list)
    epoch_test_l2: list[float] = field(default_factory=list)
    train_time_s: float = 0.0
    num_epochs: int = 0


def stack_pairs(
    instances: Sequence[Instance],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, C, n, n) and reference solutions (N, 1, n, n) as float32."""
    if not instances:
        raise ValueError("no instances to stack; generate or read some first")
    fam = get_family(instances[0].family)
    missing = [inst.name for inst in instances if inst.reference is None]
    if missing:
        raise ValueError(
            f"{len(missing)} instances lack a reference solution (first: "
            f"{missing[0]}); generate with references"
        )
    x = np.stack([fam.features(inst) for inst in instances])
    y = np.stack([inst.reference[None] for inst in instances])
    return torch.from_numpy(x).float(), torch.from_numpy(y).float()


def _faces(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmonic face coefficients: x faces (B, n, n-1), y faces (B, n-1, n)."""
    ax = 2 * a[:, :, :-1] * a[:, :, 1:] / (a[:, :, :-1] + a[:, :, 1:])
    ay = 2 * a[:, :-1, :] * a[:, 1:, :] / (a[:, :-1, :] + a[:, 1:, :])
    return ax, ay


def _edge(a: torch.Tensor) -> torch.Tensor:
    """(B, n, n) coefficients of the faces to the boundary, summed per node."""
    edge = torch.zeros_like(a)
    edge[:, :, 0] += a[:, :, 0]
    edge[:, :, -1] += a[:, :, -1]
    edge[:, 0, :] += a[:, 0, :]
    edge[:, -1, :] += a[:, -1, :]
    return edge


def darcy_apply(e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``h^2 A e`` for the harmonic-average Darcy matrix A, as a stencil.

    Args:
        e: (B, n, n) fields; a: (B, n, n) coefficients.

    Returns:
        (B, n, n).
    """
    ax, ay = _faces(a)
    fx = ax * (e[:, :, 1:] - e[:, :, :-1])  # (B, n, n-1) flux across x faces
    fy = ay * (e[:, 1:, :] - e[:, :-1, :])  # (B, n-1, n)
    out = F.pad(-fx, (0, 1)) + F.pad(fx, (1, 0))
    out = out + F.pad(-fy, (0, 0, 0, 1)) + F.pad(fy, (0, 0, 1, 0))
    return out + _edge(a) * e


def darcy_diagonal(a: torch.Tensor) -> torch.Tensor:
    """(B, n, n) diagonal of ``h^2 A``: the sum of each node's face coefficients."""
    ax, ay = _faces(a)
    out = F.pad(ax, (0, 1)) + F.pad(ax, (1, 0))
    return out + F.pad(ay, (0, 0, 0, 1)) + F.pad(ay, (0, 0, 1, 0)) + _edge(a)


def jacobi_smoothed(
    e: torch.Tensor, a: torch.Tensor, num_sweeps: int, damping: float
) -> torch.Tensor:
    """The error after damped Jacobi sweeps: ``e <- e - w D^-1 A e``, (B, n, n)."""
    diag = darcy_diagonal(a)
    for _ in range(num_sweeps):
        e = e - damping * darcy_apply(e, a) / diag
    return e


@functools.lru_cache(maxsize=8)
def _grid_weights(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D weights: prolongation (n, m) with zero boundary, and the coefficient
    resampling (m, n) of `raysys.solvers.fields.resample`."""
    prolong = interpolation_weights(m, n, zero_boundary=True)
    coeff = interpolation_weights(n, m, zero_boundary=False)
    return torch.from_numpy(prolong), torch.from_numpy(coeff)  # float64


def two_grid_refined(
    e: torch.Tensor, a: torch.Tensor, num_sweeps: int, coarse_factor: int
) -> torch.Tensor:
    """The error after a model of the warm start's two-grid refinement, (B, n, n).

    ``num_sweeps`` damped Jacobi sweeps (for the refinement's Gauss-Seidel
    sweeps), then the correction ``d = -P Ac^-1 P' A e`` with bilinear P and the
    Darcy matrix ``Ac`` of the coefficients resampled to the m x m grid
    (`raysys.solvers.warmstart.TwoGridRefinement`; the grid scalings cancel in
    the error form), then ``e + t d`` with the energy step
    ``t = -d'Ae / d'Ad``. Differentiable in ``e``; ``a`` is data.
    """
    n = e.shape[-1]
    m = max(2, n // coarse_factor)
    e = jacobi_smoothed(e, a, num_sweeps, JACOBI_DAMPING)
    prolong, coeff = (w.to(e.device, e.dtype) for w in _grid_weights(n, m))
    with torch.no_grad():
        a_c = coeff @ a @ coeff.T  # (B, m, m)
        basis = torch.eye(m * m, device=e.device, dtype=e.dtype).reshape(-1, m, m)
        batch = a_c.shape[0]
        columns = darcy_apply(
            basis.repeat(batch, 1, 1), a_c.repeat_interleave(m * m, dim=0)
        )
        coarse = columns.reshape(batch, m * m, m * m).transpose(1, 2)
        chol = torch.linalg.cholesky(coarse)
    Ae = darcy_apply(e, a)
    rhs = (prolong.T @ Ae @ prolong).reshape(-1, m * m, 1)
    d = -(prolong @ torch.cholesky_solve(rhs, chol).reshape(-1, m, m) @ prolong.T)
    Ad = darcy_apply(d, a)
    t = -(d * Ae).sum((1, 2)) / (d * Ad).sum((1, 2)).clamp_min(1e-30)
    return e + t[:, None, None] * d


def darcy_energy(e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``h^2 e'Ae`` per sample for the harmonic-average Darcy matrix A.

    Args:
        e: (B, n, n) error fields.
        a: (B, n, n) coefficients.

    Returns:
        (B,) energies; faces to the boundary carry the node's coefficient, as in
        `raysys.solvers.families.darcy_matrix`.
    """
    ax, ay = _faces(a)
    inner = (ax * (e[:, :, 1:] - e[:, :, :-1]) ** 2).sum((1, 2))
    inner = inner + (ay * (e[:, 1:, :] - e[:, :-1, :]) ** 2).sum((1, 2))
    return inner + (_edge(a) * e**2).sum((1, 2))


def _rel(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(num / den.clamp_min(1e-30))


def relative_errors(
    pred: torch.Tensor,
    target: torch.Tensor,
    features: torch.Tensor,
    family: str,
    *,
    refined: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-sample relative errors: ``l2``, ``h1`` and, for Darcy, ``energy``,
    ``smoothed-energy`` and (with ``refined``) ``refined-energy``.

    Args:
        pred, target: (B, 1, n, n).
        features: (B, C, n, n) un-normalised inputs (channel 0 is ``a`` for Darcy).
        refined: also the error after the modelled refinement (a coarse
            factorisation per sample, so only when asked for).
    """
    e = (pred - target)[:, 0]  # (B, n, n)
    u = target[:, 0]
    out = {"l2": _rel((e**2).sum((1, 2)), (u**2).sum((1, 2)))}

    def grad_sq(v: torch.Tensor) -> torch.Tensor:
        n = v.shape[-1]
        gx = torch.diff(v, dim=2) * (n + 1)
        gy = torch.diff(v, dim=1) * (n + 1)
        return (v**2).sum((1, 2)) + (gx**2).sum((1, 2)) + (gy**2).sum((1, 2))

    out["h1"] = _rel(grad_sq(e), grad_sq(u))
    if family == "darcy":
        a = features[:, 0]
        out["energy"] = _rel(darcy_energy(e, a), darcy_energy(u, a))
        smoothed = jacobi_smoothed(e, a, NUM_LOSS_SWEEPS, JACOBI_DAMPING)
        out["smoothed-energy"] = _rel(darcy_energy(smoothed, a), darcy_energy(u, a))
        if refined:
            left = two_grid_refined(
                e, a, REFINED_LOSS_SWEEPS, REFINED_LOSS_COARSE_FACTOR
            )
            out["refined-energy"] = _rel(darcy_energy(left, a), darcy_energy(u, a))
    return out


def loss_function(name: str, family: str) -> Callable[..., torch.Tensor]:
    """The batch loss called ``name`` (see the module docstring).

    Raises:
        ValueError: unknown loss, or an energy loss for a non-Darcy family.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if "energy" in name and family != "darcy":
        raise ValueError(
            f"loss {name!r} needs the Darcy energy; for {family!r} use 'l2' or 'h1'"
        )

    def loss(pred, target, features):
        errs = relative_errors(
            pred, target, features, family, refined=name == "refined-energy"
        )
        if name == "energy+l2":
            return (errs["energy"] + errs["l2"]).mean()
        if name == "refined-energy":
            return (errs["refined-energy"] + errs["l2"]).mean()
        return errs[name].mean()

    return loss


def _progress(
    step: int, total_steps: int, start: float, max_train_s: float | None
) -> float:
    """Fraction of training done: by steps, or by time when a budget is set."""
    done = step / max(total_steps, 1)
    if max_train_s is not None:
        done = max(done, (time.perf_counter() - start) / max_train_s)
    return min(done, 1.0)


def _learning_rate(peak: float, progress: float, warmup: float = 0.03) -> float:
    """Linear warm-up to ``peak``, then cosine decay to zero at progress 1."""
    if progress < warmup:
        return peak * (progress + 1e-3) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def build_model(config: FNOConfig, train_x: torch.Tensor, train_y: torch.Tensor) -> FNO:
    """A fresh model whose normalisation comes from the training data."""
    model = FNO(config)
    model.set_normalisation(train_x, train_y)
    return model


@torch.no_grad()
def evaluate(
    model: FNO,
    x: torch.Tensor,
    y: torch.Tensor,
    family: str,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, float]:
    """Mean relative errors of ``model`` on (x, y)."""
    model.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        errs = relative_errors(model(xb), yb, xb, family)
        for k, v in errs.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    return {k: v / len(x) for k, v in sums.items()}


def train_operator(
    model: FNO,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    family: str,
    settings: TrainSettings,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
) -> TrainHistory:
    """Train ``model`` in place with AdamW and a cosine learning-rate decay.

    With ``settings.max_train_s`` the schedule follows whichever runs out first,
    the epochs or the time, so the rate has decayed when training stops.

    Args:
        train, test: (features (N, C, n, n), references (N, 1, n, n)).
        on_epoch: called with (epoch, mean train loss, test relative L2 or None).

    Returns:
        The history; training stops early after ``settings.max_train_s``.

    Raises:
        TrainingDiverged: a batch's loss is not finite (training stops there).
    """
    torch.manual_seed(settings.seed)
    device = settings.device
    model.to(device)
    x, y = train
    loss_fn = loss_function(settings.loss, family)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    steps_per_epoch = math.ceil(len(x) / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    history = TrainHistory()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed)
    step = 0
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total_loss = 0.0
        for i in range(0, len(x), settings.batch_size):
            progress = _progress(step, total_steps, start, settings.max_train_s)
            for group in opt.param_groups:
                group["lr"] = _learning_rate(settings.learning_rate, progress)
            idx = order[i : i + settings.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            loss = loss_fn(model(xb), yb, xb)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"the training loss ({settings.loss}) is {value} at epoch "
                    f"{epoch + 1}, step {step + 1}; nothing was saved. Lower the "
                    f"learning rate (it is {settings.learning_rate:g}) or check "
                    "that the loss suits the data"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total_loss += value * len(idx)
        history.epoch_losses.append(total_loss / len(x))
        test_l2 = None
        if test is not None:
            test_l2 = evaluate(model, *test, family, device=device)["l2"]
            history.epoch_test_l2.append(test_l2)
        history.num_epochs = epoch + 1
        if on_epoch is not None:
            on_epoch(epoch, history.epoch_losses[-1], test_l2)
        if _progress(step, total_steps, start, settings.max_train_s) >= 1.0:
            if epoch + 1 < settings.epochs:
                logger.info(
                    "stopping training after epoch %d of %d: the %.0f s budget is "
                    "spent",
                    epoch + 1,
                    settings.epochs,
                    settings.max_train_s,
                )
            break
    history.train_time_s = time.perf_counter() - start
    model.eval()
    return history


@ray.remote(num_gpus=1, max_retries=0)
def _train_task(
    config_json: str,
    weights: bytes,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    family: str,
    settings: TrainSettings,
) -> tuple[tuple[str, bytes], TrainHistory]:
    settings.device = "cuda" if torch.cuda.is_available() else "cpu"
    model = FNO.from_bytes(config_json, weights)

    def log_epoch(epoch: int, loss: float, test_l2: float | None) -> None:
        logger.info(
            "epoch %d: loss %.4f, test relative L2 %s", epoch + 1, loss, test_l2
        )

    history = train_operator(model, train, test, family, settings, log_epoch)
    return model.to_bytes(), history


def train_on_cluster_gpu(
    model: FNO,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    family: str,
    settings: TrainSettings,
    timeout_s: float = 24 * 3600.0,
) -> tuple[FNO, TrainHistory]:
    """`train_operator` in a Ray task holding one of the cluster's GPUs.

    The model travels as JSON + safetensors bytes both ways; per-epoch progress
    is logged by the task and shows in the driver's log.

    Raises:
        RemoteTimeout: training did not finish within ``timeout_s``.
        TrainingDiverged: a batch's loss was not finite.
    """
    ref = _train_task.remote(*model.to_bytes(), train, test, family, settings)
    try:
        (config_json, weights), history = bounded_get(ref, timeout_s, "GPU training")
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, RaysysError):
            raise cause from None  # its message, without the remote traceback
        raise
    return FNO.from_bytes(config_json, weights), history
