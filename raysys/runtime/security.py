"""Secure defaults shared by everything raysys starts.

Anyone who reaches a Ray cluster's dashboard, job API or GCS can run code on
every node. raysys therefore starts clusters with Ray's token authentication on
(``RAY_AUTH_MODE=token``; the token comes from ``RAY_AUTH_TOKEN``, the file
``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``) and binds the dashboard
and job API to 127.0.0.1 unless asked otherwise. Turning either off is allowed
and logged as a warning; both off on a non-loopback address is the one setting
that hands the cluster to the network, and is logged as loudly as logging
goes. See SECURITY.md for what the token does and does not protect.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost resolves to the network


def token_source(environ: Mapping[str, str] | None = None) -> str | None:
    """Where Ray would read the auth token from, or None when there is none.

    Follows Ray's order: ``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``, then
    ``~/.ray/auth_token``; an empty token counts as none.
    """
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    named = env.get("RAY_AUTH_TOKEN_PATH")
    home = env.get("HOME")
    default = (
        Path(home) / ".ray" / "auth_token" if home else DEFAULT_TOKEN_PATH.expanduser()
    )
    path = Path(named).expanduser() if named else default
    try:
        if path.is_file() and path.read_text().strip():
            return str(path)
    except OSError:
        return None
    return None


def warn_if_exposed(
    host: str, auth: bool, what: str = "the dashboard and job API"
) -> bool:
    """Log how exposed ``what`` is when bound to ``host``; returns ``is_loopback``.

    Non-loopback without authentication is an open door to every node and gets a
    loud warning; loopback without authentication still lets every user of this
    machine in and gets a plain one; non-loopback with a token is noted, since
    the token then crosses the network in clear text unless TLS is in front.
    """
    loopback = is_loopback(host)
    if not loopback and not auth:
        logger.warning(
            "SECURITY WARNING: %s bind to %s with token authentication OFF. Anyone "
            "who can reach this address can submit jobs and run arbitrary code on "
            "every node of the cluster. Turn authentication on (drop --no-auth) or "
            "bind to 127.0.0.1.",
            what,
            host,
        )
    elif not auth:
        logger.warning(
            "token authentication is OFF: every user of this machine can run code "
            "on the cluster through %s at %s",
            what,
            host,
        )
    elif not loopback:
        logger.info(
            "%s bind to %s, reachable from the network and protected by the token; "
            "the token travels in clear text unless a TLS proxy is in front",
            what,
            host,
        )
    return loopback


def token_file_exposed(path: str | Path) -> bool:
    """Whether a token file can be read by users other than its owner.

    On a shared machine such a token lets every other account run code on the
    cluster, which is what token authentication was turned on to prevent.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def warn_if_token_exposed(environ: Mapping[str, str] | None = None) -> None:
    """Log a warning when the token file Ray would read is group/other readable."""
    source = token_source(environ)
    if source is None or source == "RAY_AUTH_TOKEN" or not token_file_exposed(source):
        return
    logger.warning(
        "SECURITY WARNING: the Ray token file %s can be read by other users of "
        "this machine (mode %o), and with it they can run code on the cluster; "
        "run `chmod 600 %s`",
        source,
        stat.S_IMODE(os.stat(source).st_mode),
        source,
    )
