"""Batched predictions of a neural operator, locally or as a Ray actor.

The model travels as its JSON config and safetensors bytes (`FNO.to_bytes`),
so an actor on another machine needs no access to the model directory and
nothing is unpickled. The actor asks for a GPU when the cluster has one and
runs on it when CUDA is there; otherwise it predicts on CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from safetensors import SafetensorError

from raysys.models.fno import FNO, WEIGHTS_FILE
from raysys.runtime import cluster_gpus
from raysys.solvers.errors import ModelFormatError

logger = logging.getLogger(__name__)

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_MODEL = PRETRAINED_DIR / "darcy-fno-64"


def load_model(directory: str | Path) -> FNO:
    """Load a saved operator, turning format problems into `ModelFormatError`."""
    try:
        return FNO.load(directory)
    except SafetensorError as e:
        raise ModelFormatError(
            f"cannot load the operator in {directory}: "
            f"{Path(directory) / WEIGHTS_FILE} is not a readable safetensors file "
            f"({e}); save the model again"
        ) from e
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"cannot load the operator in {directory}: {e}") from e


class Predictor:
    """Holds one model and predicts batches of fields.

    Args:
        config_json: the model's config (`FNO.to_bytes`).
        weights: the model's safetensors bytes.
        num_threads: torch CPU threads.
    """

    def __init__(self, config_json: str, weights: bytes, num_threads: int = 1):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(num_threads)
        self.model = FNO.from_bytes(config_json, weights).to(self.device)
        logger.info("predictor ready on %s", self.device)

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        """Predict a batch.

        Args:
            features: (B, C, n, n) un-normalised input fields.

        Returns:
            (B, n, n) float64 predictions and the seconds the batch took.
        """
        start = time.perf_counter()
        with torch.no_grad():
            x = torch.tensor(np.asarray(features), dtype=torch.float32)
            y = self.model(x.to(self.device))[:, 0]  # (B, n, n)
            out = y.double().cpu().numpy()
        return out, time.perf_counter() - start

    def device_name(self) -> str:
        """Where the predictions run (``cuda`` or ``cpu``)."""
        return self.device


def start_predictor(
    model: FNO, num_cpus: float = 1.0, num_gpus: float | None = None, **options: Any
) -> ray.actor.ActorHandle:
    """A `Predictor` actor, on a GPU when the cluster declares one.

    ``num_gpus`` None: one GPU if the cluster declares one, else none; other
    keyword arguments are Ray actor options.
    """
    if num_gpus is None:
        num_gpus = 1.0 if cluster_gpus() >= 1.0 else 0.0
    config_json, weights = model.to_bytes()
    logger.info(
        "starting the predictor actor with %g GPU(s) (cluster declares %g)",
        num_gpus,
        cluster_gpus(),
    )
    actor_cls = ray.remote(Predictor)
    return actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, **options).remote(
        config_json, weights, max(1, int(num_cpus))
    )
