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
import numbers
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
)

from raysys.runtime.errors import ConfigError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base class of every raysys configuration: unknown keys are errors, and
    so are infinite and NaN numbers."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False
    )


def is_whole_number(value: object) -> bool:
    """An integer of any kind (int, numpy, torch via ``numbers``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_writable_place(path: Path, what: str) -> None:
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
    check_writable_place(path.parent, "output file")
    return path


def check_output_dir(path: Path) -> Path:
    """A folder a job can write into (it may not exist yet), checked up front.

    Raises:
        ValueError: an existing file, or not creatable or writable.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} is a file; give a folder")
    check_writable_place(path, "output folder")
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


def refuse_folder_form(value: Any) -> Any:
    """An output file given as ``dir/`` names a folder, even one not made yet.

    Raises:
        ValueError: the path ends in a path separator.
    """
    if isinstance(value, str) and value.endswith(("/", os.sep)) and value.strip("/"):
        raise ValueError(
            f"output file {value!r} ends in {value[-1]!r}, so it names a folder; "
            f"give a file path, such as {value + 'report.json'!r}"
        )
    return value


# Field types of job outputs: bad paths fail with the config, not after the run.
OutputFile = Annotated[
    Path, BeforeValidator(refuse_folder_form), AfterValidator(check_output_file)
]
OutputDir = Annotated[Path, AfterValidator(check_output_dir)]

# Set by Ray's job API in a submitted job's driver: its runtime_env, metadata.
# Ray does not document it (`ray._private.runtime_env.constants` defines it);
# tests/runtime/test_config.py pins the name against the installed Ray.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def runs_from_working_dir_copy(environ: dict[str, str] | None = None) -> bool:
    """Whether this process is the driver of a job submitted with a working dir.

    Such a driver runs in Ray's unpacked copy of the working dir, under the
    cluster's temp dir: what it writes there is shared with every job of the
    same package and deleted with the cluster (`raysys down`).
    """
    raw = (os.environ if environ is None else environ).get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return False
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return bool(isinstance(runtime_env, dict) and runtime_env.get("working_dir"))


def _is_output_type(annotation: Any) -> bool:
    # OutputFile / OutputDir, alone or inside Optional[...].
    if annotation in (OutputFile, OutputDir):
        return True
    return any(_is_output_type(a) for a in typing.get_args(annotation))


def _has_output_check(metadata: list[Any]) -> bool:
    # pydantic moves a bare Annotated field's validators into its metadata.
    checks = (check_output_file, check_output_dir)
    return any(getattr(m, "func", None) in checks for m in metadata)


def refuse_relative_outputs(cfg: BaseModel) -> None:
    """In a submitted job, refuse output paths relative to its working dir copy,
    defaults included (a report written there would be lost with the cluster).

    Raises:
        ConfigError: naming each such field and its path.
    """
    if not runs_from_working_dir_copy():
        return
    bad = [
        (name, value)
        for name, field in type(cfg).model_fields.items()
        if (_is_output_type(field.annotation) or _has_output_check(field.metadata))
        and isinstance(value := getattr(cfg, name), Path)
        and not value.is_absolute()
    ]
    if bad:
        raise ConfigError(
            "; ".join(
                f"{flag_name(name)} {str(value)!r} is relative, and this submitted "
                "job runs in Ray's temporary copy of its working dir, which is "
                "deleted with the cluster: give an absolute path"
                for name, value in bad
            )
        )


def flag_name(field: str) -> str:
    """The command-line flag of a field: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + field.replace("_", "-")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping from ``path``.

    Raises:
        ConfigError: the file is missing, unreadable, not a mapping, or gives
            one key twice.
    """
    if not str(path).strip():
        raise ConfigError("--config '' names no file; pass a YAML or JSON file")
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
        data = (
            json.loads(text, object_pairs_hook=_json_mapping)
            if path.suffix.lower() == ".json"
            else _load_yaml(text)
        )
    except _DuplicateKey as e:
        raise ConfigError(
            f"config file {str(path)!r} gives {e.args[0]!r} twice; keep one"
        ) from e
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


class _DuplicateKey(ValueError):
    """A mapping in a config file gives one key twice (YAML and JSON would
    silently keep the last)."""


def _json_mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: keys given here may override the base's
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class names an unhashable key itself
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    # yaml.safe_load with the duplicate-key check: a SafeLoader subclass.
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a nested section")
    node[keys[-1]] = value


def _check_set_path(cls: type[BaseModel], dotted: str) -> None:
    """Refuse ``--set a.b=...`` where ``a`` is a list: a dotted key cannot index
    one (it would become a mapping ``{"b": ...}`` and fail as "not a list")."""
    model: Any = cls
    keys = dotted.split(".")
    for i, key in enumerate(keys[:-1]):
        field = model.model_fields.get(key) if _is_model(model) else None
        if field is None:
            return  # unknown keys are named by validation
        annotation = _unwrap_optional(field.annotation)
        if typing.get_origin(annotation) in (list, tuple, set) or annotation in (
            list,
            tuple,
            set,
        ):
            whole = ".".join(keys[: i + 1])
            raise ConfigError(
                f"--set {dotted}: {whole!r} is a list, which a dotted key cannot "
                f"index; give the whole list, e.g. --set {whole}='[a, b]'"
            )
        model = annotation


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE, for example --set a.b=3"
        )
    key, raw = item.split("=", 1)
    # JSON for numbers, true/false/null, quoted strings, lists and objects; a
    # YAML flow list or mapping (``[a, b]``, ``{k: v}``); anything else stays
    # the text it is, which the field converts as it converts a flag's value
    # (YAML's scalars would turn ``no`` into False, ``010`` into 8 and
    # ``1:30`` into 90).
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        pass
    if raw.lstrip().startswith(("[", "{")):
        try:
            return key.strip(), yaml.safe_load(raw)
        except yaml.YAMLError:
            pass
    return key.strip(), raw


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
    cls: type[Config], description: str | None = None, *, prog: str | None = None
) -> argparse.ArgumentParser:
    """An argument parser with ``--config``, ``--set`` and one flag per field."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description or (cls.__doc__ or "").strip()
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


# A negative number argparse would take for an option (it knows only forms such
# as -3 and -0.5): exponents, and the non-finite values validation then names.
_NEGATIVE_NUMBER = re.compile(
    r"^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$|^-(inf|infinity|nan)$", re.IGNORECASE
)


def attach_negative_numbers(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> list[str]:
    """``--rtol -1e-5`` as ``--rtol=-1e-5``, so the value reaches validation.

    Only flags of ``parser`` that take exactly one value are joined.
    """
    takes_one = {
        option
        for action in parser._actions  # argparse keeps no public list of them
        if action.nargs is None and action.option_strings
        for option in action.option_strings
    }
    out: list[str] = []
    for token in argv:
        if out and out[-1] in takes_one and _NEGATIVE_NUMBER.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


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
        got = item.get("input")
        where = _where(cls, item["loc"], item["type"]) if flags else None
        where = f" ({where})" if where else ""
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


def _where(cls: type[BaseModel], loc: Sequence[Any], error_type: str) -> str | None:
    # How to give the value on the command line: the field's own flag for a
    # top-level field that has one, else --set; none for a key no field has.
    if error_type == "extra_forbidden":
        return None
    field = cls.model_fields.get(str(loc[0]))
    if field is None:
        return None
    dotted = ".".join(str(p) for p in loc)
    if len(loc) == 1 and not _is_model(_unwrap_optional(field.annotation)):
        return flag_name(dotted)
    return f"--set {dotted}=..."


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
    prog: str | None = None,
) -> C:
    """Build a validated config from defaults, ``--config FILE``, flags and ``--set``.

    Raises:
        ConfigError: a value is invalid; the message names the field and the fix.
    """
    parser = build_parser(cls, description, prog=prog)
    argv = sys.argv[1:] if argv is None else argv
    namespace = vars(parser.parse_args(attach_negative_numbers(parser, argv)))
    data: dict[str, Any] = {}
    config_path = namespace.pop("config")
    if config_path is not None:  # `--config ""` is a mistake, not "no file"
        data.update(read_config_file(config_path))
    for item in namespace.pop("set"):
        key, value = _parse_set(item)
        _check_set_path(cls, key)
        _set_dotted(data, key, value)
    data.update({k: v for k, v in namespace.items() if v is not None})
    cfg = validate_config(cls, data)
    refuse_relative_outputs(cfg)
    return cfg
