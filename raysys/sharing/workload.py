"""What a tenant submits: a checkpointable workload class and its spec.

A workload is any class with three methods (the contract of application-level
checkpointing that GPUnion-style platforms rely on):

- ``step()`` advances the work by one step and may return a float or a dict of
  floats (a loss, a throughput) recorded as that step's metrics;
- ``state_dict()`` returns everything needed to continue (tensors, numbers,
  strings, lists, tuples, dicts; see `raysys.sharing.state_codec`);
- ``load_state_dict(state)`` puts such a state back.

Optional hooks: ``setup(context)`` runs once after construction (before a
checkpoint is loaded) with a `WorkloadContext`; ``is_done()`` ends an
open-ended workload (one submitted without ``num_steps``).

The platform constructs the class with the arguments given at submission, runs
``setup``, then loads the newest committed checkpoint when one exists, so a
restart always continues from committed state and never from the constructor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field, field_validator, model_validator

from raysys.runtime.config import Config
from raysys.runtime.errors import ConfigError
from raysys.sharing.names import check_name

GPU_UNITS = 10_000  # Ray keeps fractional resources to 1/10000


class WorkloadKind(str, Enum):
    """Interactive work (a notebook, a serving fleet) goes before batch work."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


def check_gpu_need(gpus: float) -> float:
    """Validate a GPU need the way Ray accepts it: a fraction below 1 or a whole
    number of GPUs.

    Raises:
        ConfigError: the need is not positive, is a fraction above 1 (1.5), or
            is finer than 1/10000 of a GPU.
    """
    if not isinstance(gpus, int | float) or isinstance(gpus, bool):
        raise ConfigError(f"gpus must be a number, got {gpus!r}")
    if not math.isfinite(gpus) or gpus <= 0:
        raise ConfigError(f"gpus must be > 0, got {gpus!r}; use 0.5 for half a GPU")
    if gpus > 1 and not float(gpus).is_integer():
        raise ConfigError(
            f"gpus={gpus!r}: a need above one GPU must be a whole number "
            f"(use {math.ceil(gpus)}), fractions are for sharing one GPU"
        )
    if abs(gpus * GPU_UNITS - round(gpus * GPU_UNITS)) > 1e-6:
        raise ConfigError(
            f"gpus={gpus!r} is finer than 1/{GPU_UNITS} of a GPU; round it "
            f"(for example {round(gpus, 4)})"
        )
    return float(gpus)


class CheckpointPolicy(Config):
    """When a running workload commits a checkpoint: every N steps, every T
    seconds, or whichever comes first when both are set."""

    every_steps: int | None = Field(
        None, ge=1, description="checkpoint after this many steps, >= 1"
    )
    every_s: float | None = Field(
        None, gt=0, description="checkpoint after this many seconds, > 0"
    )

    @model_validator(mode="after")
    def _one_trigger(self) -> CheckpointPolicy:
        if self.every_steps is None and self.every_s is None:
            raise ValueError(
                "set every_steps or every_s (or both); a workload without "
                "checkpoints cannot migrate"
            )
        return self


class WorkloadSpec(Config):
    """How the platform should run one workload."""

    tenant: str = Field(description="tenant that owns the workload (a safe name)")
    name: str = Field(description="workload name, unique within the tenant")
    # Strict: True or "1" is not read as one GPU.
    gpus: float = Field(
        strict=True,
        description="GPU need: a fraction below 1 (0.25) or a whole number (2)",
    )
    kind: WorkloadKind = Field(
        WorkloadKind.BATCH, description="interactive (placed first) or batch"
    )
    num_steps: int | None = Field(
        None,
        ge=1,
        description="steps to run; None runs until the workload's is_done() says so",
    )
    checkpoint: CheckpointPolicy = Field(
        default_factory=lambda: CheckpointPolicy(every_steps=100),
        description="checkpoint trigger (every N steps and/or T seconds)",
    )
    num_cpus: float = Field(0.0, ge=0, description="logical CPUs the runner holds")
    est_checkpoint_s: float = Field(
        5.0,
        gt=0,
        description="expected seconds to write one checkpoint; a graceful "
        "migration is tried only when the notice leaves this much time",
    )

    @field_validator("tenant", "name")
    @classmethod
    def _safe_name(cls, value: str, info) -> str:
        return check_name(
            value, "tenant" if info.field_name == "tenant" else "workload"
        )

    @field_validator("gpus")
    @classmethod
    def _gpu_need(cls, value: float) -> float:
        try:
            return check_gpu_need(value)
        except ConfigError as e:
            raise ValueError(str(e)) from e

    @property
    def workload_id(self) -> str:
        """``tenant/name``: unique on the platform."""
        return f"{self.tenant}/{self.name}"


@runtime_checkable
class Workload(Protocol):
    """The three methods a tenant's class must have."""

    def step(self) -> Any: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


REQUIRED_METHODS = ("step", "state_dict", "load_state_dict")


def check_workload_class(cls: type) -> type:
    """Refuse a class that lacks one of the required methods.

    Raises:
        ConfigError: naming the missing methods.
    """
    if not isinstance(cls, type):
        raise ConfigError(
            f"submit a class, not {type(cls).__name__} {cls!r}; the platform "
            "constructs it on the provider"
        )
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(
            f"{cls.__name__} lacks {', '.join(missing)}; a workload needs step(), "
            "state_dict() and load_state_dict(state)"
        )
    return cls


@dataclass
class WorkloadContext:
    """What ``setup(context)`` receives on the provider.

    Attributes:
        tenant: the owning tenant.
        workload: the workload's name.
        incarnation: 0 for the first runner, then one more per restart.
        store: the tenant's own checkpoint store (scoped to its namespace).
        device: ``"cuda"`` when the runner was given a GPU torch can see,
            else ``"cpu"``.
        gpu_ids: the GPU ids Ray assigned to the runner.
    """

    tenant: str
    workload: str
    incarnation: int
    store: Any
    device: str = "cpu"
    gpu_ids: list[Any] = field(default_factory=list)


StepMetrics = dict[str, float]


def step_metrics(value: Any) -> StepMetrics:
    """A step's return value as a metrics dict (a bare number becomes ``value``)."""
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"value": float(value)}
    if isinstance(value, int | float):
        return {"value": float(value)}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            try:
                out[str(key)] = float(item)
            except (TypeError, ValueError):
                continue
        return out
    return {}


RunnerState = Literal["starting", "running", "stopping", "stopped", "done", "failed"]
