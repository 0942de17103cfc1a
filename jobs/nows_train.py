"""Train a Fourier neural operator on solver-generated PDE instances.

    python jobs/nows_train.py --generate 1000 --resolution 64 --epochs 100 --out DIR
    python jobs/nows_train.py --data darcy_train_16.npz --test-data darcy_test_16.npz \
        --epochs 200 --out DIR

Generates instances (Ray tasks, with reference solves) or reads a training file,
trains the operator (on the GPU when there is one), reports train and test
relative L2 and energy-norm errors, and writes the model directory:
``config.json`` + ``model.safetensors`` + ``train_report.json`` +
``train_loss.png``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raysys.runtime import Config, cluster_gpus, init_ray, run_job
from raysys.runtime.config import OutputDir
from raysys.runtime.errors import ConfigError
from raysys.solvers.datasets import generate_instances, load_instances, with_references
from raysys.solvers.errors import InvalidInstance
from raysys.solvers.families import get_family
from raysys.solvers.runner import check_model_fits

logger = logging.getLogger("nows_train")


class NowsTrainConfig(Config):
    """Train a neural operator for warm-starting Krylov solvers."""

    data: str | None = Field(
        None, description="training file (.npz or .pt); exclusive with --generate"
    )
    generate: int | None = Field(
        None, ge=1, description="generate this many training instances instead"
    )
    test_data: str | None = Field(
        None, description="test file; default: --num-test generated instances"
    )
    num_test: int = Field(
        100, ge=1, description="generated test instances (held out by --test-seed)"
    )
    family: Literal["darcy", "convection-diffusion"] = Field(
        "darcy", description="PDE family of generated instances"
    )
    resolution: int = Field(
        64, ge=4, le=1024, description="grid size n of generated instances (n x n)"
    )
    epochs: int = Field(100, ge=1, description="training epochs")
    out: OutputDir = Field(description="model directory to write")
    seed: int = Field(0, description="seed of the training set and the optimiser")
    test_seed: int = Field(1, description="seed of the generated test set")
    init_model: str | None = Field(
        None, description="start from this saved operator (fine-tuning)"
    )
    modes: int = Field(12, ge=1, description="Fourier modes per direction")
    width: int = Field(32, ge=1, description="hidden channels")
    num_layers: int = Field(4, ge=1, description="Fourier layers")
    projection_channels: int = Field(64, ge=1, description="projection channels")
    padding_fraction: float = Field(
        0.125, ge=0, le=1, description="zero padding per axis, fraction of n"
    )
    loss: (
        Literal["l2", "h1", "energy", "energy+l2", "smoothed-energy", "refined-energy"]
        | None
    ) = Field(
        None,
        description="training loss (default energy+l2 for darcy, l2 otherwise); "
        "the energy losses are Darcy-only",
    )
    batch_size: int = Field(16, ge=1, description="training batch size")
    learning_rate: float = Field(3e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW weight decay")
    max_train_minutes: float | None = Field(
        None, gt=0, description="time budget; the schedule ends when it is spent"
    )
    num_threads: int = Field(
        1, ge=1, description="torch CPU threads (1 is fastest on a busy machine)"
    )
    save_dtype: Literal["float32", "float16"] = Field(
        "float32", description="storage type of the saved weights"
    )

    @model_validator(mode="after")
    def _one_source(self) -> NowsTrainConfig:
        if (self.data is None) == (self.generate is None):
            raise ValueError(
                "give exactly one of --data FILE or --generate N "
                f"(got data={self.data!r}, generate={self.generate!r})"
            )
        if self.generate and self.family != "darcy" and "energy" in (self.loss or ""):
            raise ValueError(
                f"loss {self.loss!r} needs the Darcy energy; for {self.family!r} "
                "use --loss l2 or h1"
            )
        return self


def _plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(report.epoch_losses, label="train loss")
    ax.semilogy(report.epoch_test_relative_l2, label="test relative L2")
    ax.set_xlabel("epoch")
    ax.legend()
    ax.set_title(f"{report.family} operator, {report.resolution}x{report.resolution}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _train_remote_or_local(cfg, model, train, test, family, settings):
    """Train in this process, or in a GPU task when only the cluster has a GPU."""
    import torch
    from tqdm import tqdm

    from raysys.solvers.training import train_on_cluster_gpu, train_operator

    if not torch.cuda.is_available() and cluster_gpus() >= 1:
        logger.info("training in a Ray task on a cluster GPU")
        return train_on_cluster_gpu(model, train, test, family, settings)

    settings.device = "cuda" if torch.cuda.is_available() else "cpu"
    bar = tqdm(total=cfg.epochs, desc=f"training on {settings.device}", unit="epoch")

    def on_epoch(epoch, loss, test_l2):
        bar.set_postfix(loss=f"{loss:.4f}", test_l2=f"{test_l2:.4f}")
        bar.update(1)

    try:
        hist = train_operator(model, train, test, family, settings, on_epoch)
    finally:
        bar.close()
    return model, hist


def _check_init_model(model, path: str, family: str) -> None:
    """The starting model must take the training family's input fields."""
    try:
        check_model_fits(
            model,
            family,
            data="the training data",
            fix=f"start from a {family!r} operator or leave --init-model out",
        )
    except InvalidInstance as e:
        raise ConfigError(f"--init-model {path}: {e}") from e


def main(cfg: NowsTrainConfig) -> None:
    import torch

    from raysys.models.fno import FNOConfig
    from raysys.solvers.predictor import load_model
    from raysys.solvers.reports import TrainReport
    from raysys.solvers.training import (
        TrainSettings,
        build_model,
        evaluate,
        stack_pairs,
    )

    torch.set_num_threads(cfg.num_threads)
    # the files and the starting model are checked before Ray starts
    train_insts = load_instances(cfg.data) if cfg.data is not None else None
    test_file = load_instances(cfg.test_data) if cfg.test_data is not None else None
    family = train_insts[0].family if train_insts else cfg.family
    fam = get_family(family)
    source = f"--data {cfg.data}" if cfg.data is not None else f"--family {family}"
    for inst in (train_insts or []) + (test_file or []):
        # training needs every instance: a bad one stops the job here
        get_family(inst.family).validate(inst)
    if test_file is not None and test_file[0].family != family:
        raise ConfigError(
            f"--test-data {cfg.test_data} holds {test_file[0].family!r} instances "
            f"but {source} gives {family!r} ones; test on the same PDE family"
        )
    loss = cfg.loss or ("energy+l2" if family == "darcy" else "l2")
    if "energy" in loss and family != "darcy":
        raise ConfigError(
            f"--loss {loss!r} needs the Darcy energy, but {source} holds "
            f"{family!r} instances; use --loss l2 or h1"
        )
    init_model = None
    if cfg.init_model is not None:
        init_model = load_model(cfg.init_model)
        _check_init_model(init_model, cfg.init_model, family)

    init_ray()
    if train_insts is not None:
        logger.info("read %d instances from %s", len(train_insts), cfg.data)
        train_insts = with_references(train_insts)
    else:
        train_insts = generate_instances(
            cfg.family, cfg.resolution, cfg.generate, cfg.seed
        )
    if test_file is not None:
        test_insts = with_references(test_file)
    else:
        n = train_insts[0].resolution
        test_insts = generate_instances(family, n, cfg.num_test, cfg.test_seed)
    train = stack_pairs(train_insts)
    test = stack_pairs(test_insts)
    resolution = int(train[0].shape[-1])

    init_metadata = None
    if init_model is not None:
        model = init_model
        init_metadata = dict(model.config.metadata)
        logger.info(
            "fine-tuning the operator from %s; its architecture (modes %d, width "
            "%d, %d layers) replaces the architecture flags",
            cfg.init_model,
            model.config.modes,
            model.config.width,
            model.config.num_layers,
        )
    else:
        arch = FNOConfig(
            in_channels=len(fam.feature_names),
            modes=cfg.modes,
            width=cfg.width,
            num_layers=cfg.num_layers,
            projection_channels=cfg.projection_channels,
            padding_fraction=cfg.padding_fraction,
        )
        model = build_model(arch, *train)
    settings = TrainSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        loss=loss,
        seed=cfg.seed,
        max_train_s=cfg.max_train_minutes * 60 if cfg.max_train_minutes else None,
    )
    model, hist = _train_remote_or_local(cfg, model, train, test, family, settings)

    model = model.cpu()
    train_err = evaluate(model, *train, family)
    test_err = evaluate(model, *test, family)
    out = Path(cfg.out)
    model.config.metadata = {
        "family": family,
        "resolution": resolution,
        "loss": loss,
        "num_train": len(train_insts),
        "num_epochs": hist.num_epochs,
        "train_time_s": round(hist.train_time_s, 1),
        "test_relative_l2": round(test_err["l2"], 5),
        "test_relative_energy": round(test_err["energy"], 5)
        if "energy" in test_err
        else None,
        "command": "python jobs/nows_train.py " + " ".join(sys.argv[1:]),
    }
    if init_metadata is not None:
        model.config.metadata["initialised_from"] = init_metadata
    model.save(out, dtype=getattr(torch, cfg.save_dtype))
    report = TrainReport(
        config=cfg.model_dump(),
        family=family,
        resolution=resolution,
        num_train=len(train_insts),
        num_test=len(test_insts),
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_epochs=hist.num_epochs,
        train_time_s=hist.train_time_s,
        train_relative_l2=train_err["l2"],
        test_relative_l2=test_err["l2"],
        train_relative_energy=train_err.get("energy"),
        test_relative_energy=test_err.get("energy"),
        epoch_losses=hist.epoch_losses,
        epoch_test_relative_l2=hist.epoch_test_l2,
        model_dir=str(out),
    )
    report.write(out / "train_report.json")
    _plot(report, out / "train_loss.png")
    print(
        f"trained {report.num_parameters} parameters for {hist.num_epochs} epochs "
        f"in {hist.train_time_s:.0f} s on {len(train_insts)} {family} instances "
        f"({resolution}x{resolution})"
    )
    print(
        f"  relative L2 error:     train {train_err['l2']:.4f}  test {test_err['l2']:.4f}"
    )
    if "energy" in test_err:
        print(
            f"  relative energy error: train {train_err['energy']:.4f}  "
            f"test {test_err['energy']:.4f}"
        )
    print(f"  model written to {out.resolve()}")


if __name__ == "__main__":
    start = time.perf_counter()
    code = run_job(NowsTrainConfig, main)
    logger.info("done in %.0f s", time.perf_counter() - start)
    sys.exit(code)
