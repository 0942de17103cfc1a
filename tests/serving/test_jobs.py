"""The serving jobs' simulation paths end to end on small inputs."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys

import pytest

from raysys.runtime import PROJECT_ROOT


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(
        name, PROJECT_ROOT / "jobs" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the config's annotations there
    spec.loader.exec_module(module)
    return module


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Request k arrives at k/4 s with 200 + 37k prompt tokens and 20 + k output
# tokens, except every tenth from the fifth on, which asks for one token only.
def azure_output_tokens(k: int) -> int:
    return 1 if k % 10 == 5 else 20 + k


AZURE_ROWS = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    + "".join(
        f"2023-11-16 18:15:{10 + k // 4:02d}.{(k % 4) * 25:02d}00000,"
        f"{200 + 37 * k},{azure_output_tokens(k)}\n"
        for k in range(40)
    )
    + "2023-11-16 18:15:59.0000000,oops,3\n"
)


def met_both_slos(row: dict, ttft_slo_s: float, tpot_slo_s: float) -> bool:
    """A report row met its SLOs: completed, first token within the TTFT target,
    and the later tokens at most the TPOT target apart on average (a one-token
    output has no later tokens, so only its TTFT counts)."""
    if row["failed"] or row["finish_s"] is None:
        return False
    if row["output_tokens"] <= 1:
        return row["ttft_s"] <= ttft_slo_s
    first_token_s = row["arrival_s"] + row["ttft_s"]
    tpot_s = (row["finish_s"] - first_token_s) / (row["output_tokens"] - 1)
    return row["ttft_s"] <= ttft_slo_s and tpot_s <= tpot_slo_s


def test_serve_trace_sim_writes_report_and_plot(tmp_path):
    job = load_job("serve_trace")
    trace = tmp_path / "azure.csv"
    trace.write_text(AZURE_ROWS)
    out = tmp_path / "report.json"
    # Targets that some requests meet and some miss (TTFT grows with the prompt,
    # TPOT varies around 17 ms), so the attainment below is a real fraction.
    ttft_slo_s, tpot_slo_s = 0.09, 0.0173
    code = job.run_job(
        job.ServeTraceConfig,
        job.run,
        [
            "--trace", str(trace), "--policy", "static", "--instances", "4",
            "--num-prefill", "3", "--mode", "sim", "--rate-scale", "2",
            "--ttft-slo-s", str(ttft_slo_s), "--tpot-slo-s", str(tpot_slo_s),
            "--out", str(out),
        ],
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["num_requests"] == 40
    assert report["num_malformed"] == 1
    assert report["malformed_rows"] == [
        {"line": 42, "reason": "prompt length 'oops' is not a number"}
    ]
    assert report["num_reordered"] == 0
    # The simulated instances never fail, so every request completes.
    assert (report["num_completed"], report["num_failed"]) == (40, 0)
    assert report["policy"] == "static 3P"
    assert report["num_role_flips"] == 0

    # The rows are the trace's requests, arriving twice as fast.
    rows = report["requests"]
    assert [
        (r["request_id"], r["arrival_s"], r["prompt_tokens"], r["output_tokens"])
        for r in rows
    ] == [(k, k * 0.25 / 2, 200 + 37 * k, azure_output_tokens(k)) for k in range(40)]
    for row in rows:
        assert not row["failed"] and row["finish_s"] is not None
        assert row["prefill_instance"] in (0, 1, 2)
        if row["output_tokens"] == 1:
            # Done at its first token: nothing to hand to the decode instance.
            assert not row["handoff"]
            assert row["tpot_s"] is None  # no time per output token
        else:
            assert row["handoff"] and row["decode_instance"] == 3
            first_token_s = row["arrival_s"] + row["ttft_s"]
            assert row["tpot_s"] == pytest.approx(
                (row["finish_s"] - first_token_s) / (row["output_tokens"] - 1)
            )
    assert report["num_handoffs"] == sum(azure_output_tokens(k) > 1 for k in range(40))

    # Attainment and percentiles recomputed from the rows.
    met = [met_both_slos(r, ttft_slo_s, tpot_slo_s) for r in rows]
    assert [r["met_slo"] for r in rows] == met
    assert 0 < sum(met) < len(rows)
    assert report["slo_attainment"] == pytest.approx(sum(met) / len(rows))
    ttfts = [r["ttft_s"] for r in rows]
    deciles = statistics.quantiles(ttfts, n=10, method="inclusive")
    assert report["ttft_p50_s"] == pytest.approx(statistics.median(ttfts))
    assert report["ttft_p90_s"] == pytest.approx(deciles[8])
    tpots = [
        r["tpot_s"] for r in rows if r["output_tokens"] > 1
    ]  # the others have none
    assert report["tpot_p50_s"] == pytest.approx(statistics.median(tpots))
    assert report["tpot_p90_s"] == pytest.approx(
        statistics.quantiles(tpots, n=10, method="inclusive")[8]
    )
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE


def test_serve_trace_rejects_bad_flags(tmp_path, capsys):
    job = load_job("serve_trace")
    code = job.run_job(
        job.ServeTraceConfig,
        job.run,
        ["--policy", "static", "--instances", "4", "--num-prefill", "4"],
    )
    assert code == 2
    assert "num_prefill < 4" in capsys.readouterr().err
    assert job.run_job(job.ServeTraceConfig, job.run, ["--rate-scale", "0"]) == 2
    assert job.run_job(job.ServeTraceConfig, job.run, ["--rate-scale", "inf"]) == 2
    assert "finite" in capsys.readouterr().err
    argv = ["--policy", "arrow", "--num-prefill", "2"]
    assert job.run_job(job.ServeTraceConfig, job.run, argv) == 2
    assert "--num-prefill applies to --policy static only" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["folder", "under a file", "no name"])
def test_serve_trace_refuses_an_unwritable_out_before_any_work(tmp_path, capsys, kind):
    job = load_job("serve_trace")
    (tmp_path / "afile").write_text("")
    out = {
        "folder": str(tmp_path),
        "under a file": str(tmp_path / "afile" / "report.json"),
        "no name": "",
    }[kind]
    trace = tmp_path / "azure.csv"
    trace.write_text(AZURE_ROWS)
    argv = ["--trace", str(trace), "--out", out]
    assert job.run_job(job.ServeTraceConfig, job.run, argv) == 2
    err = capsys.readouterr().err
    assert "out (--out): output file" in err
    # Nothing was written: no report, no plot, no temporary file.
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "afile", trace])


def test_bench_simulation_reports_goodput_per_policy(tmp_path):
    job = load_job("bench_serving")
    out = tmp_path / "bench.json"
    code = job.run_job(
        job.BenchConfig,
        job.run,
        [
            "--trace", "synthetic", "--max-requests", "120", "--instances", "3",
            "--no-real", "--curve-points", "2", "--sim-workers", "1",
            "--rel-tol", "0.2", "--out", str(out),
        ],
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["goodput_rps"]) == {"arrow", "static_best", "colocated"}
    assert set(report["static_goodput_rps"]) == {"1P:2D", "2P:1D"}
    best = report["best_static_ratio"]
    assert report["goodput_rps"]["static_best"] == max(
        report["static_goodput_rps"].values()
    )
    assert report["static_goodput_rps"][best] == report["goodput_rps"]["static_best"]
    assert report["ratio_arrow_vs_static"] == pytest.approx(
        report["goodput_rps"]["arrow"] / report["goodput_rps"]["static_best"]
    )
    assert report["headroom_ratio"] >= 1.0
    assert len(report["curves"]["arrow"]) == 2
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE


def test_bench_refuses_a_trace_arriving_all_at_once_before_any_work(tmp_path, capsys):
    job = load_job("bench_serving")
    trace = tmp_path / "burst.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "2023-11-16 18:15:46.0000000,100,20\n" * 12
    )
    out = tmp_path / "bench.json"
    argv = ["--trace", str(trace), "--instances", "2", "--no-real", "--out", str(out)]
    assert job.run_job(job.BenchConfig, job.run, argv) == 1
    assert "all 12 requests arrive at the same time" in capsys.readouterr().err
    assert not out.exists()


def test_bench_refuses_a_tpot_target_below_any_decode_step(tmp_path, capsys):
    job = load_job("bench_serving")
    out = tmp_path / "bench.json"
    argv = ["--trace", "synthetic", "--max-requests", "50", "--instances", "2"]
    argv += ["--tpot-slo-s", "0.001", "--no-real", "--out", str(out)]
    assert job.run_job(job.BenchConfig, job.run, argv) == 1
    err = capsys.readouterr().err
    assert "TPOT target 0.001 s" in err and "--tpot-slo-s" in err
    assert not out.exists()


def test_serve_trace_real_mode_refuses_a_profile_that_is_not_a_file(tmp_path, capsys):
    # It used to measure the engine instead, hiding the mistyped path.
    job = load_job("serve_trace")
    missing = tmp_path / "prof.json"
    argv = ["--mode", "real", "--instances", "2", "--profile", str(missing)]
    assert job.run_job(job.ServeTraceConfig, job.run, argv) == 2
    assert f"--profile {str(missing)!r} is not a file" in capsys.readouterr().err
    # Left out, real mode measures the engine; in sim mode a preset is fine.
    assert job.ServeTraceConfig(mode="real", instances=2).profile
    job.ServeTraceConfig(mode="sim", profile="llama-3.1-8b@l40s")
