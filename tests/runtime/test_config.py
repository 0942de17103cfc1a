import json
import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, model_validator

from raysys.runtime.config import Config, OutputDir, OutputFile, load_config
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


def test_unknown_nested_key_lists_that_sections_fields():
    with pytest.raises(ConfigError) as info:
        load_config(Sample, ["--set", "nested.deep=1"])
    assert "(known fields: depth)" in str(info.value)


def test_infinite_numbers_are_refused():
    with pytest.raises(ConfigError, match="finite number"):
        load_config(Sample, ["--rtol", "inf"])


class Paired(Config):
    low: int = 1
    high: int = 2

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low={self.low} exceeds high={self.high}")
        return self


def test_check_across_fields_prints_its_message_alone():
    with pytest.raises(ConfigError) as info:
        load_config(Paired, ["--low", "5"])
    assert str(info.value) == "invalid Paired:\n  low=5 exceeds high=2"


def test_config_file_that_is_a_folder_or_not_text(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(Sample, ["--config", str(tmp_path)])
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"rtol: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(Sample, ["--config", str(path)])


class Outputs(Config):
    out: OutputFile = Path("out/report.json")
    folder: OutputDir = Path("out/run")


def test_output_paths_are_checked_up_front(tmp_path):
    (tmp_path / "afile").write_text("")
    good = load_config(
        Outputs,
        ["--out", str(tmp_path / "new" / "r.json"), "--folder", str(tmp_path / "d")],
    )
    assert good.out == tmp_path / "new" / "r.json"
    assert not (tmp_path / "new").exists()  # checked, not created
    bad = {
        "--out": [
            str(tmp_path),
            "",
            str(tmp_path / "afile" / "r.json"),
            f"{tmp_path}/not-made-yet/",  # a folder, though it does not exist yet
        ],
        "--folder": [str(tmp_path / "afile"), str(tmp_path / "afile" / "sub")],
    }
    for flag, values in bad.items():
        for value in values:
            with pytest.raises(ConfigError, match=flag):
                load_config(Outputs, [flag, value])


@pytest.mark.parametrize("value", ["-1e-5", "-2.5E+3", "-.5e1", "-inf", "-NaN"])
def test_a_negative_number_in_any_form_reaches_validation(value):
    # argparse takes "-1e-5" for an option and would fail without naming it.
    with pytest.raises(
        ConfigError, match=r"rtol \(--rtol\).*got " + re.escape(repr(value))
    ):
        load_config(Sample, ["--rtol", value])


def test_only_flags_that_take_one_value_are_joined_to_a_negative_number():
    assert load_config(Sample, ["--names", "a", "--rtol", "2e-3"]).rtol == 2e-3
    with pytest.raises(SystemExit):  # --verbose takes no value: -1e-5 stays a flag
        load_config(Sample, ["--verbose", "-1e-5"])
    cfg = load_config(Sample, ["--set", "max_new_tokens=-3"])
    assert cfg.max_new_tokens == -3


def test_an_empty_config_path_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="names no file"):
        load_config(Sample, ["--config", ""])


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [
        ("cfg.yaml", "rtol: 0.1\nrtol: 0.2\n", "rtol"),
        ("cfg.yaml", "nested:\n  depth: 2\n  depth: 3\n", "depth"),
        ("cfg.json", '{"rtol": 0.1, "rtol": 0.2}', "rtol"),
    ],
)
def test_a_key_given_twice_in_a_file_is_refused(tmp_path, name, text, key):
    # YAML and JSON parsers keep the last value without a word.
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"gives '{key}' twice"):
        load_config(Sample, ["--config", str(path)])


def test_yaml_merge_keys_may_still_override_their_base(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("names: &n [a]\nnested:\n  <<: {depth: 2}\n  depth: 5\n")
    assert load_config(Sample, ["--config", str(path)]).nested.depth == 5


def test_set_cannot_index_a_list():
    with pytest.raises(ConfigError, match="'names' is a list") as info:
        load_config(Sample, ["--set", "names.0=x"])
    assert "--set names=" in str(info.value)


def test_errors_point_only_to_flags_that_exist():
    # A nested section has no flag of its own; an unknown key none at all.
    with pytest.raises(ConfigError) as info:
        load_config(Sample, ["--set", "nested=3"])
    assert "--set nested=..." in str(info.value)
    assert "(--nested)" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(Sample, ["--set", "ключ=1"])
    assert "ключ: Extra inputs" in str(info.value)
    assert "--ключ" not in str(info.value)


SUBMITTED = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})


def test_a_submitted_job_refuses_relative_outputs_defaults_included(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", SUBMITTED)
    with pytest.raises(ConfigError, match="--out 'out/report.json' is relative"):
        load_config(Outputs, ["--folder", str(tmp_path)])
    with pytest.raises(ConfigError, match="--folder 'run' is relative"):
        load_config(Outputs, ["--out", str(tmp_path / "r.json"), "--folder", "run"])
    cfg = load_config(
        Outputs, ["--out", str(tmp_path / "r.json"), "--folder", str(tmp_path)]
    )
    assert cfg.out.is_absolute()


def test_relative_outputs_are_fine_outside_a_submitted_job(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config(Outputs, []).out == Path("out/report.json")


def test_the_job_config_variable_is_the_one_the_installed_ray_sets():
    # Ray's job API sets it in a submitted driver; the name is Ray-internal.
    from ray._private.runtime_env import constants

    from raysys.runtime.config import RAY_JOB_CONFIG_ENV

    assert constants.RAY_JOB_CONFIG_JSON_ENV_VAR == RAY_JOB_CONFIG_ENV


class Texts(Config):
    """Fields that YAML's scalar rules would change behind the user's back."""

    name: str = "x"
    seed: int = 0
    rate: float = 1.0
    flag: bool = False
    maybe: int | None = 3
    names: list[str] = Field(default_factory=list)
    weights: dict[str, float] = Field(default_factory=dict)


@pytest.mark.parametrize(
    ("item", "field", "expected"),
    [
        ("name=no", "name", "no"),
        ("name=2024-01-01", "name", "2024-01-01"),
        ("name=1:30", "name", "1:30"),
        ('name="12"', "name", "12"),
        ("seed=010", "seed", 10),
        ("rate=1e3", "rate", 1000.0),
        ("flag=true", "flag", True),
        ("flag=no", "flag", False),
        ("maybe=null", "maybe", None),
        ("names=[a, b]", "names", ["a", "b"]),
        ('names=["a b", "c"]', "names", ["a b", "c"]),
        ("weights={a: 1, b: 2.5}", "weights", {"a": 1.0, "b": 2.5}),
    ],
)
def test_set_values_are_json_or_text_not_yaml_scalars(item, field, expected):
    cfg = load_config(Texts, ["--set", item])
    assert getattr(cfg, field) == expected
    assert type(getattr(cfg, field)) is type(expected)
