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
import os
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from raysys.runtime.errors import ConfigError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base class of every raysys configuration: unknown keys are errors, and
    so are infinite and NaN numbers."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False
    )


def _writable_place(path: Path, what: str) -> None:
    # The nearest existing folder at or above ``path`` must be a writable
    # folder, so ``path`` can be created there once the work is done.
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(
            f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"{what} {str(path)!r} cannot be created: {str(probe)!r} is not writable"
        )
    try:  # permissions say little to root or on special filesystems: try it
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise ValueError(
            f"{what} {str(path)!r} cannot be created: writing in {str(probe)!r} "
            f"fails ({e.strerror or e})"
        ) from e


def check_output_file(path: Path) -> Path:
    """A path a job can write its report to, checked before any work starts.

    Raises:
        ValueError: empty, an existing folder, or not creatable.
    """
    if path.name in ("", ".", ".."):
        raise ValueError(
            f"output file {str(path)!r} has no file name; give one such as "
            "out/report.json"
        )
    if path.is_dir():
        raise ValueError(
            f"output file {str(path)!r} is a folder; give a file path, such as "
            f"{str(path / 'report.json')!r}"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"output file {str(path)!r} is not writable")
    _writable_place(path.parent, "output file")
    return path


def check_output_dir(path: Path) -> Path:
    """A folder a job can write into (it may not exist yet), checked up front.

    Raises:
        ValueError: an existing file, or not creatable or writable.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} is a file; give a folder")
    _writable_place(path, "output folder")
    return path


# Suffixes matplotlib writes that a plot path may have.
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_plot_path(report: Path, plot: Path | None) -> Path:
    """The plot path of a job writing ``report``: ``plot``, or the report's path
    with ``.png``. It must be an image path other than the report's.

    Raises:
        ValueError: the plot would overwrite the report, or is no image.
    """
    path = plot if plot is not None else report.with_suffix(".png")
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(
            f"plot path {str(path)!r} does not end in one of {', '.join(PLOT_SUFFIXES)}"
        )
    if path.resolve() == report.resolve():
        raise ValueError(
            f"the plot and the report would both be written to {str(path)!r}; give "
            "the report a .json path (or the plot another path)"
        )
    return path


# Field types of job outputs: bad paths fail with the config, not after the run.
OutputFile = Annotated[Path, AfterValidator(check_output_file)]
OutputDir = Annotated[Path, AfterValidator(check_output_dir)]


def flag_name(field: str) -> str:
    """The command-line flag of a field: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + field.replace("_", "-")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping from ``path``.

    Raises:
        ConfigError: the file is missing, unreadable, or not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass a file")
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass an existing file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {e.start}): "
            "pass a YAML or JSON file"
        ) from e
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


def format_validation_error(
    cls: type[BaseModel], error: ValidationError, *, flags: bool = True
) -> str:
    """One line per bad field: its flag, the problem, the value given and the fix.

    ``flags=False`` leaves the command-line flags out (values from a file).
    """
    lines = [f"invalid {cls.__name__}:"]
    for item in error.errors():
        if not item["loc"]:  # a check across fields: its message says it all
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
            continue
        loc = ".".join(str(p) for p in item["loc"])
        top = str(item["loc"][0])
        field = cls.model_fields.get(top)
        where = flag_name(loc) if "." not in loc else f"--set {loc}=..."
        got = item.get("input")
        where = f" ({where})" if flags else ""
        line = f"  {loc}{where}: {item['msg'].removeprefix('Value error, ')}"
        if item["type"] == "extra_forbidden":
            known = ", ".join(sorted(_section_fields(cls, item["loc"][:-1])))
            line += f"; remove it (known fields: {known})"
        elif item["type"] == "missing":
            line += "; give a value"
        else:
            line += f" (got {got!r})"
        if field is not None and field.description:
            line += f"; expected: {field.description}"
        lines.append(line)
    return "\n".join(lines)


def _section_fields(cls: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    # The field names of the (nested) section that ``loc`` leads to.
    model: Any = cls
    for key in loc:
        field = model.model_fields.get(str(key)) if _is_model(model) else None
        if field is None:
            break
        model = _unwrap_optional(field.annotation)
    return list(model.model_fields) if _is_model(model) else list(cls.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


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
