"""Prompt files: what is read, and the errors for files that cannot be."""

from __future__ import annotations

import json

import pytest

from raysys.moe.prompts import BUILTIN_PROMPTS, load_prompts, read_prompts
from raysys.runtime.errors import ConfigError


def test_prompt_and_turns_records_are_read_and_framed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"turns": ["first", "second"]})
        + "\n\n"
        + json.dumps({"prompt": "x = {1}"})
        + "\n"
    )
    assert load_prompts(path) == ["first", "x = {1}"]
    assert load_prompts(path, limit=1) == ["first"]
    assert read_prompts(path, None, "<{prompt}>") == ["<first>", "<x = {1}>"]
    assert read_prompts(None, 2, "unused") == BUILTIN_PROMPTS[:2]


def test_bad_prompt_files_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="is not a file"):
        load_prompts(tmp_path)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(ConfigError, match="binary.jsonl' is not UTF-8"):
        load_prompts(binary)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match="bad.jsonl:2 is not valid JSON"):
        load_prompts(bad_json)
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"question": "a"}\n')
    with pytest.raises(
        ConfigError,
        match=r"nofield.jsonl:1: it has neither field \(keys \['question'\]\)",
    ):
        load_prompts(no_field)
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "ok"}\n{"prompt": "lone \\ud800 surrogate"}\n')
    with pytest.raises(ConfigError, match="surrogate.jsonl:2: the prompt holds"):
        load_prompts(surrogate)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(empty)


def test_template_without_placeholder_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ConfigError, match="'Q: ' has no {prompt} placeholder"):
        read_prompts(path, None, "Q: ")


def test_bom_and_unicode_line_separators_inside_strings_are_read(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False),
        json.dumps({"turns": ["c\x85d"]}, ensure_ascii=False),
    ]
    path.write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    assert load_prompts(path) == ["a\u2028b", "c\x85d"]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ([1, 2], "got a JSON list"),
        ("text", "got a JSON string"),
        ({"turns": "abc"}, "'turns' is a string"),
        ({"turns": []}, "'turns' is empty"),
        ({"turns": [3, "a"]}, "'turns' starts with a number"),
        ({"prompt": None}, "'prompt' is a null"),
        ({"prompt": "p", "turns": ["t"]}, "it has both 'prompt' and 'turns'"),
        ({"prompt": 5, "turns": ["t"]}, "it has both 'prompt' and 'turns'"),
    ],
)
def test_each_bad_record_names_its_problem_and_line(tmp_path, record, problem):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ConfigError, match=rf"p.jsonl:2: {problem}"):
        load_prompts(path)


def test_a_limit_below_one_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ConfigError, match="prompt limit must be >= 1, got 0"):
        load_prompts(path, limit=0)
    with pytest.raises(ConfigError, match="prompt limit must be >= 1, got 0"):
        read_prompts(None, 0, "{prompt}")
