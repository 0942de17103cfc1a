"""Data the controller hands out: status of providers, workloads, migrations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raysys.runtime.config import Config
from raysys.sharing.store import StoreLocation

WorkloadState = Literal[
    "queued",
    "starting",
    "running",
    "migrating",
    "done",
    "failed",
    "refused",
    "cancelled",
]
TERMINAL_STATES = frozenset({"done", "failed", "refused", "cancelled"})
ProviderPhase = Literal["active", "draining", "gone"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlatformConfig(Config):
    """Settings of the sharing platform's controller."""

    store: StoreLocation = Field(
        description="checkpoint store: a directory every node can reach, or an "
        "s3:// / gs:// URI"
    )
    keep_last: int = Field(3, ge=1, description="checkpoints kept per workload")
    controller_name: str = Field(
        "raysys-sharing",
        min_length=1,
        pattern=r"^\S+$",
        description="name of the controller actor (no whitespace)",
    )
    poll_interval_s: float = Field(
        0.5, gt=0, description="seconds between control-loop passes"
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="seconds between provider agent heartbeats"
    )
    heartbeat_timeout_s: float = Field(
        10.0, gt=0, description="silence after which a provider counts as lost"
    )
    start_timeout_s: float = Field(
        120.0, gt=0, description="bound on a runner's start (process, setup, restore)"
    )
    poll_timeout_s: float = Field(
        10.0, gt=0, description="bound on one poll of a runner"
    )
    stop_timeout_s: float = Field(
        60.0, gt=0, description="longest a graceful checkpoint-and-stop may take"
    )
    immediate_grace_s: float = Field(
        10.0,
        gt=0,
        description="time tenants get to checkpoint when an owner leaves without a deadline",
    )
    safety_margin_s: float = Field(
        2.0, ge=0, description="seconds kept free before a provider's deadline"
    )
    max_provider_gpus: float | None = Field(
        None, gt=0, description="refuse work asking more GPUs (None: largest provider)"
    )
    agent_start_timeout_s: float = Field(
        60.0, gt=0, description="bound on a provider agent's first answer"
    )
    history_limit: int = Field(
        100_000, ge=0, description="step metrics kept per workload"
    )


class ProviderStatus(_Record):
    name: str
    node_id: str
    phase: ProviderPhase
    gpus_lent: float
    gpus_in_use: float
    tenants: list[str]
    last_heartbeat_s_ago: float | None
    leave_deadline_in_s: float | None = None
    reason: str = ""


class WorkloadStatus(_Record):
    workload_id: str
    tenant: str
    name: str
    kind: str
    gpus: float
    state: WorkloadState
    provider: str | None = None
    step: int = 0
    num_steps: int | None = None
    last_checkpoint_step: int | None = None
    incarnation: int = -1
    restarts: int = 0
    lost_steps: int = 0
    steps_executed: int = 0
    queue_delay_s: float | None = None
    submitted_at: float
    finished_at: float | None = None
    reason: str = ""
    error: str | None = None


class MigrationRecord(_Record):
    workload_id: str
    kind: Literal["graceful", "sudden"]
    from_provider: str
    reason: str
    started_at: float
    to_provider: str | None = None
    finished_at: float | None = None
    stop_step: int | None = Field(
        None, description="step of the checkpoint taken on notice (graceful)"
    )
    last_seen_step: int = 0
    resumed_step: int | None = None
    lost_steps: int | None = None
    succeeded: bool | None = None  # None while the workload waits to resume
    fell_back: bool = False
    note: str = ""


class QueueItem(_Record):
    workload_id: str
    kind: str
    gpus: float
    position: int
    waiting_s: float
    reason: str


class WaitStat(_Record):
    what: str
    bound_s: float
    count: int = 0
    max_s: float = 0.0
    timeouts: int = 0


class SharingStatus(_Record):
    at: float
    providers: list[ProviderStatus]
    workloads: list[WorkloadStatus]
    queue: list[QueueItem]
    migrations: list[MigrationRecord]
    metrics: dict[str, Any]
    waits: list[WaitStat]
    decisions: list[str]


class WorkloadResult(_Record):
    """A finished workload's final state and the metrics of every step."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    workload_id: str
    state: WorkloadState
    step: int
    final_state: Any = None
    metrics: dict[int, dict[str, float]] = Field(default_factory=dict)
    error: str | None = None
