"""Latency profiles: formulas, fitting, files and roofline estimates."""

from __future__ import annotations

import json

import pytest

from raysys.runtime.errors import ConfigError
from raysys.serving.profile import (
    LatencyProfile,
    RooflineAssumptions,
    fit_profile,
    resolve_profile,
    roofline_profile,
)

PROFILE = LatencyProfile(
    name="hand",
    prefill_s_per_token_sq=2e-8,
    prefill_s_per_token=1e-4,
    prefill_overhead_s=0.01,
    decode_s_per_batch_token=1e-6,
    decode_s_per_seq=1e-4,
    decode_overhead_s=0.02,
    kv_capacity_tokens=50_000,
    kv_bytes_per_token=1024,
    kv_transfer_bytes_per_s=1e8,
    kv_transfer_latency_s=0.001,
)


def test_prefill_time_is_quadratic_and_chunks_add_up():
    assert PROFILE.prefill_time_s(1000) == pytest.approx(0.02 + 0.1 + 0.01)
    chunks = [(300, 0), (300, 300), (400, 600)]
    work = sum(PROFILE.prefill_work_s(n, past) for n, past in chunks)
    assert work + 0.01 == pytest.approx(PROFILE.prefill_time_s(1000))


def test_decode_and_mixed_steps():
    assert PROFILE.decode_step_time_s(10_000, 10) == pytest.approx(0.02 + 0.01 + 1e-3)
    # A mixed step pays the larger fixed cost once.
    mixed = PROFILE.step_time_s([(500, 0)], batch_tokens=10_000, num_seqs=10)
    assert mixed == pytest.approx(0.02 + (5e-3 + 0.05) + (0.01 + 1e-3))
    assert PROFILE.step_time_s() == 0.0


def test_max_batch_tokens_within_tpot_and_memory():
    # (0.05 - 0.02) / 1e-6 = 30_000 tokens
    assert PROFILE.max_batch_tokens(0.05) == 30_000
    # 100 tokens per sequence: 1e-6 + 1e-4/100 = 2e-6 per token
    assert PROFILE.max_batch_tokens(0.05, tokens_per_seq=100) == 15_000
    assert PROFILE.max_batch_tokens(1.0) == 50_000  # memory caps it
    assert PROFILE.max_batch_tokens(0.01) == 0  # the fixed cost alone is too slow


def test_kv_transfer_time():
    assert PROFILE.kv_transfer_time_s(1000) == pytest.approx(0.001 + 1000 * 1024 / 1e8)


def test_fit_recovers_the_coefficients_of_noise_free_samples():
    prefill = [(n, PROFILE.prefill_time_s(n)) for n in (16, 100, 500, 1000, 2000)]
    decode = [
        (bt, b, PROFILE.decode_step_time_s(bt, b))
        for bt, b in ((100, 1), (4000, 8), (20_000, 32), (9000, 64), (30_000, 16))
    ]
    fitted = fit_profile(
        prefill,
        decode,
        name="fit",
        kv_capacity_tokens=50_000,
        kv_bytes_per_token=1024,
        kv_transfer_bytes_per_s=1e8,
    )
    for field in (
        "prefill_s_per_token_sq",
        "prefill_s_per_token",
        "prefill_overhead_s",
        "decode_s_per_batch_token",
        "decode_s_per_seq",
        "decode_overhead_s",
    ):
        assert getattr(fitted, field) == pytest.approx(
            getattr(PROFILE, field), rel=1e-6, abs=1e-12
        ), field
    with pytest.raises(ConfigError, match="at least 3"):
        fit_profile(
            prefill[:2],
            decode,
            name="x",
            kv_capacity_tokens=1,
            kv_bytes_per_token=1,
            kv_transfer_bytes_per_s=1,
        )


def test_profile_file_round_trip_and_errors(tmp_path):
    path = PROFILE.save(tmp_path / "p.json")
    assert LatencyProfile.load(path) == PROFILE
    assert resolve_profile(str(path)) == PROFILE
    with pytest.raises(ConfigError, match="does not exist"):
        LatencyProfile.load(tmp_path / "missing.json")
    data = json.loads(path.read_text())
    data["decode_overhead_s"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="decode_overhead_s"):
        LatencyProfile.load(bad)
    with pytest.raises(ConfigError, match="neither a file nor"):
        resolve_profile(str(tmp_path / "nothing"))


def test_roofline_of_a_70b_model_on_four_h100s():
    a = RooflineAssumptions(tensor_parallel=4)
    p = roofline_profile("llama-3.1-70b", "h100-sxm", a)
    flops = 4 * 989e12 * 0.5
    bandwidth = 4 * 3.35e12 * 0.8
    kv_per_token = 2 * 80 * 8 * 128 * 2  # K and V, layers, KV heads, head dim, bf16
    assert p.kv_bytes_per_token == kv_per_token == 327_680
    assert p.prefill_s_per_token == pytest.approx(2 * 70.6e9 / flops)
    assert p.prefill_s_per_token_sq == pytest.approx(2 * 80 * 8192 / flops)
    assert p.decode_s_per_batch_token == pytest.approx(kv_per_token / bandwidth)
    assert p.decode_overhead_s == pytest.approx(70.6e9 * 2 / bandwidth + 0.003)
    free = 4 * 80e9 * 0.9 - 70.6e9 * 2 - 4e9
    assert p.kv_capacity_tokens == int(free // kv_per_token)
    assert "MFU 0.5" in p.notes and "4x h100-sxm" in p.notes
    # Twice the GPUs: prefill twice as fast.
    p8 = roofline_profile(
        "llama-3.1-70b", "h100-sxm", RooflineAssumptions(tensor_parallel=8)
    )
    assert p8.prefill_s_per_token == pytest.approx(p.prefill_s_per_token / 2)
    assert resolve_profile("llama-3.1-70b@h100-sxm", a) == p


def test_roofline_rejects_unknown_names_and_models_that_do_not_fit():
    with pytest.raises(ConfigError, match="unknown model"):
        roofline_profile("gpt-5", "h100-sxm")
    with pytest.raises(ConfigError, match="unknown GPU"):
        roofline_profile("llama-3.1-70b", "tpu")
    with pytest.raises(ConfigError, match="raise tensor_parallel"):
        roofline_profile(
            "llama-3.1-70b", "h100-sxm", RooflineAssumptions(tensor_parallel=1)
        )


@pytest.mark.parametrize(
    "prefill,decode,match",
    [
        (
            [(16, 0.1), (32, float("nan")), (64, 0.3)],
            None,
            r"prefill sample \(32, nan\)",
        ),
        ([(0, 0.1), (32, 0.2), (64, 0.3)], None, r"prefill sample \(0, 0.1\)"),
        (None, [(10, 1, 0.1), (20, 0, 0.2), (30, 1, 0.3)], r"decode sample \(20, 0"),
        (None, [(10, 1, -0.1), (20, 1, 0.2), (30, 1, 0.3)], r"decode sample"),
    ],
)
def test_fit_refuses_bad_samples_by_name(prefill, decode, match):
    # They used to reach the solver, which failed with a bare numpy error.
    good_prefill = [(16, 0.1), (32, 0.2), (64, 0.3)]
    good_decode = [(10, 1, 0.1), (20, 2, 0.2), (30, 3, 0.3)]
    with pytest.raises(ConfigError, match=match):
        fit_profile(
            prefill or good_prefill,
            decode or good_decode,
            name="bad",
            kv_capacity_tokens=100,
            kv_bytes_per_token=8,
            kv_transfer_bytes_per_s=1e9,
        )


def test_profile_file_that_is_a_folder_is_named_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give a profile JSON file"):
        LatencyProfile.load(tmp_path)
