from typing import Literal

import pytest
from pydantic import Field

from raysys.runtime.config import Config, load_config
from raysys.runtime.errors import ConfigError


class Nested(Config):
    depth: int = Field(2, ge=1, description="depth, >= 1")


class Sample(Config):
    """A sample job config."""

    rtol: float = Field(1e-5, gt=0, description="relative tolerance, > 0")
    solver: Literal["cg", "gmres"] = "cg"
    max_new_tokens: int = 16
    verbose: bool = False
    names: list[str] = Field(default_factory=list)
    nested: Nested = Field(default_factory=Nested)


def test_defaults_file_flags_and_set_in_precedence(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("rtol: 0.01\nmax_new_tokens: 5\nnested: {depth: 3}\n")
    cfg = load_config(
        Sample,
        [
            "--config",
            str(path),
            "--max-new-tokens",
            "7",
            "--verbose",
            "--set",
            "nested.depth=9",
        ],
    )
    assert cfg.rtol == 0.01  # from the file
    assert cfg.max_new_tokens == 7  # flag beats file
    assert cfg.verbose is True
    assert cfg.nested.depth == 9  # --set reaches nested fields
    assert cfg.solver == "cg"  # default


def test_json_file_and_list_flag(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"solver": "gmres"}')
    cfg = load_config(Sample, ["--config", str(path), "--names", "a", "b"])
    assert cfg.solver == "gmres"
    assert cfg.names == ["a", "b"]


def test_bad_value_names_field_value_and_fix():
    with pytest.raises(ConfigError) as info:
        load_config(Sample, ["--rtol", "-1"])
    message = str(info.value)
    assert "rtol" in message and "--rtol" in message
    assert "-1" in message
    assert "relative tolerance, > 0" in message


def test_unknown_key_in_file_is_refused_with_known_fields(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("rtoll: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Sample, ["--config", str(path)])
    assert "rtoll" in str(info.value)
    assert "known fields" in str(info.value) and "rtol" in str(info.value)


def test_missing_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Sample, ["--config", str(tmp_path / "nope.yaml")])
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Sample, ["--config", str(path)])


def test_bad_nested_value_points_to_set():
    with pytest.raises(ConfigError) as info:
        load_config(Sample, ["--set", "nested.depth=0"])
    assert "nested.depth" in str(info.value)
    assert "--set nested.depth" in str(info.value)
