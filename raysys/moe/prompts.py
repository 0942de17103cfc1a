"""Prompts for MoE generation: built-in ones, or JSON lines from a file.

A prompt file holds one JSON object per line with either a ``prompt`` string or
a ``turns`` list of strings (the MT-Bench question format; the first turn is
used, since later turns refer to an answer the model gave before).
"""

from __future__ import annotations

import json
from pathlib import Path

from raysys.runtime.errors import ConfigError

# Beginnings of Python modules, the text the bundled pair was trained on (its
# corpus indents with one tab per level; see `raysys.moe.training`).
BUILTIN_PROMPTS = [
    '"""Helpers for reading and writing configuration files."""\n\nimport os\n',
    'class Stack:\n\t"""A last-in, first-out stack."""\n\n\tdef __init__(self):\n',
    "import sys\n\n\ndef main(argv=None):\n\tif argv is None:\n\t\targv = sys.argv[1:]\n",
    'def read_lines(path, encoding="utf-8"):\n\t"""Return the lines of the file at *path*."""\n',
]

# How a prompt from a file is framed for the byte-level pair: as the docstring
# that opens a module, the way most standard-library files begin.
DEFAULT_TEMPLATE = '"""{prompt}\n"""\n\n'


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts of a JSON-lines file (``prompt`` or first of ``turns`` per line).

    Lines end at ``\n`` only (``\r\n`` too): JSON allows a raw U+2028 or U+0085
    inside a string, which `str.splitlines` would take for a line break. A
    UTF-8 byte-order mark at the start is skipped.

    Raises:
        ConfigError: missing or unreadable file, bad JSON, a line with neither
            field or with both, or a ``limit`` below 1.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"prompt limit must be >= 1, got {limit}")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"prompt file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"prompt file {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"prompt file {str(path)!r} is not UTF-8 text ({e.reason} at byte "
            f"{e.start}); give a JSON-lines file"
        ) from e
    except OSError as e:
        raise ConfigError(f"prompt file {str(path)!r} cannot be read: {e}") from e
    prompts = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number} is not valid JSON: {e}") from e
        problem = _record_problem(record)
        if problem:
            raise ConfigError(
                f"{path}:{number}: {problem}; expected an object with a 'prompt' "
                "string or a 'turns' list of strings"
            )
        prompts.append(record["prompt"] if "prompt" in record else record["turns"][0])
        try:
            prompts[-1].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(
                f"{path}:{number}: the prompt holds {prompts[-1][e.start]!r} at "
                f"character {e.start}, which UTF-8 cannot encode ({e.reason}); "
                "fix or drop that line"
            ) from e
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def _record_problem(record: object) -> str | None:
    """What is wrong with one line's record, or None when it holds one prompt."""
    if not isinstance(record, dict):
        return f"got a JSON {_json_type(record)}"
    if "prompt" in record and "turns" in record:
        return "it has both 'prompt' and 'turns', so which is the prompt is unclear"
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            return f"'prompt' is a {_json_type(record['prompt'])}"
        return None
    if "turns" not in record:
        return f"it has neither field (keys {sorted(record)[:5]})"
    turns = record["turns"]
    if not isinstance(turns, list):
        return f"'turns' is a {_json_type(turns)}"
    if not turns:
        return "'turns' is empty"
    if not isinstance(turns[0], str):
        return f"'turns' starts with a {_json_type(turns[0])}"
    return None


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "number")


def frame(prompt: str, template: str) -> str:
    """``template`` with ``{prompt}`` replaced (literal braces elsewhere stay)."""
    return template.replace("{prompt}", prompt)


def read_prompts(
    path: str | Path | None, limit: int | None, template: str
) -> list[str]:
    """File prompts framed by ``template``, or (no path) the built-in prompts.

    Raises:
        ConfigError: a bad prompt file, or a template without ``{prompt}``.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"prompt limit must be >= 1, got {limit}")
    if path is None:
        return BUILTIN_PROMPTS[:limit] if limit else list(BUILTIN_PROMPTS)
    if "{prompt}" not in template:
        raise ConfigError(
            f"prompt template {template!r} has no {{prompt}} placeholder; every "
            "prompt would be the same text"
        )
    return [frame(p, template) for p in load_prompts(path, limit)]
