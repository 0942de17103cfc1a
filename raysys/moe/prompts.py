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

    Raises:
        ConfigError: missing or unreadable file, bad JSON, or a line with
            neither field.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"prompt file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"prompt file {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"prompt file {str(path)!r} is not UTF-8 text ({e.reason} at byte "
            f"{e.start}); give a JSON-lines file"
        ) from e
    except OSError as e:
        raise ConfigError(f"prompt file {str(path)!r} cannot be read: {e}") from e
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number} is not valid JSON: {e}") from e
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif (
            isinstance(record, dict)
            and isinstance(record.get("turns"), list)
            and record["turns"]
            and isinstance(record["turns"][0], str)
        ):
            prompts.append(record["turns"][0])
        else:
            raise ConfigError(
                f"{path}:{number}: expected an object with a 'prompt' string or a "
                "'turns' list of strings"
            )
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
    if path is None:
        return BUILTIN_PROMPTS[:limit] if limit else list(BUILTIN_PROMPTS)
    if "{prompt}" not in template:
        raise ConfigError(
            f"prompt template {template!r} has no {{prompt}} placeholder; every "
            "prompt would be the same text"
        )
    return [frame(p, template) for p in load_prompts(path, limit)]
