"""The `raysys status` section renders providers, workloads, queue and metrics."""

from __future__ import annotations

from raysys.sharing.cli import format_status
from raysys.sharing.records import (
    ProviderStatus,
    QueueItem,
    SharingStatus,
    WorkloadStatus,
)


def test_status_section_lists_providers_workloads_and_queue():
    status = SharingStatus(
        at=100.0,
        providers=[
            ProviderStatus(
                name="lab-a", node_id="n1", phase="draining", gpus_lent=2, gpus_in_use=1.5,
                tenants=["t/a", "t/b"], last_heartbeat_s_ago=0.4, leave_deadline_in_s=12.0,
            ),
            ProviderStatus(
                name="lab-b", node_id="n2", phase="gone", gpus_lent=1, gpus_in_use=0,
                tenants=[], last_heartbeat_s_ago=9.0, reason="no heartbeat for 9.0 s",
            ),
        ],
        workloads=[
            WorkloadStatus(
                workload_id="t/a", tenant="t", name="a", kind="batch", gpus=0.5,
                state="running", provider="lab-a", step=42, num_steps=100,
                last_checkpoint_step=40, restarts=1, submitted_at=1.0,
            ),
            WorkloadStatus(
                workload_id="t/bad", tenant="t", name="bad", kind="batch", gpus=0.5,
                state="failed", submitted_at=1.0, error="RuntimeError: boom\ntraceback",
            ),
        ],
        queue=[
            QueueItem(
                workload_id="t/big", kind="interactive", gpus=2, position=0,
                waiting_s=3.0, reason="needs 2 GPUs",
            )
        ],
        migrations=[],
        metrics={
            "gpu_utilization": 0.5, "migrations_attempted": 3, "migrations_succeeded": 3,
            "lost_gpu_seconds": 1.25, "queue_delay_p50_s": {"batch": 2.0},
        },
        waits=[],
        decisions=[],
    )  # fmt: skip
    lines = format_status(status, "ctl")
    text = "\n".join(lines)
    assert (
        lines[0]
        == "sharing platform (controller ctl): 2 provider(s), 2 workload(s), 1 queued"
    )
    lab_a = next(line for line in lines if line.startswith("lab-a"))
    assert lab_a.split()[:5] == ["lab-a", "draining", "2.00", "1.50", "2"]
    assert "(deadline in 12.0 s)" in lab_a
    assert "(no heartbeat for 9.0 s)" in next(
        line for line in lines if line.startswith("lab-b")
    )
    row = next(line for line in lines if line.startswith("t/a"))
    assert row.split() == [
        "t/a",
        "batch",
        "0.5",
        "running",
        "lab-a",
        "42/100",
        "40",
        "1",
    ]
    assert "    error: RuntimeError: boom" in lines
    assert "  1. t/big (interactive, 2 GPUs, waiting 3.0 s): needs 2 GPUs" in lines
    assert text.endswith(
        "utilisation 0.50, migrations 3/3 succeeded, lost 1.2 GPU-s, queue delay p50: batch 2.0 s"
    )
