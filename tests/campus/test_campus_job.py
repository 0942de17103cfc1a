"""The campus job, shortened, submitted through Ray's job API to a local cluster.

One cluster from ``raysys up`` (a head and three providers with one logical GPU
each); the job runs the three systems as tenants, drains one provider and loses
another. The report is checked against figures computed here, independently of
the job: the NOWS matvec counts by solving the same instances in this process,
the MoE outputs by the target model's own greedy decoding with every expert
resident.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from support import raysys_cluster, raysys_submit

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SHORT = {
    "--nows-instances": "6",
    "--nows-resolution": "32",
    "--nows-batch": "2",
    "--serving-requests": "48",
    "--serving-window": "16",
    "--moe-prompts": "4",
    "--moe-max-new-tokens": "24",
    "--drain-deadline-s": "20",
    "--timeout-s": "420",
}


@pytest.fixture(scope="module")
def campus_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("campus")
    with raysys_cluster(tmp_path_factory.mktemp("state"), providers=3, head_cpus=2) as (
        env,
        address,
    ):
        args = [x for kv in SHORT.items() for x in kv]
        job_id, result = raysys_submit(
            env, address, "python", "jobs/campus.py", "--out", str(out), *args
        )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return json.loads((out / "report.json").read_text()), result.stdout, out


def test_every_tenant_finishes_and_every_migration_succeeds(campus_report):
    report, stdout, out = campus_report
    systems = {s["name"]: s for s in report["systems"]}
    assert set(systems) == {"nows", "serving", "moe", "sharing"}
    assert all(s["status"] == "done" for s in systems.values()), systems
    # one provider drained with a deadline, another lost without warning
    hows = [d["how"] for d in report["departures"]]
    assert hows == ["drain", "lost"]
    drained, lost = report["departures"]
    assert drained["moved"], "the drained provider held no tenant"
    # the job switches off a provider only while it holds a running tenant
    assert lost["moved"], "the lost provider held no tenant"
    assert drained["provider"] != lost["provider"]
    # one migration per tenant moved off a departing provider, no other
    assert report["migrations_attempted"] == len(drained["moved"]) + len(lost["moved"])
    assert report["migrations_succeeded"] == report["migrations_attempted"]
    kinds = sorted(m["kind"] for m in report["migrations"])
    assert kinds == sorted(
        ["graceful"] * len(drained["moved"]) + ["sudden"] * len(lost["moved"])
    )
    # a graceful move redoes nothing; the tenants commit every step, so a
    # sudden one redoes at most the step in flight
    for m in report["migrations"]:
        assert m["lost_steps"] <= (0 if m["kind"] == "graceful" else 1), m
    assert set(report["inputs"]) == {"nows", "serving", "moe"}
    assert "generated: 6 Darcy instances, 32x32" in report["inputs"]["nows"]
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "migrations" in stdout and "departure" in stdout  # the summary table


def test_serving_figures(campus_report):
    report, _, _ = campus_report
    serving = next(s for s in report["systems"] if s["name"] == "serving")
    f = serving["figures"]
    assert f["num_requests"] == 48
    # a migration re-serves a window; no request is lost
    assert (f["num_completed"], f["num_failed"]) == (48, 0)
    # every served output equals the same prompt served by one instance alone
    assert f["outputs_checked"] == f["num_completed"]
    assert f["outputs_matching_single_instance"] == f["outputs_checked"]


def test_nows_figures_match_a_solve_in_this_process(campus_report):
    from raysys.solvers.datasets import sample_instances
    from raysys.solvers.families import get_family
    from raysys.solvers.predictor import DEFAULT_MODEL, Predictor, load_model
    from raysys.solvers.reports import summarise
    from raysys.solvers.worker import SolveSettings, solve_instance

    report, _, _ = campus_report
    nows = next(s for s in report["systems"] if s["name"] == "nows")
    instances = sample_instances("darcy", 32, 1000, range(6), with_reference=False)
    config_json, weights = load_model(DEFAULT_MODEL).to_bytes()
    predictor = Predictor(config_json, weights, num_threads=1)
    settings = SolveSettings(solvers=("cg",), rtols=(1e-5,))
    fam = get_family("darcy")
    results = []
    for k in range(0, 6, 2):  # the tenant's steps: two instances each
        batch = instances[k : k + 2]
        predictions, elapsed = predictor.predict(
            np.stack([fam.features(i) for i in batch])
        )
        for inst, guess in zip(batch, predictions, strict=True):
            results += solve_instance(inst, guess, elapsed / 2, settings)
    mine = summarise(results)
    theirs = nows["figures"]
    assert theirs["num_instances"] == 6 and theirs["num_failed"] == 0
    assert theirs["num_converged_warm"] == 6
    assert theirs["median_matvec_reduction"] == pytest.approx(
        mine.median_matvec_reduction
    )
    reductions = [1 - r.matvecs_warm / r.matvecs_cold for r in results]
    assert theirs["median_matvec_reduction"] == pytest.approx(
        statistics.median(reductions)
    )


def test_moe_outputs_are_the_targets_own_greedy_outputs(campus_report):
    import torch

    from raysys.models.hf import load_model
    from raysys.models.llama import greedy_generate
    from raysys.models.tokenizer import ByteTokenizer
    from raysys.moe.engine import PRETRAINED
    from raysys.moe.prompts import BUILTIN_PROMPTS

    report, _, _ = campus_report
    moe = next(s for s in report["systems"] if s["name"] == "moe")
    outputs = moe["figures"]["outputs"]
    assert len(outputs) == 4
    assert moe["figures"]["num_tokens"] == sum(o["num_tokens"] for o in outputs)
    assert 0.0 < moe["figures"]["acceptance_rate"] <= 1.0
    target = load_model(PRETRAINED / "target", dtype=torch.float32)
    tokenizer = ByteTokenizer()
    for prompt, out in zip(BUILTIN_PROMPTS[:4], outputs, strict=True):
        ids = tokenizer.encode(prompt)
        assert out["token_ids"] == greedy_generate(target, ids, 24)
