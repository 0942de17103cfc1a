"""Readers for the traces the sharing simulation replays.

- GPU job traces in the Alibaba ``cluster-trace-gpu-v2023`` pod-list format
  (CSV columns ``name, num_gpu, gpu_milli, qos, creation_time, deletion_time,
  scheduled_time``, times in seconds): each usable row becomes a `TraceJob`
  arriving at its creation time and running for ``deletion_time -
  scheduled_time`` seconds with ``num_gpu`` whole GPUs, or ``gpu_milli/1000``
  of one GPU when ``num_gpu`` is 1 and ``gpu_milli`` is below 1000.
  Latency-sensitive pods (``qos`` ``LS``) are interactive, the rest batch.
- Availability series in the SpotHedge JSON format
  (``{"metadata": {"gap_seconds": 300}, "data": [n_live, ...]}``): each file is
  one pool of machines whose live count changes every ``gap_seconds``.

Rows that cannot be used are counted by reason, never dropped silently.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from raysys.runtime.errors import ConfigError
from raysys.runtime.tables import csv_line
from raysys.sharing.workload import WorkloadKind

JOB_COLUMNS = (
    "name",
    "num_gpu",
    "gpu_milli",
    "qos",
    "creation_time",
    "deletion_time",
    "scheduled_time",
)
INTERACTIVE_QOS = frozenset({"LS"})


@dataclass(frozen=True)
class TraceJob:
    name: str
    arrival_s: float
    duration_s: float
    gpus: float
    kind: WorkloadKind


@dataclass
class JobTrace:
    jobs: list[TraceJob]
    num_rows: int
    skipped: Counter = field(default_factory=Counter)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(frozen=True)
class AvailabilitySeries:
    name: str
    gap_s: float
    counts: tuple[int, ...]

    @property
    def peak(self) -> int:
        return max(self.counts, default=0)


def _number(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def load_gpu_jobs(path: str | Path, *, max_duration_s: float) -> JobTrace:
    """Read a pod-list CSV; unusable rows are counted in ``skipped`` by reason.

    Raises:
        ConfigError: the file is missing or lacks one of the needed columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"job trace {str(path)!r} does not exist; pass the pod-list CSV"
        )
    jobs: list[TraceJob] = []
    skipped: Counter = Counter()
    num_rows = 0
    # One row per line, each parsed on its own: the format has no multi-line
    # fields, and a stray quote must cost its own row, not swallow the rest of
    # the file into one field. Undecodable bytes become U+FFFD, so such a row
    # fails on its numbers (or keeps an odd name), never the whole read.
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        header = [h.strip() for h in csv_line(f.readline()) or []]
        missing = [c for c in JOB_COLUMNS if c not in header]
        if missing:
            raise ConfigError(
                f"job trace {str(path)!r} lacks column(s) {', '.join(missing)}; "
                f"expected the pod-list format with {', '.join(JOB_COLUMNS)}"
            )
        for line in f:
            if not line.strip():
                continue
            num_rows += 1
            cells = csv_line(line)
            if cells is None:
                skipped["malformed row (unbalanced quotes)"] += 1
                continue
            if len(cells) != len(header):
                skipped["malformed row (wrong number of fields)"] += 1
                continue
            reason, job = _parse_job(
                dict(zip(header, cells, strict=True)), max_duration_s
            )
            if job is None:
                skipped[reason] += 1
            else:
                jobs.append(job)
    jobs.sort(key=lambda j: (j.arrival_s, j.name))
    return JobTrace(jobs=jobs, num_rows=num_rows, skipped=skipped)


def _parse_job(
    row: dict[str, str], max_duration_s: float
) -> tuple[str, TraceJob | None]:
    if not (row.get("scheduled_time") or "").strip():
        return "never scheduled (no scheduled_time, so no duration)", None
    try:
        num_gpu = int(_number(row["num_gpu"]))
        gpu_milli = _number(row["gpu_milli"])
        created = _number(row["creation_time"])
        duration = _number(row["deletion_time"]) - _number(row["scheduled_time"])
    except (TypeError, ValueError):
        return "malformed number", None
    if num_gpu <= 0:
        return "asks no GPU", None
    if duration <= 0:
        return "non-positive duration", None
    if duration > max_duration_s:
        return f"runs longer than max_duration_s ({max_duration_s:g} s)", None
    if num_gpu == 1 and 0 < gpu_milli < 1000:
        gpus = round(gpu_milli / 1000, 4)
    elif gpu_milli == 1000:
        gpus = float(num_gpu)
    else:
        return "GPU share not a fraction of one GPU nor whole GPUs", None
    qos = (row.get("qos") or "").strip()
    kind = WorkloadKind.INTERACTIVE if qos in INTERACTIVE_QOS else WorkloadKind.BATCH
    return "", TraceJob(row["name"], created, duration, gpus, kind)


# Shortest spacing of an availability series' counts (the real ones use 300 s).
MIN_GAP_S = 1.0


def load_availability(path: str | Path) -> tuple[list[AvailabilitySeries], Counter]:
    """Read one availability JSON, or every ``*.json`` in a directory.

    Returns:
        ``(series, skipped)``: the usable series (sorted by name) and counts of
        unusable entries by reason (a negative or non-integer count is
        replaced by the previous count and counted here).

    Raises:
        ConfigError: the path holds no usable series.
    """
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(
            f"availability {str(path)!r} is neither a JSON file nor a directory of "
            "them; pass the provider-churn JSON series"
        )
    series, skipped = [], Counter()
    for file in files:
        try:
            doc = json.loads(file.read_text())
            gap_s = float(doc["metadata"]["gap_seconds"])
            raw = doc["data"]
            if not (math.isfinite(gap_s) and gap_s >= MIN_GAP_S):
                raise ValueError(
                    f"gap_seconds {gap_s!r} is not a number >= {MIN_GAP_S:g}"
                )
            if not isinstance(raw, list):
                raise ValueError("'data' is not a list of live counts")
        except KeyError as e:
            skipped[f"unreadable series file (no {e} field)"] += 1
            continue
        except (OSError, ValueError, TypeError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            skipped[f"unreadable series file ({e.__class__.__name__}: {why})"] += 1
            continue
        counts, previous = [], 0
        for value in raw:
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                previous = value
            else:
                skipped["bad live count (kept the previous one)"] += 1
            counts.append(previous)
        if max(counts, default=0) == 0:
            skipped["series never has a live machine"] += 1
            continue
        series.append(AvailabilitySeries(file.stem, gap_s, tuple(counts)))
    if not series:
        reasons = "; ".join(f"{n} x {why}" for why, n in skipped.most_common(5))
        raise ConfigError(
            f"no usable availability series under {str(path)!r}: {reasons}"
        )
    return series, skipped
