"""Provider-first GPU sharing with checkpoint and migration (after GPUnion).

Providers (Ray nodes labelled ``raysys.io/provider``) lend GPUs and may leave
at any time; tenants submit checkpointable workloads that run in runner actors
and move to another provider when theirs leaves. See ``docs/sharing.md``.

Public API (imported on first use, so ``raysys --help`` stays fast):
    SharingClient: start or connect to the platform; submit, wait, result,
        status, migrations, cancel, leave.
    WorkloadSpec, CheckpointPolicy, WorkloadKind, WorkloadContext: what a
        tenant submits and what its workload sees.
    CheckpointStore, TenantStore: the checkpoint store.
    PlacementPolicy, MigrationPolicy, MigrationAction: the policies.
    PlatformConfig, SharingStatus, WorkloadStatus, WorkloadResult,
        MigrationRecord: settings and the records the platform hands out.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SharingClient": "raysys.sharing.client",
    "InvalidName": "raysys.sharing.names",
    "check_name": "raysys.sharing.names",
    "MigrationAction": "raysys.sharing.policy",
    "MigrationPolicy": "raysys.sharing.policy",
    "PlacementPolicy": "raysys.sharing.policy",
    "MigrationRecord": "raysys.sharing.records",
    "PlatformConfig": "raysys.sharing.records",
    "SharingStatus": "raysys.sharing.records",
    "WorkloadResult": "raysys.sharing.records",
    "WorkloadStatus": "raysys.sharing.records",
    "CheckpointStore": "raysys.sharing.store",
    "TenantStore": "raysys.sharing.store",
    "CheckpointPolicy": "raysys.sharing.workload",
    "Workload": "raysys.sharing.workload",
    "WorkloadContext": "raysys.sharing.workload",
    "WorkloadKind": "raysys.sharing.workload",
    "WorkloadSpec": "raysys.sharing.workload",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raysys.sharing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
