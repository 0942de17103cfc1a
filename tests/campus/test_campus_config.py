"""The campus job's config: inputs given as relative paths survive the job
leaving its working directory, and bad values stop it before any cluster."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from raysys.runtime.config import load_config
from raysys.runtime.errors import ConfigError

JOB = Path(__file__).resolve().parents[2] / "jobs" / "campus.py"


@pytest.fixture(scope="module")
def campus():
    spec = importlib.util.spec_from_file_location("campus_job", JOB)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the annotations there
    spec.loader.exec_module(module)
    return module


def test_relative_inputs_are_read_after_the_job_leaves_its_folder(
    campus, tmp_path, monkeypatch
):
    data = tmp_path / "inputs"
    data.mkdir()
    (data / "prompts.jsonl").write_text(
        json.dumps({"prompt": "first question"})
        + "\n"
        + json.dumps({"turns": ["second question"]})
        + "\n"
    )
    (data / "trace.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        campus.CampusConfig,
        [
            "--prompts", "inputs/prompts.jsonl",
            "--trace", "inputs/trace.csv",
            "--moe-prompts", "2",
            "--store", "ckpt",
            "--out", "out",
        ],
    )  # fmt: skip
    campus.absolute_paths(cfg)
    os.chdir(tmp_path.parent)  # as Campus.start does
    assert cfg.out == tmp_path / "out"
    assert cfg.store == str(tmp_path / "ckpt")
    specs = campus.tenant_specs(cfg)
    assert specs["serving"][1]["trace"] == str(data / "trace.csv")
    prompts = specs["moe"][1]["prompts"]
    assert len(prompts) == 2
    assert "first question" in prompts[0] and "second question" in prompts[1]
    assert campus.describe_inputs(cfg)["moe"] == str(data / "prompts.jsonl")


def test_bad_values_name_the_field(campus, tmp_path):
    with pytest.raises(ConfigError, match="nows_instances") as e:
        load_config(campus.CampusConfig, ["--set", "nows_instances=many"])
    assert "'many'" in str(e.value)
    with pytest.raises(ConfigError, match="providers"):
        load_config(campus.CampusConfig, ["--providers", "2"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(campus.CampusConfig, ["--trace", str(tmp_path / "missing.csv")])
    with pytest.raises(ConfigError, match="systems must be"):
        load_config(campus.CampusConfig, ["--systems", "nows", "gpu"])
