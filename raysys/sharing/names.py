"""Names that become path components: tenants, workloads, providers.

Every name the platform turns into a storage path or an actor name passes
`check_name` first. The rule is deliberately narrow (letters, digits, ``.``,
``_`` and ``-``; starting with a letter or digit; at most 64 characters; no
``..``), so a name can never climb out of its namespace (``../other``), become
an absolute path (``/etc``), smuggle a separator (``a/b``, ``a\\b``), a URI
scheme (``s3:``), a NUL byte or whitespace.
"""

from __future__ import annotations

import re

from raysys.runtime.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = (
    "1 to 64 characters from letters, digits, '.', '_' and '-', starting with a "
    "letter or digit and never containing '..'"
)


class InvalidName(ConfigError):
    """A tenant, workload or provider name that could escape its namespace."""


def check_name(value: object, what: str = "name") -> str:
    """Return ``value`` when it is a safe single path component.

    Args:
        value: the name to check.
        what: what the name names ("tenant", "workload", ...), for the message.

    Raises:
        InvalidName: the name is not a string, or breaks the rule above.
    """
    if not isinstance(value, str):
        raise InvalidName(
            f"{what} name must be a string, got {type(value).__name__} {value!r}"
        )
    if NAME_PATTERN.fullmatch(value) is None or ".." in value:
        raise InvalidName(
            f"{what} name {value!r} is refused: use {NAME_RULE} "
            f"(for example {_suggest(value)!r})"
        )
    return value


def _suggest(value: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value).replace("..", "-")
    cleaned = cleaned.lstrip("._-")[:64]
    return cleaned or "my-name"
