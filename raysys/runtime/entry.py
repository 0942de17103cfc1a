"""Shared plumbing of command-line entry points (jobs and the ``raysys`` CLI)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from raysys.runtime.config import Config, load_config
from raysys.runtime.errors import ConfigError, RaysysError

C = TypeVar("C", bound=Config)


def setup_logging(level: str | None = None) -> None:
    """One log format for every entry point; ``RAYSYS_LOG_LEVEL`` overrides INFO."""
    level = level or os.environ.get("RAYSYS_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_job(
    cls: type[C],
    body: Callable[[C], object],
    argv: Sequence[str] | None = None,
    *,
    description: str | None = None,
) -> int:
    """Validate the config, then run ``body``; a bad config exits 2 before any work.

    SIGTERM (what ``timeout``, ``kill`` and ``ray job stop`` send) ends the job
    as Ctrl-C does, so its cleanup runs: a cluster it started is stopped.
    """
    setup_logging()
    exit_on_sigterm()
    try:
        cfg = load_config(cls, argv, description=description)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        body(cfg)
    except (ConfigError, RaysysError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread, so ``finally`` runs.

    Only the main thread can set signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)


def sigterm_exits() -> bool:
    """Whether :func:`exit_on_sigterm` set this process's SIGTERM handler."""
    return signal.getsignal(signal.SIGTERM) is _stop
