"""Provider-first GPU sharing with checkpoint and migration (after GPUnion).

Providers (Ray nodes labelled ``raysys.io/provider``) lend GPUs and may leave
at any time; tenants submit checkpointable workloads that run in runner actors
and move to another provider when theirs leaves. See ``docs/sharing.md``.

Public API:
    SharingClient: start or connect to the platform; submit, wait, result,
        status, migrations, cancel, leave.
    WorkloadSpec, CheckpointPolicy, WorkloadKind: what a tenant submits.
    CheckpointStore, TenantStore: the checkpoint store.
    PlacementPolicy, MigrationPolicy: the policies (plain objects).
    PlatformConfig: controller settings.
"""

from raysys.sharing.client import SharingClient
from raysys.sharing.names import InvalidName, check_name
from raysys.sharing.policy import MigrationAction, MigrationPolicy, PlacementPolicy
from raysys.sharing.records import (
    MigrationRecord,
    PlatformConfig,
    SharingStatus,
    WorkloadResult,
    WorkloadStatus,
)
from raysys.sharing.store import CheckpointStore, TenantStore
from raysys.sharing.workload import (
    CheckpointPolicy,
    Workload,
    WorkloadContext,
    WorkloadKind,
    WorkloadSpec,
)

__all__ = [
    "CheckpointPolicy",
    "CheckpointStore",
    "InvalidName",
    "MigrationAction",
    "MigrationPolicy",
    "MigrationRecord",
    "PlacementPolicy",
    "PlatformConfig",
    "SharingClient",
    "SharingStatus",
    "TenantStore",
    "Workload",
    "WorkloadContext",
    "WorkloadKind",
    "WorkloadResult",
    "WorkloadSpec",
    "WorkloadStatus",
    "check_name",
]
