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
