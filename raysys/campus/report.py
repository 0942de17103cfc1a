"""What the campus job reports: per system, per provider departure, and a timeline.

`Timeline` samples the sharing platform's status while the job runs (which
provider each tenant is on, provider phases) and, with the migrations and the
serving fleet's role flips, draws the PNG timeline. `CampusReport` is the JSON
report; `summary_table` the table printed at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from raysys.runtime.reports import Report


class SystemRecord(BaseModel):
    """One system's outcome in the campus run."""

    name: str = Field(description="nows, serving, moe or sharing")
    status: str = Field(description="the workload's final state (done, failed, ...)")
    workload_id: str | None = None
    work: str = Field(description="work done, in words")
    quality: str = Field(description="key quality figure, in words")
    speed: str = Field(description="key speed figure, in words")
    figures: dict[str, Any] = Field(description="the figures behind the words")
    own_job: str | None = Field(
        None, description="the system's own job doing the same work"
    )
    error: str | None = None


class Departure(BaseModel):
    """One provider leaving, and what it meant for the tenants on it."""

    provider: str
    how: str = Field(description="'drain' (owner leaves with a deadline) or 'lost'")
    at_s: float = Field(description="seconds after the job started")
    deadline_s: float | None = None
    moved: list[str] = Field(description="workloads that migrated off it")
    to: dict[str, str | None] = Field(description="where each went")
    lost_steps: dict[str, int] = Field(description="steps redone, per workload")
    succeeded: bool


class CampusReport(Report):
    """The campus job's report."""

    cluster: str
    providers: list[str]
    inputs: dict[str, str] = Field(description="what each system read")
    systems: list[SystemRecord]
    departures: list[Departure]
    migrations_attempted: int
    migrations_succeeded: int
    migrations: list[dict[str, Any]]
    gpu_utilization: float | None
    timeline: str | None
    elapsed_s: float


class Timeline:
    """Samples of the platform's status, relative to the job's start."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.samples: list[tuple[float, dict[str, tuple[str, str | None]]]] = []
        self.providers: dict[str, list[tuple[float, str]]] = {}
        self.events: list[tuple[float, str, str]] = []  # (t, provider, what)

    def now(self) -> float:
        return time.time() - self.t0

    def sample(self, status: Any) -> None:
        t = status.at - self.t0 if status.at > 1e9 else self.now()
        self.samples.append(
            (t, {w.workload_id: (w.state, w.provider) for w in status.workloads})
        )
        for p in status.providers:
            phases = self.providers.setdefault(p.name, [])
            if not phases or phases[-1][1] != p.phase:
                phases.append((t, str(p.phase)))

    def event(self, provider: str, what: str) -> None:
        self.events.append((self.now(), provider, what))

    def plot(
        self,
        path: Path,
        labels: dict[str, str],
        migrations: list[Any],
        flips: list[float],
    ) -> Path:
        """Tenant rows coloured by provider, migrations, departures, role flips."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        providers = sorted(
            {p for _, s in self.samples for _, p in s.values() if p}
            | set(self.providers)
        )
        colours = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
        wids = list(labels)
        end = max((t for t, _ in self.samples), default=1.0)
        fig, ax = plt.subplots(figsize=(11, 1.2 + 0.7 * (len(wids) + len(providers))))
        rows = {w: i for i, w in enumerate(wids)}
        for (t, s), (t_next, _) in zip(
            self.samples, self.samples[1:] + [(end, {})], strict=True
        ):
            for wid, (state, prov) in s.items():
                if wid not in rows:
                    continue
                if state == "running" and prov:
                    ax.barh(rows[wid], t_next - t, left=t, color=colours[prov],
                            height=0.6)  # fmt: skip
                elif state not in ("done", "failed", "cancelled", "refused"):
                    # submitted, starting, moving or queued: not yet working
                    ax.barh(rows[wid], t_next - t, left=t, color="0.8", height=0.25)
        base = len(wids)
        for j, name in enumerate(providers):
            y = base + j
            phases = self.providers.get(name, [])
            for (t, phase), (t_next, _) in zip(
                phases, phases[1:] + [(end, "")], strict=True
            ):
                if phase in ("gone", "dead", "lost", "left"):
                    continue
                ax.barh(y, t_next - t, left=t, color=colours[name], height=0.6,
                        alpha=0.35 if phase != "active" else 0.8,
                        hatch="//" if phase == "draining" else None)  # fmt: skip
        for t, name, what in self.events:
            ax.axvline(t, color="k", lw=1, ls="--" if what == "drain" else "-.")
            ax.text(t, base + len(providers) - 0.3, f" {what} {name}", fontsize=8)
        for m in migrations:
            if m.workload_id in rows and m.finished_at:
                ax.plot(m.finished_at - self.t0, rows[m.workload_id], marker="^"
                        if m.kind == "graceful" else "X", color="k", ms=8)  # fmt: skip
        serving = next((w for w, name in labels.items() if name == "serving"), None)
        if serving is not None:
            for t in flips:
                ax.plot(t - self.t0, rows[serving] + 0.38, marker="v", ms=5,
                        color="crimson")  # fmt: skip
        ax.set_yticks(
            range(base + len(providers)),
            [labels[w] for w in wids] + [f"provider {p}" for p in providers],
        )
        ax.set_xlabel("seconds since the job started")
        ax.set_title(
            "Campus run: tenants coloured by the provider they run on; "
            "▲ graceful / X sudden migration, ▼ serving role flip,\n"
            "-- owner drains with a deadline, -. provider lost without warning; "
            "hatched: draining; thin grey: starting or moving",
            fontsize=9,
        )
        ax.set_xlim(0, end)
        ax.invert_yaxis()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    return lines + [fmt.format(*r) for r in rows]


def summary_table(report: CampusReport) -> str:
    """The per-system and per-departure tables printed at the end."""
    lines = _table(
        ["system", "status", "work done", "quality", "speed"],
        [[s.name, s.status, s.work, s.quality, s.speed] for s in report.systems],
    )
    rows = []
    for d in report.departures:
        moved = ", ".join(f"{w} -> {d.to.get(w)}" for w in d.moved) or "nothing"
        lost = ", ".join(f"{w}: {n}" for w, n in d.lost_steps.items()) or "-"
        rows.append(
            [f"{d.how} {d.provider}", f"{d.at_s:.0f} s", moved, lost,
             "yes" if d.succeeded else "NO"]
        )  # fmt: skip
    lines += [""] + _table(["departure", "at", "moved", "steps redone", "ok"], rows)
    lines.append(
        f"migrations {report.migrations_succeeded}/{report.migrations_attempted} "
        f"succeeded; elapsed {report.elapsed_s:.0f} s"
    )
    return "\n".join(lines)
