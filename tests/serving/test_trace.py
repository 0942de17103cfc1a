"""Trace readers, rate scaling, clipping and the synthetic shifting trace."""

from __future__ import annotations

import csv
import json
from datetime import datetime

import numpy as np
import pytest
from support import shared_data

from raysys.runtime.errors import ConfigError
from raysys.serving.trace import (
    TracePhase,
    generate_shifting_trace,
    load_trace,
    read_azure_csv,
    read_mooncake_jsonl,
)

AZURE_ROWS = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,abc,55
2023-11-16 18:15:51.3910170,91
not a time,91,16
2023-11-16 18:15:52.0000000,0,16
2023-11-16 18:15:52.5000000,12.5,16
2023-11-16 18:15:40.0000000,10,10
2023-11-16 18:15:53.1000000,879,55
"""


def test_azure_reader_keeps_good_rows_and_counts_malformed(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_ROWS)
    trace = read_azure_csv(path)

    t_early = datetime(2023, 11, 16, 18, 15, 40).timestamp()
    t0 = datetime(2023, 11, 16, 18, 15, 46).timestamp() + 0.68059
    t1 = datetime(2023, 11, 16, 18, 15, 50).timestamp() + 0.995169
    t2 = datetime(2023, 11, 16, 18, 15, 53).timestamp() + 0.1
    # Line 9 comes earlier in time than the rows above it: kept, sorted first.
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
        (10, 10),
        (374, 44),
        (396, 109),
        (879, 55),
    ]
    assert [r.arrival_s for r in trace.requests] == pytest.approx(
        [0.0, t0 - t_early, t1 - t_early, t2 - t_early], abs=1e-6
    )
    assert [r.request_id for r in trace.requests] == [0, 1, 2, 3]
    assert trace.num_reordered == 1
    # Lines 4 (non-numeric), 5 (missing field), 6 (bad time), 7 (zero prompt),
    # 8 (fractional).
    assert trace.num_malformed == 5
    assert [m.line for m in trace.malformed] == [4, 5, 6, 7, 8]
    reasons = [m.reason for m in trace.malformed]
    assert "not a number" in reasons[0]
    assert "fields" in reasons[1]
    assert "timestamp" in reasons[2]
    assert "below 1" in reasons[3]
    assert "whole number" in reasons[4]


def test_one_row_far_ahead_in_time_loses_no_other_row(tmp_path):
    rows = AZURE_ROWS.splitlines()
    rows.insert(2, "2099-11-16 18:15:50.0,100,44")
    path = tmp_path / "azure.csv"
    path.write_text("\n".join(rows) + "\n")
    trace = read_azure_csv(path)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
        (10, 10),
        (374, 44),
        (396, 109),
        (879, 55),
        (100, 44),
    ]
    assert trace.num_reordered == 3  # the three rows after it, by file order
    assert trace.num_malformed == 5


def test_azure_reader_counts_a_stray_quote_and_bad_bytes_as_their_own_rows(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_bytes(
        b"TIMESTAMP,ContextTokens,GeneratedTokens\n"
        b'2023-11-16 18:15:46.0000000,"374,44\n'  # the quote never closes
        b"2023-11-16 18:15:47.0000000,396,109\n"
        b"2023-11-16 18:15:48.0000000,\xff\xfe,12\n"  # not UTF-8
        b"2023-11-16 18:15:49.0000000,879,55\n"
    )
    trace = read_azure_csv(path)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
        (396, 109),
        (879, 55),
    ]
    assert [m.line for m in trace.malformed] == [2, 4]
    assert "unbalanced quotes" in trace.malformed[0].reason
    assert "not a number" in trace.malformed[1].reason


def test_azure_reader_names_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ConfigError, match="ContextTokens"):
        read_azure_csv(path)


def test_mooncake_reader_converts_ms_and_counts_malformed(tmp_path):
    lines = [
        {"timestamp": 0, "input_length": 100, "output_length": 5, "hash_ids": [0]},
        {"timestamp": 1500, "input_length": 2000, "output_length": 7},
        "this is not json",
        {"timestamp": "soon", "input_length": 1, "output_length": 1},
        {"timestamp": 1600, "input_length": 10},
        [1, 2, 3],
        {"timestamp": 2250, "input_length": 30, "output_length": 1},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    )
    trace = read_mooncake_jsonl(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace] == [
        (0.0, 100, 5),
        (1.5, 2000, 7),
        (2.25, 30, 1),
    ]
    assert trace.num_malformed == 4
    assert [m.line for m in trace.malformed] == [3, 4, 5, 6]


def test_mooncake_reader_counts_bad_bytes_and_huge_numbers_as_their_own_rows(
    tmp_path,
):
    huge = "1" + "0" * 400  # an int JSON reads but a float cannot hold
    path = tmp_path / "trace.jsonl"
    path.write_bytes(
        b'{"timestamp": 0, "input_length": 5, "output_length": 2}\n'
        b'{"timestamp": 1, "input_length": 5, "output_length": 2, "x": "\xff"}\n'
        + f'{{"timestamp": 2, "input_length": {huge}, "output_length": 2}}\n'.encode()
        + f'{{"timestamp": {huge}, "input_length": 5, "output_length": 2}}\n'.encode()
        + b'{"timestamp": 3, "input_length": 7, "output_length": 1}\n'
    )
    trace = read_mooncake_jsonl(path)
    assert [(r.arrival_s, r.prompt_tokens) for r in trace] == [(0.0, 5), (0.003, 7)]
    assert [m.line for m in trace.malformed] == [2, 3, 4]
    reasons = [m.reason for m in trace.malformed]
    assert "UTF-8" in reasons[0]
    assert "too large" in reasons[1] and len(reasons[1]) < 100
    assert "too large" in reasons[2]


def test_load_trace_dispatches_on_extension(tmp_path):
    (tmp_path / "trace.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="extension '.parquet'"):
        load_trace(tmp_path / "trace.parquet")
    with pytest.raises(ConfigError, match="does not exist"):
        load_trace(tmp_path / "missing.csv")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        load_trace(tmp_path / "folder.csv")


def test_trace_of_only_malformed_rows_is_an_error(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("{}\n[]\n")
    with pytest.raises(ConfigError, match="no readable request"):
        read_mooncake_jsonl(path)


@pytest.mark.parametrize("scale", [0.5, 2.0, 3.0])
def test_rate_scaling_divides_arrivals(tmp_path, scale):
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_ROWS)
    trace = read_azure_csv(path)
    scaled = trace.scaled(scale)
    assert [r.arrival_s for r in scaled] == pytest.approx(
        [r.arrival_s / scale for r in trace]
    )
    assert scaled.mean_rate_rps == pytest.approx(trace.mean_rate_rps * scale)
    assert [r.prompt_tokens for r in scaled] == [r.prompt_tokens for r in trace]


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 1e-300])
def test_rate_scaling_rejects_bad_factors(tmp_path, scale):
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_ROWS)
    with pytest.raises(ConfigError, match="rate scale"):
        read_azure_csv(path).scaled(scale)


def test_clipping_to_a_context_counts_cut_requests(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_ROWS)
    trace, num_clipped = read_azure_csv(path).clipped(400)
    # A cut request keeps up to 400 // 16 = 25 output tokens, its prompt the
    # room left, and its output whatever room the prompt leaves. (10, 10) fits;
    # (374, 44): the whole prompt fits beside 25, and 26 remain for the output;
    # (396, 109) and (879, 55) keep their last 375 prompt tokens and 25 outputs.
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [
        (10, 10),
        (374, 26),
        (375, 25),
        (375, 25),
    ]
    assert num_clipped == 3
    assert all(r.prompt_tokens + r.output_tokens <= 400 for r in trace)
    # A tiny context still leaves one output token.
    tiny, _ = read_azure_csv(path).clipped(8)
    assert [(r.prompt_tokens, r.output_tokens) for r in tiny][1:] == [(7, 1)] * 3


def test_shifting_trace_alternates_mixes():
    phases = (
        TracePhase(mean_prompt_tokens=2000, mean_output_tokens=50),
        TracePhase(mean_prompt_tokens=200, mean_output_tokens=500),
    )
    trace = generate_shifting_trace(
        duration_s=400, rate_rps=20, phase_s=100, phases=phases, seed=3
    )
    arrivals = np.array([r.arrival_s for r in trace])
    prompts = np.array([r.prompt_tokens for r in trace])
    outputs = np.array([r.output_tokens for r in trace])
    assert np.all(np.diff(arrivals) >= 0)
    # ~20 req/s for 400 s: Poisson count within 5 standard deviations.
    assert abs(len(trace) - 8000) < 5 * np.sqrt(8000)
    phase = (arrivals // 100).astype(int) % 2
    for index, p in enumerate(phases):
        mask = phase == index
        assert prompts[mask].mean() == pytest.approx(p.mean_prompt_tokens, rel=0.1)
        assert outputs[mask].mean() == pytest.approx(p.mean_output_tokens, rel=0.1)
    # Same seed, same trace.
    again = generate_shifting_trace(
        duration_s=400, rate_rps=20, phase_s=100, phases=phases, seed=3
    )
    assert again.requests == trace.requests


def test_real_azure_trace_reads_cleanly():
    path = shared_data("llm-traces/azure-2023-conv.csv")
    with path.open(newline="") as f:
        stamps = [datetime.fromisoformat(row["TIMESTAMP"]) for row in csv.DictReader(f)]
    trace = load_trace(path)
    assert len(trace) == len(stamps)
    assert trace.num_malformed == 0
    # About an hour of arrivals (first to last, whichever order the rows are in).
    expected_s = (max(stamps) - min(stamps)).total_seconds()
    assert 3400 < expected_s < 3600
    assert trace.duration_s == pytest.approx(expected_s, abs=1e-3)


def test_real_mooncake_trace_reads_cleanly():
    path = shared_data("llm-traces/mooncake-synthetic.jsonl")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    trace = load_trace(path)
    assert len(trace) == len(lines)
    assert trace.num_malformed == 0
    first = json.loads(lines[0])
    assert first["timestamp"] == min(json.loads(line)["timestamp"] for line in lines)
    assert trace.requests[0].prompt_tokens == first["input_length"]
    assert trace.requests[0].output_tokens == first["output_length"]


AZURE_TWO = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.5000000,374,44\n"
    "2023-11-16 18:15:47.0000000,396,109\n"
)


def _azure_two_rows_ok(trace) -> None:
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace] == [
        (0.0, 374, 44),
        (pytest.approx(0.5), 396, 109),
    ]
    assert trace.num_malformed == 0


@pytest.mark.parametrize("variant", ["bom", "crlf", "bom+crlf"])
def test_azure_reader_takes_a_byte_order_mark_and_crlf_lines(tmp_path, variant):
    # A spreadsheet export starts with a BOM; it was taken for part of the
    # first column's name, and the file refused for lacking TIMESTAMP.
    text = AZURE_TWO.replace("\n", "\r\n") if "crlf" in variant else AZURE_TWO
    data = ("\ufeff" if "bom" in variant else "").encode() + text.encode()
    path = tmp_path / "azure.csv"
    path.write_bytes(data)
    _azure_two_rows_ok(load_trace(path))


def test_mooncake_reader_takes_a_byte_order_mark(tmp_path):
    # The BOM used to cost the first row, counted as "not JSON".
    rows = [{"timestamp": 0, "input_length": 5, "output_length": 3}] * 2
    path = tmp_path / "mooncake.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(map(json.dumps, rows)).encode())
    trace = load_trace(path)
    assert len(trace) == 2 and trace.num_malformed == 0


@pytest.mark.parametrize("name", ["azure.csv.gz", "azure.csv"])
def test_gzip_compressed_traces_are_read(tmp_path, name):
    import gzip

    path = tmp_path / name
    path.write_bytes(gzip.compress(AZURE_TWO.encode()))
    _azure_two_rows_ok(load_trace(path))


@pytest.mark.parametrize("name", ["mooncake.jsonl.gz", "mooncake.jsonl"])
def test_gzip_compressed_mooncake_traces_are_read(tmp_path, name):
    import gzip

    rows = [
        {"timestamp": 0, "input_length": 5, "output_length": 3},
        {"timestamp": 500, "input_length": 7, "output_length": 2},
    ]
    path = tmp_path / name
    path.write_bytes(
        gzip.compress(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, rows)).encode())
    )
    trace = load_trace(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace] == [
        (0.0, 5, 3),
        (0.5, 7, 2),
    ]
    assert trace.num_malformed == 0


def test_a_damaged_gzip_trace_is_a_clear_error(tmp_path):
    import gzip

    path = tmp_path / "azure.csv.gz"
    path.write_bytes(gzip.compress(AZURE_TWO.encode() * 50)[:40])
    with pytest.raises(ConfigError, match="azure.csv.gz: its gzip data is damaged"):
        load_trace(path)


def test_a_folder_is_named_as_a_folder(tmp_path):
    # It used to be refused for its extension ('') instead.
    with pytest.raises(ConfigError, match="is a folder; give a trace file"):
        load_trace(tmp_path)


def test_extra_columns_in_any_order_are_ignored(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(
        "id,GeneratedTokens,TIMESTAMP,note,ContextTokens\n"
        "a,44,2023-11-16 18:15:46.5000000,x,374\n"
        "b,109,2023-11-16 18:15:47.0000000,y,396\n"
    )
    _azure_two_rows_ok(load_trace(path))
