"""CSV read one line at a time, so one bad row costs only itself.

The trace formats the project reads (the Azure LLM trace, the GPU pod list)
have no fields spanning lines. Parsing each line on its own keeps a stray quote
from swallowing the rest of the file into one field; callers open files with
``errors="replace"``, so undecodable bytes fail their own row's numbers
instead of the whole read.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# How many malformed rows a reader keeps verbatim for its report (all of them
# are counted).
MAX_MALFORMED_EXAMPLES = 20


@dataclass(frozen=True)
class MalformedRow:
    """A row that was skipped: its 1-based line number and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def csv_line(line: str) -> list[str] | None:
    """The fields of one CSV line, or None when its quoting does not close."""
    try:
        return next(csv.reader([line], strict=True), [])
    except csv.Error:
        return None


def csv_rows(
    lines: Iterable[str], first_line: int = 1
) -> Iterator[tuple[int, list[str] | None]]:
    """``(line number, fields)`` of every non-blank line; fields None when the
    line's quoting does not close."""
    for number, line in enumerate(lines, start=first_line):
        if line.strip():
            yield number, csv_line(line)
