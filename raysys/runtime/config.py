"""Validated configuration for jobs and services.

Every job reads one pydantic model. Values come, in rising precedence, from the
model's defaults, an optional YAML or JSON file (``--config FILE``), and
command-line flags derived from the model's fields (``max_new_tokens`` becomes
``--max-new-tokens``); ``--set a.b=value`` reaches nested fields. Validation runs
before any work starts, and a bad value fails with a `ConfigError` that names the
field, the value given and what would fix it.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from raysys.runtime.errors import ConfigError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base class of every raysys configuration: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def flag_name(field: str) -> str:
    """The command-line flag of a field: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + field.replace("_", "-")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping from ``path``.

    Raises:
        ConfigError: the file is missing, unreadable, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass an existing file"
        )
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML/JSON: {e}"
        ) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} holds a {type(data).__name__}; "
            "it must hold a mapping of field names to values"
        )
    return data


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a nested section")
    node[keys[-1]] = value


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE, for example --set a.b=3"
        )
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _add_field_flag(parser: argparse.ArgumentParser, name: str, field: Any) -> None:
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    help_text = field.description or ""
    if not field.is_required():
        help_text += f" (default: {field.get_default(call_default_factory=True)!r})"
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = [str(a) for a in typing.get_args(annotation)]
    elif origin in (list, tuple, set):
        kwargs["nargs"] = "+"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return  # nested sections are reached with --set or the config file
    parser.add_argument(flag_name(name), **kwargs)


def build_parser(
    cls: type[Config], description: str | None = None
) -> argparse.ArgumentParser:
    """An argument parser with ``--config``, ``--set`` and one flag per field."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip()
    )
    parser.add_argument("--config", help="YAML or JSON file with field values")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any field, nested ones with dots (repeatable)",
    )
    for name, field in cls.model_fields.items():
        _add_field_flag(parser, name, field)
    return parser


def format_validation_error(cls: type[BaseModel], error: ValidationError) -> str:
    """One line per bad field: its flag, the problem, the value given and the fix."""
    lines = [f"invalid {cls.__name__}:"]
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "<config>"
        top = str(item["loc"][0]) if item["loc"] else ""
        field = cls.model_fields.get(top)
        where = flag_name(loc) if "." not in loc else f"--set {loc}=..."
        got = item.get("input")
        line = f"  {loc} ({where}): {item['msg']}"
        if item["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            line += f"; remove it (known fields: {known})"
        elif item["type"] == "missing":
            line += "; give a value"
        else:
            line += f" (got {got!r})"
        if field is not None and field.description:
            line += f"; expected: {field.description}"
        lines.append(line)
    return "\n".join(lines)


def validate_config(cls: type[C], data: dict[str, Any]) -> C:
    """Validate ``data`` as ``cls``, turning pydantic's error into a `ConfigError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(cls, e)) from e


def load_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    description: str | None = None,
) -> C:
    """Build a validated config from defaults, ``--config FILE``, flags and ``--set``.

    Raises:
        ConfigError: a value is invalid; the message names the field and the fix.
    """
    parser = build_parser(cls, description)
    namespace = vars(parser.parse_args(argv))
    data: dict[str, Any] = {}
    config_path = namespace.pop("config")
    if config_path:
        data.update(read_config_file(config_path))
    for item in namespace.pop("set"):
        key, value = _parse_set(item)
        _set_dotted(data, key, value)
    data.update({k: v for k, v in namespace.items() if v is not None})
    return validate_config(cls, data)
