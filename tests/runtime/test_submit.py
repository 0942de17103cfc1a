"""Job packages are measured as Ray builds them and refused when too large."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray._private import ray_constants
from ray._private.runtime_env import packaging

from raysys.cli import main
from raysys.runtime import submit
from raysys.runtime.errors import ConfigError, PackageTooLarge
from raysys.runtime.ray_env import (
    PROJECT_ROOT,
    RUNTIME_ENV_EXCLUDES,
    RUNTIME_ENV_FILE,
    load_runtime_env,
    project_runtime_env,
)


def make_tree(root: Path) -> None:
    files = {
        "jobs/run.py": "print('hi')\n",
        "pkg/__init__.py": "",
        "pkg/data/table.txt": "kept: a package folder named data is source\n",
        "pkg/weights.safetensors": "x" * 5000,
        "data/big.bin": "y" * 20000,
        "out/report.json": "{}",
        "ignored_by_git.log": "z" * 100,
        "notes/ü.md": "unicode name\n",
        ".gitignore": "*.log\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "empty").mkdir()


def test_measure_equals_the_zip_ray_builds(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    measure = submit.measure_package(src, RUNTIME_ENV_EXCLUDES)

    zip_path = tmp_path / "pkg.zip"
    excludes = ray_constants.get_runtime_env_default_excludes() + RUNTIME_ENV_EXCLUDES
    packaging.create_package(str(src), zip_path, True, excludes=excludes)
    assert measure.package_bytes == zip_path.stat().st_size

    shipped = {path for path, _ in measure.files}
    assert shipped == {
        ".gitignore",
        "jobs/run.py",
        "pkg/__init__.py",
        "pkg/data/table.txt",
        "notes/ü.md",
    }


def test_project_package_leaves_out_history_envs_and_outputs():
    measure = submit.measure_package(PROJECT_ROOT, RUNTIME_ENV_EXCLUDES)
    shipped = [path for path, _ in measure.files]
    assert "jobs/runtime_env.yaml" in shipped
    assert "raysys/runtime/submit.py" in shipped
    for path in shipped:
        top = path.split("/", 1)[0]
        assert top not in {".git", ".venv", "out", "runs", "data", "shared"}, path
        assert "__pycache__" not in path and not path.endswith(".pyc"), path


def test_the_excludes_have_one_source():
    import yaml

    on_disk = yaml.safe_load(RUNTIME_ENV_FILE.read_text())["excludes"]
    assert on_disk == RUNTIME_ENV_EXCLUDES
    assert project_runtime_env()["excludes"] == on_disk
    assert project_runtime_env()["working_dir"] == str(PROJECT_ROOT)


def test_limit_is_the_dashboard_upload_limit_of_the_installed_ray():
    limit_bytes, source = submit.upload_limit()
    # the job API's HTTP server (100 MiB) binds before the GCS (512 MiB)
    assert limit_bytes == 100 * 1024**2 == ray_constants.DASHBOARD_CLIENT_MAX_SIZE
    assert limit_bytes < packaging.GCS_STORAGE_MAX_SIZE
    assert "DASHBOARD_CLIENT_MAX_SIZE" in source


def test_too_large_names_the_limit_and_the_biggest_files(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "pkg" / "huge.bin").write_text("h" * 30000)
    measure = submit.measure_package(tmp_path, RUNTIME_ENV_EXCLUDES)
    submit.check_package_size(measure, limit_bytes=measure.package_bytes)  # at limit
    with pytest.raises(PackageTooLarge) as info:
        submit.check_package_size(measure, limit_bytes=measure.package_bytes - 1)
    message = str(info.value)
    assert f"({measure.package_bytes - 1} bytes" in message
    biggest = message.split("Biggest files:")[1].splitlines()[1]
    assert biggest.endswith("pkg/huge.bin")
    assert "pkg/" in message.split("Biggest top-level entries:")[1].splitlines()[1]
    assert "jobs/runtime_env.yaml" in message


def test_submit_refuses_a_package_over_rays_limit_before_contacting_anyone(
    tmp_path, capsys
):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "run.py").write_text("print('hi')\n")
    with open(tmp_path / "dataset.bin", "wb") as f:  # sparse: no disk used
        f.truncate(101 * 1024**2)
    status = main(
        [
            "submit",
            "--address",
            "http://127.0.0.1:9",  # nothing listens; must not be reached
            "--working-dir",
            str(tmp_path),
            "--",
            "python",
            "jobs/run.py",
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "over Ray's job upload limit of 100.0 MiB (104857600 bytes" in err
    assert "set by ray._private.ray_constants.DASHBOARD_CLIENT_MAX_SIZE" in err
    assert "dataset.bin" in err


def test_dry_run_prints_the_plain_ray_job_submit(capsys):
    status = main(
        [
            "submit",
            "--address",
            "http://127.0.0.1:8265",
            "--dry-run",
            "--no-wait",
            "--",
            "python",
            "jobs/cluster_check.py",
            "--num-gpus",
            "1",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("package: ") and "token auth on" in out[0]
    command = out[1].split()
    # Plain `ray job submit` needs to be told to send the cluster's token.
    assert command[0] == "RAY_AUTH_MODE=token"
    command = command[1:]
    assert command[1:3] == ["job", "submit"]
    assert command[command.index("--working-dir") + 1] == str(PROJECT_ROOT)
    assert command[command.index("--runtime-env") + 1] == str(RUNTIME_ENV_FILE)
    assert "--no-wait" in command
    assert command[command.index("--") + 1 :] == [
        "python",
        "jobs/cluster_check.py",
        "--num-gpus",
        "1",
    ]


@pytest.mark.parametrize(
    "entrypoint, complaint",
    [([], "no entrypoint"), (["python", "jobs/missing.py"], "jobs/missing.py")],
)
def test_bad_entrypoints_fail_before_submitting(entrypoint, complaint):
    with pytest.raises(ConfigError, match=complaint):
        submit.submit_command(entrypoint, address="http://127.0.0.1:8265")


def test_a_missing_working_dir_or_a_broken_runtime_env_is_named(tmp_path):
    with pytest.raises(ConfigError, match="working dir '/nonexistent' is not a folder"):
        submit.submit_command(
            ["python", "jobs/x.py"], address="a:1", working_dir="/nonexistent"
        )
    broken = tmp_path / "env.yaml"
    broken.write_text("excludes: [a\n")
    with pytest.raises(ConfigError, match="not a valid YAML runtime_env"):
        load_runtime_env(broken)


def test_address_and_auth_defaults(monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert submit.resolve_dashboard_address() == submit.DEFAULT_DASHBOARD_URL
    assert submit.resolve_dashboard_address("http://h:1") == "http://h:1"
    monkeypatch.setenv("RAY_ADDRESS", "http://ray:8265")
    assert submit.resolve_dashboard_address() == "http://ray:8265"
    assert submit.submit_env("http://ray:8265")["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is kept
    assert submit.submit_env("http://ray:8265")["RAY_AUTH_MODE"] == "disabled"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("excludes: []\nenv_var: {A: b}\n", "unknown runtime_env field.* env_var"),
        ("env_vars: {A: 1}\n", "invalid runtime_env.*env_vars"),
    ],
)
def test_a_runtime_env_ray_would_ignore_or_refuse_is_named(tmp_path, text, complaint):
    # Ray takes an unknown key for a plugin's and, with none, ignores it.
    path = tmp_path / "env.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=complaint):
        submit.prepare_submission(tmp_path, path)


def test_a_runtime_env_without_excludes_ships_everything(tmp_path):
    make_tree(tmp_path)
    path = tmp_path / "env.yaml"
    path.write_text("env_vars: {A: b}\n")
    measure = submit.prepare_submission(tmp_path, path)
    assert "data/big.bin" in dict(measure.files)
