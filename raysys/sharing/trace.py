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

Rows that cannot be used are counted by reason, never dropped silently; the
first malformed rows are kept with their line numbers and what is wrong
(``JobTrace.malformed``), and every availability file skipped or patched is
named with its problem (``Availability.problems``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from raysys.runtime.errors import ConfigError
from raysys.runtime.tables import (
    MAX_MALFORMED_EXAMPLES,
    MalformedRow,
    csv_line,
    csv_rows,
)
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
# Counted under this reason: a row whose numbers do not parse.
MALFORMED_NUMBER = "malformed number"


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
    # rows skipped as malformed (counted in `skipped` too), and the first
    # MAX_MALFORMED_EXAMPLES of them with their line numbers and reasons
    num_malformed: int = 0
    malformed: list[MalformedRow] = field(default_factory=list)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def malformed_summary(self, limit: int = 5) -> str:
        """The first ``limit`` malformed rows, e.g. ``line 17: gpu_milli 'xyz'
        is not a number; line 40: ...``; "" when there were none."""
        shown = "; ".join(str(m) for m in self.malformed[:limit])
        more = self.num_malformed - min(limit, len(self.malformed))
        return shown + (f"; and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class AvailabilitySeries:
    name: str
    gap_s: float
    counts: tuple[int, ...]

    @property
    def peak(self) -> int:
        return max(self.counts, default=0)


def _short(value: object, limit: int = 40) -> str:
    # The value as a row's reason quotes it, cut to a readable length.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(row: dict[str, str], column: str) -> float:
    """The finite number in ``row[column]``; ValueError naming the column and
    the bad value otherwise."""
    value = row[column]
    if not value.strip():
        raise ValueError(f"{column} is missing")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{column} {_short(value)} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{column} {_short(value)} is not a finite number")
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
    malformed: list[MalformedRow] = []
    num_rows = num_malformed = 0

    def skip(reason: str, line: int | None = None, why: str = "") -> None:
        # `line` is given for malformed rows only: they are kept as examples
        nonlocal num_malformed
        skipped[reason] += 1
        if line is None:
            return
        num_malformed += 1
        if len(malformed) < MAX_MALFORMED_EXAMPLES:
            malformed.append(MalformedRow(line, why))

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
        for line, cells in csv_rows(f, first_line=2):
            num_rows += 1
            if cells is None:
                skip("malformed row (unbalanced quotes)", line, "unbalanced quotes")
                continue
            if len(cells) != len(header):
                skip(
                    "malformed row (wrong number of fields)",
                    line,
                    f"{len(cells)} fields, expected {len(header)}",
                )
                continue
            try:
                reason, job = _parse_job(
                    dict(zip(header, cells, strict=True)), max_duration_s
                )
            except ValueError as e:
                skip(MALFORMED_NUMBER, line, str(e))
                continue
            if job is None:
                skip(reason)
            else:
                jobs.append(job)
    jobs.sort(key=lambda j: (j.arrival_s, j.name))
    return JobTrace(
        jobs=jobs,
        num_rows=num_rows,
        skipped=skipped,
        num_malformed=num_malformed,
        malformed=malformed,
    )


def _parse_job(
    row: dict[str, str], max_duration_s: float
) -> tuple[str, TraceJob | None]:
    """``("", job)``, or ``(reason, None)`` for a well-formed row that cannot
    be used.

    Raises:
        ValueError: a number does not parse (the message names the column and
            the value).
    """
    if not (row.get("scheduled_time") or "").strip():
        return "never scheduled (no scheduled_time, so no duration)", None
    num_gpu = int(_number(row, "num_gpu"))
    gpu_milli = _number(row, "gpu_milli")
    created = _number(row, "creation_time")
    duration = _number(row, "deletion_time") - _number(row, "scheduled_time")
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
# The files of a folder of series, and what each holds.
SERIES_PATTERN = "*.json"
SERIES_FORMAT = '{"metadata": {"gap_seconds": 300}, "data": [n_live, ...]}'


class Availability(NamedTuple):
    """What `load_availability` read.

    Attributes:
        series: the usable series, sorted by name.
        skipped: unusable entries counted by reason (a negative or non-integer
            count is replaced by the previous count and counted here).
        problems: each file skipped or patched, named with what is wrong
            (``"b.json: no 'gap_seconds' field in its metadata"``), at most
            `MAX_MALFORMED_EXAMPLES`.
    """

    series: list[AvailabilitySeries]
    skipped: Counter
    problems: list[str]


class _BadSeriesFile(ValueError):
    """A series file that cannot be used; ``args[0]`` is the reason counted,
    ``detail`` what the user reads about the file."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.detail = detail or reason


def _read_series_file(file: Path) -> tuple[float, list]:
    """``(gap_s, raw counts)`` of one series file.

    Raises:
        _BadSeriesFile: the file cannot be read or is not in the format.
    """
    if not file.is_file():
        raise _BadSeriesFile("not a file")
    try:
        doc = json.loads(file.read_bytes())
    except OSError as e:
        raise _BadSeriesFile(f"cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise _BadSeriesFile(
            "not UTF-8 text", f"not UTF-8 text (byte {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise _BadSeriesFile(
            f"not JSON: {e.msg}",
            f"not JSON ({e.msg} at line {e.lineno} column {e.colno})",
        ) from None
    if not isinstance(doc, dict):
        raise _BadSeriesFile(
            "top level not a JSON object",
            f"top level is a {type(doc).__name__}, not a JSON object",
        )
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        raise _BadSeriesFile(
            "no 'metadata' object",
            "no 'metadata' object"
            if metadata is None
            else f"'metadata' is {_short(metadata)}, not a JSON object",
        )
    if "gap_seconds" not in metadata:
        raise _BadSeriesFile(
            "no 'gap_seconds' field", "no 'gap_seconds' field in its metadata"
        )
    gap = metadata["gap_seconds"]
    try:
        gap_s = math.nan if isinstance(gap, bool) else float(gap)
    except (TypeError, ValueError, OverflowError):
        gap_s = math.nan
    if not (math.isfinite(gap_s) and gap_s >= MIN_GAP_S):
        raise _BadSeriesFile(
            f"gap_seconds {_short(gap)} is not a number >= {MIN_GAP_S:g}"
        )
    if "data" not in doc:
        raise _BadSeriesFile("no 'data' field")
    raw = doc["data"]
    if not isinstance(raw, list):
        raise _BadSeriesFile(
            "'data' is not a list of live counts",
            f"'data' is {_short(raw)}, not a list of live counts",
        )
    return gap_s, raw


def load_availability(path: str | Path) -> Availability:
    """Read one availability JSON, or every ``*.json`` in a directory.

    Returns:
        `Availability`: the usable series, the unusable entries counted by
        reason, and the files skipped or patched with their problems.

    Raises:
        ConfigError: the path does not exist, is a folder without series
            files, or holds no usable series (the error names each file and
            what is wrong with it).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(SERIES_PATTERN))
        if not files:
            others = sorted(p.name for p in path.iterdir())
            held = (
                f", only {', '.join(repr(n) for n in others[:3])}"
                f"{f' and {len(others) - 3} more' if len(others) > 3 else ''}"
                if others
                else " (it is empty)"
            )
            raise ConfigError(
                f"availability folder {str(path)!r} holds no series files "
                f"{SERIES_PATTERN}{held}; pass a folder of provider-churn JSON "
                f"series or one such file, each {SERIES_FORMAT}"
            )
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(
            f"availability {str(path)!r} does not exist; pass a provider-churn "
            f"JSON series ({SERIES_FORMAT}) or a folder of them"
        )
    series: list[AvailabilitySeries] = []
    skipped: Counter = Counter()
    problems: list[str] = []
    num_problems = 0

    def problem(text: str) -> None:
        nonlocal num_problems
        num_problems += 1
        if len(problems) < MAX_MALFORMED_EXAMPLES:
            problems.append(text)

    for file in files:
        try:
            gap_s, raw = _read_series_file(file)
        except _BadSeriesFile as e:
            skipped[f"unreadable series file ({e})"] += 1
            problem(f"{file.name}: {e.detail}")
            continue
        counts, previous, bad = [], 0, []
        for i, value in enumerate(raw):
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                previous = value
            else:
                skipped["bad live count (kept the previous one)"] += 1
                bad.append((i, value))
            counts.append(previous)
        if bad:
            i, value = bad[0]
            problem(
                f"{file.name}: {len(bad)} bad live count(s) kept the previous one, "
                f"first data[{i}] = {_short(value)} (not an integer >= 0)"
            )
        if max(counts, default=0) == 0:
            skipped["series never has a live machine"] += 1
            problem(
                f"{file.name}: never has a live machine"
                + (f" (all {len(counts)} counts are 0)" if counts else " (no counts)")
            )
            continue
        series.append(AvailabilitySeries(file.stem, gap_s, tuple(counts)))
    if not series:
        listed = "; ".join(problems[:5])
        if num_problems > 5:
            listed += f"; and {num_problems - 5} more"
        raise ConfigError(
            f"no usable availability series under {str(path)!r}: {listed}; each "
            f"file must hold {SERIES_FORMAT} with a live machine at some point"
        )
    return Availability(series, skipped, problems)
