"""The NOWS jobs end to end on the session cluster, with tiny settings."""

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from raysys.runtime import run_job

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def load_job(name):
    spec = importlib.util.spec_from_file_location(name, JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    job = load_job("nows_train")
    argv = [
        "--generate", "48", "--resolution", "16", "--num-test", "8",
        "--epochs", "3", "--modes", "4", "--width", "8", "--num-layers", "2",
        "--projection-channels", "8", "--batch-size", "8", "--out", str(out),
    ]  # fmt: skip
    assert run_job(job.NowsTrainConfig, job.main, argv) == 0
    return out


@pytest.mark.slow
def test_train_job_writes_model_report_and_plot(tiny_model):
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "train_report.json"} <= names
    assert "train_loss.png" in names
    report = json.loads((tiny_model / "train_report.json").read_text())
    assert report["num_train"] == 48 and report["num_epochs"] == 3
    assert len(report["epoch_losses"]) == 3
    assert 0 < report["test_relative_l2"] < 1.5
    meta = json.loads((tiny_model / "config.json").read_text())["metadata"]
    assert meta["family"] == "darcy" and meta["resolution"] == 16


@pytest.mark.slow
def test_solve_job_reports_every_field(tiny_model, tmp_path, capsys):
    job = load_job("nows_solve")
    out = tmp_path / "report.json"
    argv = [
        "--model", str(tiny_model), "--generate", "3", "--resolution", "20",
        "--solver", "amg-cg", "--rtol", "1e-6", "--out", str(out),
    ]  # fmt: skip
    assert run_job(job.NowsSolveConfig, job.main, argv) == 0
    report = json.loads(out.read_text())
    fields = {
        "iterations_cold", "iterations_warm", "matvecs_cold", "matvecs_warm",
        "time_cold_s", "time_warm_s", "residual_cold", "residual_warm",
        "converged_cold", "converged_warm", "fallback", "error",
    }  # fmt: skip
    assert len(report["instances"]) == 3
    for row in report["instances"]:
        assert fields <= row.keys()
        assert row["converged_cold"] and row["converged_warm"]
        assert row["error"] is None
    summary = report["summary"]
    for key in (
        "num_instances", "num_failed", "num_fallbacks",
        "median_matvec_reduction", "time_reduction",
    ):  # fmt: skip
        assert key in summary
    assert summary["num_instances"] == 3 and summary["num_failed"] == 0
    rows = report["instances"]
    assert summary["median_matvec_reduction"] == pytest.approx(
        statistics.median(1 - r["matvecs_warm"] / r["matvecs_cold"] for r in rows)
    )
    assert out.with_suffix(".png").is_file()
    assert "median matvec reduction" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_job_writes_records_for_every_guess(tiny_model, tmp_path):
    job = load_job("bench_nows")
    out = tmp_path / "bench.json"
    argv = [
        "--model", str(tiny_model), "--num-instances", "2", "--resolutions", "16",
        "--solvers", "cg", "--rtols", "1e-3", "1e-6", "--throughput-instances", "2",
        "--throughput-resolution", "16", "--out", str(out),
    ]  # fmt: skip
    assert run_job(job.BenchNowsConfig, job.main, argv) == 0
    report = json.loads(out.read_text())
    keys = {"resolution", "solver", "rtol", "guess", "median_matvec_reduction"}
    assert len(report["results"]) == 6  # 2 rtols x 3 guesses
    guesses = {r["guess"] for r in report["results"]}
    assert guesses == {"operator", "coarse-grid", "zero"}
    for r in report["results"]:
        assert keys | {"time_reduction"} <= r.keys()
        assert r["num_converged_warm"] == 2
        assert r["median_matvecs_refinement"] > 0
    assert [t["num_workers"] for t in report["throughput"]][0] == 1
    energy = report["relative_energy_error"]
    assert {"16/operator", "16/operator+refined", "16/zero+refined"} <= energy.keys()
    assert energy["16/zero"] == pytest.approx(1.0)
    assert energy["16/zero+refined"] < 1.0


def test_bad_solve_config_fails_before_any_work(capsys):
    job = load_job("nows_solve")
    code = run_job(job.NowsSolveConfig, job.main, ["--generate", "2", "--rtol", "-1"])
    assert code == 2
    assert "rtol" in capsys.readouterr().err
    code = run_job(
        job.NowsSolveConfig,
        job.main,
        ["--generate", "2", "--family", "convection-diffusion", "--solver", "cg"],
    )
    assert code == 2
    assert "gmres or bicgstab" in capsys.readouterr().err
    code = run_job(job.NowsSolveConfig, job.main, ["--rtol", "1e-3"])
    assert code == 2
    assert "--data FILE or --generate N" in capsys.readouterr().err
    for extra in (["--solver", "amg-cg"], ["--refinement", "none"]):
        argv = ["--generate", "2", "--guess", "zero", *extra]
        assert run_job(job.NowsSolveConfig, job.main, argv) == 2
        assert "--guess zero" in capsys.readouterr().err


def test_solve_config_builds_the_refinement_asked_for():
    job = load_job("nows_solve")
    cfg = job.NowsSolveConfig(
        generate=2, refine_coarse_factor=8, refine_pre_sweeps=1, refine_cycles=2
    )
    refine = cfg.refinement_settings()
    assert (refine.coarse_factor, refine.num_pre_sweeps) == (8, 1)
    assert (refine.num_post_sweeps, refine.num_cycles) == (0, 2)
    assert (
        job.NowsSolveConfig(generate=2, refinement="none").refinement_settings() is None
    )


@pytest.mark.slow
def test_training_and_predictions_use_a_gpu_provider(add_provider, tmp_path, caplog):
    add_provider("gpu-lab", num_gpus=1)
    train = load_job("nows_train")
    argv = [
        "--generate", "16", "--resolution", "12", "--num-test", "4", "--epochs", "1",
        "--modes", "3", "--width", "4", "--num-layers", "1",
        "--projection-channels", "4", "--out", str(tmp_path / "m"),
    ]  # fmt: skip
    with caplog.at_level("INFO"):
        assert run_job(train.NowsTrainConfig, train.main, argv) == 0
        solve = load_job("nows_solve")
        argv = [
            "--model", str(tmp_path / "m"), "--generate", "2", "--resolution", "12",
            "--out", str(tmp_path / "r.json"),
        ]  # fmt: skip
        assert run_job(solve.NowsSolveConfig, solve.main, argv) == 0
    assert "training in a Ray task on a cluster GPU" in caplog.text
    assert "predictor actor with 1 GPU(s)" in caplog.text
    report = json.loads((tmp_path / "r.json").read_text())
    assert all(r["converged_warm"] for r in report["instances"])


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["--resolutions", "16", "0"], "resolutions.1"),
        (["--resolutions", "-4"], "resolutions.0"),
        (["--solvers", "cg", "minres"], "'minres'"),
        (["--rtols", "0"], "greater than 0 (got '0')"),
        (["--rtols", "1e-3", "-1"], "greater than 0 (got '-1')"),
        (["--rtols", "5"], "less than 1 (got '5')"),
    ],
)
def test_bad_bench_config_fails_before_any_work(argv, bad, capsys):
    job = load_job("bench_nows")
    assert run_job(job.BenchNowsConfig, job.main, argv) == 2
    assert bad in capsys.readouterr().err


def test_solve_config_refuses_a_relative_tolerance_of_one_or_more(capsys):
    job = load_job("nows_solve")
    for rtol in ("1", "5"):
        argv = ["--generate", "2", "--rtol", rtol]
        assert run_job(job.NowsSolveConfig, job.main, argv) == 2
        assert f"less than 1 (got '{rtol}')" in capsys.readouterr().err
    assert job.NowsSolveConfig(generate=2, rtol=0.5).rtol == 0.5
    assert run_job(job.NowsSolveConfig, job.main, ["--generate", "2", "--atol", "inf"])
    assert "atol" in capsys.readouterr().err


def test_solve_config_refuses_a_report_path_the_plot_would_overwrite(tmp_path, capsys):
    job = load_job("nows_solve")
    argv = ["--generate", "2", "--out", str(tmp_path / "r.png")]
    assert run_job(job.NowsSolveConfig, job.main, argv) == 2
    assert "would both be written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_solve_job_refuses_broken_files_and_models_with_one_line(tmp_path, capsys):
    job = load_job("nows_solve")
    np.savez(tmp_path / "empty.npz", a=np.zeros((0, 8, 8)))
    argv = ["--data", str(tmp_path / "empty.npz"), "--guess", "coarse-grid"]
    assert run_job(job.NowsSolveConfig, job.main, argv) == 1
    assert "empty.npz: holds 0 instances" in capsys.readouterr().err

    model = tmp_path / "model"
    model.mkdir()
    pretrained = job.DEFAULT_MODEL
    (model / "config.json").write_text((pretrained / "config.json").read_text())
    weights = (pretrained / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:100])
    argv = ["--model", str(model), "--generate", "2", "--resolution", "8"]
    assert run_job(job.NowsSolveConfig, job.main, argv) == 1
    err = capsys.readouterr().err
    assert f"{model / 'model.safetensors'} is not a readable safetensors file" in err


@pytest.mark.slow
def test_solve_job_fails_when_no_instance_was_solved_but_writes_the_report(
    ray_cluster, tmp_path, capsys
):
    job = load_job("nows_solve")
    np.savez(tmp_path / "bad.npz", a=-np.ones((2, 8, 8)))
    out = tmp_path / "r.json"
    argv = [
        "--data", str(tmp_path / "bad.npz"), "--guess", "coarse-grid",
        "--out", str(out),
    ]  # fmt: skip
    assert run_job(job.NowsSolveConfig, job.main, argv) == 1
    err = capsys.readouterr().err
    assert "error: none of the 2 instances was solved both ways" in err
    assert "cold solves that ran" not in err  # refused: none ran
    report = json.loads(out.read_text())
    assert report["summary"]["num_failed"] == 2
    assert all("must be positive" in r["error"] for r in report["instances"])


def _cd_file(path, num=2, n=8):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        vx=rng.uniform(-1, 1, (num, n, n)),
        vy=rng.uniform(-1, 1, (num, n, n)),
        epsilon=np.full(num, 0.05),
    )
    return str(path)


def test_train_job_refuses_mismatched_inputs_before_any_work(tmp_path, capsys):
    job = load_job("nows_train")
    cd = _cd_file(tmp_path / "cd.npz")
    np.savez(tmp_path / "darcy.npz", a=np.ones((2, 8, 8)))
    darcy = str(tmp_path / "darcy.npz")
    np.savez(tmp_path / "empty.npz", a=np.zeros((0, 8, 8)))
    empty = str(tmp_path / "empty.npz")
    np.savez(
        tmp_path / "nan.npz", a=np.array([np.ones((8, 8)), np.full((8, 8), np.nan)])
    )
    out = ["--epochs", "1", "--out", str(tmp_path / "m")]
    cases = [
        (["--data", cd, "--loss", "energy"], "--loss 'energy' needs the Darcy energy"),
        (
            ["--data", darcy, "--test-data", cd],
            f"--test-data {cd} holds 'convection-diffusion' instances",
        ),
        (
            ["--data", cd, "--init-model", str(job_default_model())],
            "was trained on 'darcy' instances, but the training data is "
            "'convection-diffusion'",
        ),
        (["--generate", "2", "--init-model", "/nonexist"], "/nonexist/config.json"),
        (["--data", empty], "empty.npz: holds 0 instances"),
        (["--data", darcy, "--test-data", empty], "empty.npz: holds 0 instances"),
        (
            ["--data", str(tmp_path / "nan.npz")],
            "instance 'nan-1': field 'a' has 64 non-finite",
        ),
    ]
    for argv, expected in cases:
        assert run_job(job.NowsTrainConfig, job.main, argv + out) == 1, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "m" / "model.safetensors").exists()


def job_default_model():
    from raysys.solvers.predictor import DEFAULT_MODEL

    return DEFAULT_MODEL


@pytest.mark.slow
def test_train_job_on_a_convection_diffusion_file_trains_that_family(
    ray_cluster, tmp_path, monkeypatch
):
    from raysys.solvers import training

    families = []
    real = training.train_operator

    def train_operator(model, train, test, family, settings, on_epoch=None):
        families.append(family)
        return real(model, train, test, family, settings, on_epoch)

    monkeypatch.setattr(training, "train_operator", train_operator)
    job = load_job("nows_train")
    out = tmp_path / "m"
    argv = [
        "--data", _cd_file(tmp_path / "cd.npz", num=4), "--num-test", "2",
        "--epochs", "2", "--modes", "2", "--width", "4", "--num-layers", "1",
        "--projection-channels", "4", "--out", str(out),
    ]  # fmt: skip
    assert run_job(job.NowsTrainConfig, job.main, argv) == 0
    assert families == ["convection-diffusion"]  # not the --family default
    report = json.loads((out / "train_report.json").read_text())
    assert report["family"] == "convection-diffusion"
    assert all(math.isfinite(v) for v in report["epoch_losses"])
    assert math.isfinite(report["test_relative_l2"])


@pytest.mark.slow
def test_bench_job_keeps_finished_resolutions_when_a_later_one_fails(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    from raysys.runtime.errors import RemoteTimeout
    from raysys.solvers import datasets

    real = datasets.generate_instances

    def generate(family, n, *args, **kwargs):
        if n == 12:
            raise RemoteTimeout("generation of 2 instances did not answer within 1 s")
        return real(family, n, *args, **kwargs)

    monkeypatch.setattr(datasets, "generate_instances", generate)
    job = load_job("bench_nows")
    out = tmp_path / "bench.json"
    argv = [
        "--num-instances", "2", "--resolutions", "8", "12", "--solvers", "cg",
        "--rtols", "1e-3", "--throughput-instances", "0", "--out", str(out),
    ]  # fmt: skip
    assert run_job(job.BenchNowsConfig, job.main, argv) == 1
    assert "error: 12x12: generation of 2 instances" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert {r["resolution"] for r in report["results"]} == {8}
    assert all(r["num_converged_warm"] == 2 for r in report["results"])
    assert report["errors"] == [
        "12x12: generation of 2 instances did not answer within 1 s"
    ]


def test_solve_job_refuses_a_model_of_another_family_before_generating(
    tmp_path, capsys, monkeypatch
):
    from raysys.models.fno import FNO, FNOConfig
    from raysys.solvers import datasets

    def no_generation(*args, **kwargs):
        raise AssertionError("instances were generated before the model was checked")

    monkeypatch.setattr(datasets, "generate_instances", no_generation)
    config = FNOConfig(
        in_channels=3, modes=2, width=4, num_layers=1, projection_channels=4,
        metadata={"family": "convection-diffusion"},
    )  # fmt: skip
    FNO(config).save(tmp_path / "cd-model")
    job = load_job("nows_solve")
    argv = [
        "--model", str(tmp_path / "cd-model"), "--generate", "2",
        "--resolution", "8", "--out", str(tmp_path / "r.json"),
    ]  # fmt: skip
    assert run_job(job.NowsSolveConfig, job.main, argv) == 1
    err = capsys.readouterr().err
    assert "trained on 'convection-diffusion' instances, but --family is 'darcy'" in err
    assert not (tmp_path / "r.json").exists()


def test_bench_job_refuses_a_model_of_another_family_before_ray(tmp_path, capsys):
    from raysys.models.fno import FNO, FNOConfig

    config = FNOConfig(
        in_channels=3, modes=2, width=4, num_layers=1, projection_channels=4,
        metadata={"family": "convection-diffusion"},
    )  # fmt: skip
    FNO(config).save(tmp_path / "cd-model")
    job = load_job("bench_nows")
    job.init_ray = lambda: pytest.fail("Ray started before the model was checked")
    argv = ["--model", str(tmp_path / "cd-model"), "--num-instances", "1"]
    assert run_job(job.BenchNowsConfig, job.main, argv) == 1
    assert "give a Darcy --model" in capsys.readouterr().err
