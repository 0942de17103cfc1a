"""Request traces: readers for public LLM traces and a generator of shifting mixes.

A trace is a list of requests, each with an arrival time, a prompt length and an
output length (both in tokens). Two public formats are read:

- Azure LLM inference traces (CSV ``TIMESTAMP, ContextTokens, GeneratedTokens``,
  timestamps such as ``2023-11-16 18:15:46.6805900``), as released with
  Splitwise (Patel et al., ISCA'24);
- Mooncake traces (JSON lines with ``timestamp`` in milliseconds from the start,
  ``input_length``, ``output_length``), as released with Mooncake (FAST'25).

Rows that cannot be read (a missing or non-numeric field, a length below one,
an unreadable timestamp) are skipped, counted and reported with their line
numbers, so one bad row never loses the rest of a trace. Rows out of time order
are kept and sorted into arrival order (counted as ``num_reordered``).

`generate_shifting_trace` builds a synthetic trace whose prompt/output mix moves
between prompt-heavy and output-heavy phases, the situation in which a fixed
split of prefill and decode instances is wrong half of the time.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from raysys.runtime.errors import ConfigError
from raysys.runtime.tables import (
    MAX_MALFORMED_EXAMPLES,
    MalformedRow,
    csv_line,
    csv_rows,
)

logger = logging.getLogger(__name__)

# The first two bytes of a gzip file.
GZIP_MAGIC = b"\x1f\x8b"
# Latest arrival a replay takes (seconds from the start; about 30,000 years).
MAX_ARRIVAL_S = 1e12


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace.

    Attributes:
        request_id: position of the request in the trace (0-based, after
            malformed rows were dropped).
        arrival_s: arrival time in seconds from the start of the trace.
        prompt_tokens: prompt (context) length in tokens, >= 1.
        output_tokens: tokens to generate, >= 1 (the first one comes out of
            the prefill).
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class Trace:
    """Requests in arrival order plus what was skipped while reading them."""

    name: str
    requests: list[TraceRequest]
    num_malformed: int = 0
    malformed: list[MalformedRow] = field(default_factory=list)
    num_reordered: int = 0  # rows that came earlier in time than a row above

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival."""
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    @property
    def mean_rate_rps(self) -> float:
        """Mean arrival rate in requests per second."""
        if len(self.requests) < 2 or self.duration_s <= 0:
            return 0.0
        return (len(self.requests) - 1) / self.duration_s

    def scaled(self, rate_scale: float) -> Trace:
        """The same requests arriving ``rate_scale`` times faster.

        Arrival times are divided by ``rate_scale`` (2.0 doubles the request
        rate); prompt and output lengths are unchanged.

        Raises:
            ConfigError: ``rate_scale`` is not a positive finite number.
        """
        if not (math.isfinite(rate_scale) and rate_scale > 0):
            raise ConfigError(
                f"rate scale {rate_scale!r} is invalid; give a positive number "
                "(2.0 doubles the request rate)"
            )
        requests = [
            replace(r, arrival_s=r.arrival_s / rate_scale) for r in self.requests
        ]
        if requests and requests[-1].arrival_s > MAX_ARRIVAL_S:
            raise ConfigError(
                f"rate scale {rate_scale!r} spreads the trace over "
                f"{requests[-1].arrival_s:.3g} s; past {MAX_ARRIVAL_S:.0e} s a "
                "clock in seconds cannot resolve a millisecond: give a larger scale"
            )
        return replace(self, requests=requests)

    def head(self, num_requests: int | None) -> Trace:
        """The first ``num_requests`` requests (all of them when None)."""
        if num_requests is None or num_requests >= len(self.requests):
            return self
        return replace(self, requests=self.requests[:num_requests])

    def clipped(self, max_total_tokens: int) -> tuple[Trace, int]:
        """Requests cut to fit a model context of ``max_total_tokens``.

        A request fits when its prompt and output tokens fit the context (an
        instance's KV holds them all). One that does not keeps its output up to
        a sixteenth of the context (at least one token), so it still has a
        decode phase, and its prompt keeps its last tokens that fit beside it.
        Returns the new trace and how many requests were cut.
        """
        if max_total_tokens < 2:
            raise ConfigError(
                f"max_total_tokens={max_total_tokens} leaves no room for a prompt "
                "and one output token; give at least 2"
            )
        num_clipped = 0
        requests = []
        keep_output = max(1, max_total_tokens // 16)
        for r in self.requests:
            prompt, output = r.prompt_tokens, r.output_tokens
            if prompt + output > max_total_tokens:
                output = min(output, keep_output)
                prompt = min(prompt, max_total_tokens - output)
                output = min(r.output_tokens, max_total_tokens - prompt)
            if (prompt, output) != (r.prompt_tokens, r.output_tokens):
                num_clipped += 1
                r = replace(r, prompt_tokens=prompt, output_tokens=output)
            requests.append(r)
        return replace(self, requests=requests), num_clipped

    def summary(self) -> dict[str, float]:
        """Counts and mean lengths, for reports and logs."""
        prompts = np.array([r.prompt_tokens for r in self.requests] or [0])
        outputs = np.array([r.output_tokens for r in self.requests] or [0])
        return {
            "num_requests": len(self.requests),
            "num_malformed": self.num_malformed,
            "num_reordered": self.num_reordered,
            "duration_s": self.duration_s,
            "mean_rate_rps": self.mean_rate_rps,
            "mean_prompt_tokens": float(prompts.mean()),
            "mean_output_tokens": float(outputs.mean()),
        }


class _Collector:
    """Turns parsed rows into requests and remembers the rows it had to skip."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: list[tuple[float, int, int]] = []
        self.malformed: list[MalformedRow] = []
        self.num_malformed = 0
        self.num_reordered = 0
        self.last_time: float | None = None

    def skip(self, line: int, reason: str) -> None:
        self.num_malformed += 1
        if len(self.malformed) < MAX_MALFORMED_EXAMPLES:
            self.malformed.append(MalformedRow(line, reason))

    def add(self, line: int, time_s: float, prompt: object, output: object) -> None:
        try:
            prompt_tokens = _positive_int(prompt, "prompt length")
            output_tokens = _positive_int(output, "output length")
        except ValueError as e:
            self.skip(line, str(e))
            return
        if not math.isfinite(time_s):
            self.skip(line, f"timestamp {time_s!r} is not finite")
            return
        if self.last_time is not None and time_s < self.last_time:
            self.num_reordered += 1
        else:
            self.last_time = time_s
        self.rows.append((time_s, prompt_tokens, output_tokens))

    def trace(self) -> Trace:
        if self.num_reordered:
            logger.warning(
                "trace %s: %d row(s) out of time order; sorted into arrival order",
                self.name,
                self.num_reordered,
            )
            self.rows.sort(key=lambda row: row[0])  # stable: ties keep file order
        start = self.rows[0][0] if self.rows else 0.0
        requests = [
            TraceRequest(i, t - start, p, o) for i, (t, p, o) in enumerate(self.rows)
        ]
        if self.num_malformed:
            logger.warning(
                "trace %s: skipped %d malformed row(s), first: line %d (%s)",
                self.name,
                self.num_malformed,
                self.malformed[0].line,
                self.malformed[0].reason,
            )
        if not requests:
            raise ConfigError(
                f"trace {self.name} holds no readable request "
                f"({self.num_malformed} malformed rows); check the file's format"
            )
        return Trace(
            self.name,
            requests,
            self.num_malformed,
            self.malformed,
            self.num_reordered,
        )


def _positive_int(value: object, what: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{what} is missing")
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError as e:
        raise ValueError(f"{what} {_short(value)} is too large") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} {_short(value)} is not a number") from e
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{what} {_short(value)} is not a whole number")
    if number < 1:
        raise ValueError(f"{what} {_short(value)} is below 1")
    return int(number)


def _short(value: object, limit: int = 40) -> str:
    # The value as a row's reason quotes it, cut to a readable length.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _azure_time_s(text: str) -> float:
    """Seconds since the epoch of an Azure timestamp (7 fractional digits)."""
    text = text.strip()
    if "." in text:
        whole, frac = text.split(".", 1)
        if not frac.isdigit():
            raise ValueError(f"timestamp {text!r} has a bad fraction")
        fraction = float("0." + frac)
    else:
        whole, fraction = text, 0.0
    stamp = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    return stamp.timestamp() + fraction


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_azure_csv(path: str | Path) -> Trace:
    """Read an Azure LLM inference trace (``TIMESTAMP, ContextTokens, GeneratedTokens``).

    Raises:
        ConfigError: the file is missing or lacks one of the three columns.
    """
    path = _existing(path)
    collector = _Collector(path.name)
    # Each line is parsed on its own (`raysys.runtime.tables`): a stray quote
    # or undecodable bytes cost their own row, counted, never the rest. A
    # byte-order mark (spreadsheet exports write one) is not part of the header.
    with (
        _damaged_gzip_is_config_error(path),
        _open_text(path, newline="", encoding="utf-8-sig", errors="replace") as f,
    ):
        header = csv_line(f.readline())
        if not header:
            raise ConfigError(f"trace {path} is empty; expected a header line")
        header = [h.strip() for h in header]
        missing = [c for c in AZURE_COLUMNS if c not in header]
        if missing:
            raise ConfigError(
                f"trace {path} lacks column(s) {missing}; an Azure trace has the "
                f"header {','.join(AZURE_COLUMNS)} (got {_short(','.join(header), 120)})"
            )
        index = [header.index(c) for c in AZURE_COLUMNS]
        for line, row in csv_rows(f, first_line=2):
            if row is None:
                collector.skip(line, "unbalanced quotes")
                continue
            if all(not cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                collector.skip(line, f"{len(row)} fields, expected {len(header)}")
                continue
            try:
                time_s = _azure_time_s(row[index[0]])
            except ValueError as e:
                collector.skip(line, f"bad timestamp {row[index[0]]!r}: {e}")
                continue
            collector.add(line, time_s, row[index[1]], row[index[2]])
    return collector.trace()


def read_mooncake_jsonl(path: str | Path) -> Trace:
    """Read a Mooncake trace (JSON lines: ``timestamp`` ms, ``input_length``,
    ``output_length``).

    Raises:
        ConfigError: the file is missing or holds no readable request.
    """
    path = _existing(path)
    collector = _Collector(path.name)
    with _damaged_gzip_is_config_error(path), _open_binary(path) as f:
        for line, raw in enumerate(f, start=1):
            if line == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # a byte-order mark, not data
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                collector.skip(line, f"not UTF-8 (byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                collector.skip(line, f"not JSON: {e.msg}")
                continue
            except RecursionError:
                collector.skip(line, "not JSON: nested too deeply")
                continue
            if not isinstance(row, dict):
                collector.skip(line, f"a JSON {type(row).__name__}, not an object")
                continue
            stamp = row.get("timestamp")
            if isinstance(stamp, bool) or not isinstance(stamp, int | float):
                collector.skip(line, f"timestamp {_short(stamp)} is not a number")
                continue
            try:
                time_s = stamp / 1000.0
            except OverflowError:
                collector.skip(line, f"timestamp {_short(stamp)} is too large")
                continue
            collector.add(
                line, time_s, row.get("input_length"), row.get("output_length")
            )
    return collector.trace()


def load_trace(path: str | Path) -> Trace:
    """Read a trace, choosing the reader by extension (``.csv`` or ``.jsonl``).

    A gzip-compressed file (``trace.csv.gz``, or compressed under its plain
    name) is read as it is.

    Raises:
        ConfigError: unknown extension, missing file, or unreadable header.
    """
    path = _existing(path)
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    if suffix == ".csv":
        return read_azure_csv(path)
    if suffix in (".jsonl", ".json"):
        return read_mooncake_jsonl(path)
    raise ConfigError(
        f"trace {path} has extension {suffix!r}; give an Azure .csv or a "
        "Mooncake .jsonl file"
    )


def _gzipped(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if _gzipped(path) else path.open("rb")


def _open_text(path: Path, **kwargs: Any) -> TextIO:
    if _gzipped(path):
        return gzip.open(path, "rt", **kwargs)
    return path.open(**kwargs)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"trace file {str(path)!r} is a folder; give a trace file")
    if not path.is_file():
        raise ConfigError(f"trace file {str(path)!r} does not exist; give its path")
    return path


@contextlib.contextmanager
def _damaged_gzip_is_config_error(path: Path) -> Iterator[None]:
    # A truncated or corrupt gzip stream fails mid-read; the rows after the
    # damage cannot be recovered, so the whole read fails, saying why.
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ConfigError(
            f"trace {path}: its gzip data is damaged ({e}); decompress it again "
            "or fetch a fresh copy"
        ) from e


@dataclass(frozen=True)
class TracePhase:
    """A stretch of the synthetic trace with its own length distributions.

    Lengths are log-normal with the given means (in tokens) and a shape of
    ``sigma``; they are clipped to ``[1, max_tokens]``.
    """

    mean_prompt_tokens: float
    mean_output_tokens: float
    rate_factor: float = 1.0


# Alternating prompt-heavy and output-heavy stretches (summarisation-like
# traffic, then chat/reasoning-like traffic), with a busier prompt-heavy phase.
DEFAULT_PHASES = (
    TracePhase(mean_prompt_tokens=2000, mean_output_tokens=80, rate_factor=1.2),
    TracePhase(mean_prompt_tokens=300, mean_output_tokens=500, rate_factor=0.8),
)


def generate_shifting_trace(
    *,
    duration_s: float = 600.0,
    rate_rps: float = 4.0,
    phase_s: float = 120.0,
    phases: tuple[TracePhase, ...] = DEFAULT_PHASES,
    sigma: float = 0.8,
    max_tokens: int = 8192,
    burstiness: float = 1.0,
    seed: int = 0,
) -> Trace:
    """A synthetic trace whose prompt/output mix shifts every ``phase_s`` seconds.

    Arrivals follow a gamma renewal process (``burstiness`` is the squared
    coefficient of variation of the gaps: 1 is Poisson, above 1 is burstier)
    whose rate is ``rate_rps`` times the current phase's ``rate_factor``.
    Phases cycle in order; within a phase prompt and output lengths are
    independent log-normals with the phase's means.

    Raises:
        ConfigError: a non-positive duration, rate, phase length or sigma.
    """
    for name, value in (
        ("duration_s", duration_s),
        ("rate_rps", rate_rps),
        ("phase_s", phase_s),
        ("burstiness", burstiness),
    ):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r} must be a positive number")
    if sigma < 0 or not phases or max_tokens < 1:
        raise ConfigError(
            f"sigma={sigma!r} must be >= 0, phases non-empty and "
            f"max_tokens={max_tokens!r} >= 1"
        )
    rng = np.random.default_rng(seed)
    shape = 1.0 / burstiness
    requests: list[TraceRequest] = []
    now = 0.0
    while True:
        phase = phases[int(now // phase_s) % len(phases)]
        rate = rate_rps * phase.rate_factor
        now += rng.gamma(shape, 1.0 / (rate * shape))
        if now >= duration_s:
            break
        phase = phases[int(now // phase_s) % len(phases)]
        prompt = _lognormal_tokens(rng, phase.mean_prompt_tokens, sigma, max_tokens)
        output = _lognormal_tokens(rng, phase.mean_output_tokens, sigma, max_tokens)
        requests.append(TraceRequest(len(requests), now, prompt, output))
    if not requests:
        raise ConfigError(
            f"duration_s={duration_s} at rate_rps={rate_rps} produced no request; "
            "raise either"
        )
    start = requests[0].arrival_s
    requests = [replace(r, arrival_s=r.arrival_s - start) for r in requests]
    return Trace(f"shifting-{seed}", requests)


def _lognormal_tokens(
    rng: np.random.Generator, mean: float, sigma: float, max_tokens: int
) -> int:
    # mu chosen so the log-normal's mean is `mean`.
    mu = math.log(mean) - sigma * sigma / 2
    return int(min(max(round(rng.lognormal(mu, sigma)), 1), max_tokens))
