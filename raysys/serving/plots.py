"""PNG plots of serving runs (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from raysys.serving.metrics import FlipEvent, RequestRecord  # noqa: E402
from raysys.serving.policy import SloTargets  # noqa: E402


def plot_timeline(
    records: Sequence[RequestRecord],
    flips: Sequence[FlipEvent],
    initial_roles: Sequence[str],
    slo: SloTargets,
    path: str | Path,
) -> Path:
    """TTFT and TPOT of every request over its arrival time, and the number of
    prefill-role instances over time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = [r for r in records if r.completed]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for ax, what, target in (
        (axes[0], "ttft_s", slo.ttft_s),
        (axes[1], "tpot_s", slo.tpot_s),
    ):
        ok = [r for r in done if r.meets(slo)]
        bad = [r for r in done if not r.meets(slo)]
        ax.scatter(
            [r.arrival_s for r in ok],
            [getattr(r, what) for r in ok],
            s=3,
            label="met both SLOs",
        )
        ax.scatter(
            [r.arrival_s for r in bad],
            [getattr(r, what) for r in bad],
            s=3,
            color="tab:red",
            label="missed",
        )
        ax.axhline(target, color="black", lw=0.8, ls="--", label="target")
        ax.set_yscale("log")
        ax.set_ylabel(what.removesuffix("_s").upper() + " (s)")
    axes[0].legend(loc="upper left", fontsize=8)
    roles = dict(enumerate(initial_roles))
    end = max((r.finish_s for r in done), default=0.0)
    times = [0.0]
    counts = [sum(r == "prefill" for r in roles.values())]
    for flip in sorted(flips, key=lambda f: f.time_s):
        roles[flip.instance_id] = flip.to_role
        times.append(flip.time_s)
        counts.append(sum(r == "prefill" for r in roles.values()))
    times.append(max(end, times[-1]))
    counts.append(counts[-1])
    axes[2].step(times, counts, where="post")
    axes[2].set_ylabel("prefill instances\n(after flips)")
    axes[2].set_ylim(0, len(initial_roles))
    axes[2].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    target: float,
    path: str | Path,
    *,
    title: str = "",
    x_label: str = "request rate (req/s)",
) -> Path:
    """SLO attainment against request rate, one line per policy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        points = sorted(points)
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name
        )
    ax.axhline(target, color="black", lw=0.8, ls="--")
    ax.set_xlabel(x_label)
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
