"""The MoE jobs run end to end in-process on the session's Ray cluster."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from raysys.models.llama import greedy_generate
from raysys.models.tokenizer import ByteTokenizer
from raysys.moe.engine import MoEEngineConfig, store_facts
from raysys.runtime import ConfigError, load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(name, JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the report's annotations here
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_generate_job_writes_the_report(ray_cluster, pair, tmp_path):
    job = load_job("moe_generate")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"turns": ["Sort a list of names.", "again"]})
        + "\n"
        + json.dumps({"prompt": "import os\n"})
        + "\n"
    )
    out = tmp_path / "report.json"
    cfg = load_config(
        job.GenerateConfig,
        [
            "--prompts",
            str(prompts),
            "--mode",
            "sd-prefetch",
            "--cache-experts",
            "6",
            "--cutoff",
            "2",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
        ],
    )
    job.main(cfg)
    report = json.loads(out.read_text())
    for key in (
        "tpot_ms",
        "tokens_per_s",
        "acceptance_rate",
        "prefetch_precision",
        "prefetch_recall",
        "cache_hit_rate",
        "bytes_fetched",
        "cutoff",
    ):
        assert key in report and report[key] is not None, key
    assert report["cutoff"] == 2 and report["cache_experts"] == 6
    assert [o["prompt"] for o in report["outputs"]] == [
        '"""Sort a list of names.\n"""\n\n',
        '"""import os\n\n"""\n\n',
    ]
    # Greedy decoding with experts fetched, prefetched and evicted is the
    # target's own greedy decoding, experts resident.
    _, target = pair
    target.set_expert_source(None)
    tokenizer = ByteTokenizer()
    for out in report["outputs"]:
        want = greedy_generate(target, tokenizer.encode(out["prompt"]), 12)
        assert out["token_ids"] == want and out["num_tokens"] == len(want)
    assert report["num_tokens"] == sum(o["num_tokens"] for o in report["outputs"])
    # Every transfer moves one whole expert: the stored expert's bytes.
    expert_bytes, _ = store_facts(MoEEngineConfig())
    assert report["expert_bytes"] == expert_bytes
    assert report["num_fetches"] > 0
    assert report["bytes_fetched"] == report["num_fetches"] * expert_bytes


@pytest.mark.slow
def test_bench_job_compares_the_modes(ray_cluster, tmp_path):
    job = load_job("bench_moe")
    out = tmp_path / "bench.json"
    cfg = load_config(
        job.BenchConfig,
        [
            "--num-prompts",
            "1",
            "--max-new-tokens",
            "10",
            "--cutoff",
            "1",
            "--no-sweep",
            "--out",
            str(out),
        ],
    )
    job.main(cfg)
    report = json.loads(out.read_text())
    assert set(report["tpot_ms"]) == {"ar", "sd", "sd-prefetch"}
    tpot = report["tpot_ms"]
    assert report["speedup_vs_sd"] == pytest.approx(tpot["sd"] / tpot["sd-prefetch"])
    assert report["speedup_vs_ar"] == pytest.approx(tpot["ar"] / tpot["sd-prefetch"])
    assert report["speedup_vs_sd_median"] > 0 and report["speedup_vs_ar_median"] > 0
    assert (
        report["prefetch_recall"] == report["reports"]["sd-prefetch"]["prefetch_recall"]
    )
    assert report["outputs_identical"] is True
    assert report["cache_experts"] <= report["num_experts_total"] // 4
    assert report["cache_policy"] == "layer-lru"
    assert out.with_suffix(".png").is_file()
    with pytest.raises(ConfigError, match="more than a quarter"):
        job.main(
            load_config(job.BenchConfig, ["--cache-experts", "9", "--out", str(out)])
        )


def test_generate_job_prints_one_token_outputs(ray_cluster, tmp_path, capsys):
    job = load_job("moe_generate")
    out = tmp_path / "report.json"
    cfg = load_config(
        job.GenerateConfig,
        ["--mode", "ar", "--num-prompts", "1", "--max-new-tokens", "1"]
        + ["--out", str(out)],
    )
    job.main(cfg)  # TPOT has no value for one-token outputs
    assert json.loads(out.read_text())["tpot_ms"] is None
    assert "TPOT n/a" in capsys.readouterr().out


def test_bench_job_runs_a_model_whose_quarter_rounds_to_zero(ray_cluster, tmp_path):
    from raysys.models.hf import save_random_model
    from raysys.models.llama import tiny_llama_config
    from raysys.models.mixtral import tiny_mixtral_config

    # One layer of two experts: a quarter is 0, the engine's default cache 1.
    target = tmp_path / "target"
    save_random_model(
        tiny_mixtral_config(
            num_hidden_layers=1, num_local_experts=2, num_experts_per_tok=1
        ),
        target,
    )
    save_random_model(tiny_llama_config(num_hidden_layers=1), tmp_path / "draft")
    job = load_job("bench_moe")
    out = tmp_path / "bench.json"
    cfg = load_config(
        job.BenchConfig,
        ["--target-dir", str(target), "--draft-dir", str(tmp_path / "draft")]
        + ["--num-prompts", "1", "--max-new-tokens", "6", "--calibration-tokens", "8"]
        + ["--no-sweep", "--link-bandwidth-bytes-per-s", "0", "--out", str(out)],
    )
    report = job.main(cfg)
    assert report.cache_experts == 1 and report.num_experts_total == 2
    assert report.cutoff in (0, 1) and report.outputs_identical


def test_train_job_refuses_bad_flags_and_tiny_corpora_before_training(tmp_path):
    job = load_job("moe_train")
    with pytest.raises(ConfigError, match="--top-k 3 is more than --num-experts 2"):
        load_config(job.TrainConfig, ["--num-experts", "2", "--top-k", "3"])
    with pytest.raises(
        ConfigError, match="--hidden-size 64 is not divisible by --num-heads 3"
    ):
        load_config(job.TrainConfig, ["--num-heads", "3"])
    with pytest.raises(
        ConfigError, match="--num-heads 4 is not a multiple of --num-kv-heads 3"
    ):
        load_config(job.TrainConfig, ["--num-kv-heads", "3"])
    with pytest.raises(ConfigError, match="seq_len"):
        load_config(job.TrainConfig, ["--seq-len", "4096"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("x = 1\n" * 100)
    cfg = load_config(
        job.TrainConfig,
        ["--corpus-dir", str(corpus), "--seq-len", "16", "--out-dir", str(tmp_path)],
    )
    with pytest.raises(ConfigError, match=r"training split holds 0 tokens \(0 of 1"):
        job.main(cfg)
    assert not (tmp_path / "draft").exists()
