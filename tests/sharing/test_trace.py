"""Trace readers count every row they cannot use, by reason."""

from __future__ import annotations

import json

import pytest

from raysys.runtime.errors import ConfigError
from raysys.sharing.trace import load_availability, load_gpu_jobs
from raysys.sharing.workload import WorkloadKind

HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n"
ROWS = [
    "ok-frac,1,1,1,470,,LS,Running,10,110,10",  # 0.47 GPU, interactive, 100 s
    "ok-whole,1,1,2,1000,,BE,Running,5,65,5",  # 2 GPUs, batch, 60 s
    "pending,1,1,1,1000,,BE,Pending,7,9,",  # never scheduled
    "cpu,1,1,0,0,,LS,Running,1,2,1",  # no GPU
    "neg,1,1,1,1000,,BE,Failed,10,5,10",  # negative duration
    "long,1,1,1,1000,,BE,Running,0,99999,0",  # longer than the limit
    "junk,1,1,one,1000,,BE,Running,0,10,0",  # malformed
    "odd,1,1,2,500,,BE,Running,0,10,0",  # half of two GPUs
]


def test_gpu_jobs_are_parsed_and_bad_rows_counted(tmp_path):
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + "\n".join(ROWS) + "\n")
    trace = load_gpu_jobs(path, max_duration_s=1000)
    assert trace.num_rows == len(ROWS)
    assert [
        (j.name, j.gpus, j.kind, j.arrival_s, j.duration_s) for j in trace.jobs
    ] == [
        ("ok-whole", 2.0, WorkloadKind.BATCH, 5.0, 60.0),
        ("ok-frac", 0.47, WorkloadKind.INTERACTIVE, 10.0, 100.0),
    ]
    assert trace.rows_skipped == 6
    assert trace.skipped == {
        "never scheduled (no scheduled_time, so no duration)": 1,
        "asks no GPU": 1,
        "non-positive duration": 1,
        "runs longer than max_duration_s (1000 s)": 1,
        "malformed number": 1,
        "GPU share not a fraction of one GPU nor whole GPUs": 1,
    }


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "pods.csv"
    path.write_text("name,num_gpu\nx,1\n")
    with pytest.raises(ConfigError, match="gpu_milli"):
        load_gpu_jobs(path, max_duration_s=10)


def test_availability_from_a_file_or_a_directory(tmp_path):
    (tmp_path / "a.json").write_text(
        json.dumps({"metadata": {"gap_seconds": 300}, "data": [1, 2, -1, "x", 3]})
    )
    (tmp_path / "b.json").write_text(
        json.dumps({"metadata": {"gap_seconds": 60}, "data": [0, 0]})
    )
    (tmp_path / "c.json").write_text("not json")
    series, skipped = load_availability(tmp_path)
    assert [(s.name, s.gap_s, s.counts) for s in series] == [
        ("a", 300.0, (1, 2, 2, 2, 3))
    ]
    assert skipped["bad live count (kept the previous one)"] == 2
    assert skipped["series never has a live machine"] == 1
    assert skipped["unreadable series file (JSONDecodeError: Expecting value)"] == 1
    single, _ = load_availability(tmp_path / "a.json")
    assert single[0].peak == 3
    with pytest.raises(ConfigError, match="no usable availability") as info:
        load_availability(tmp_path / "b.json")
    assert "1 x series never has a live machine" in str(info.value)


@pytest.mark.parametrize(
    "metadata, reason",
    [
        ('{"gap_seconds": NaN}', "gap_seconds nan is not a number >= 1"),
        ('{"gap_seconds": Infinity}', "gap_seconds inf is not a number >= 1"),
        ('{"gap_seconds": 1e-6}', "gap_seconds 1e-06 is not a number >= 1"),
        ("{}", "no 'gap_seconds' field"),
    ],
)
def test_availability_with_a_bad_gap_is_refused_with_its_reason(
    tmp_path, metadata, reason
):
    path = tmp_path / "a.json"
    path.write_text(f'{{"metadata": {metadata}, "data": [1, 2]}}')
    with pytest.raises(ConfigError, match="no usable availability") as info:
        load_availability(path)
    assert reason in str(info.value)


def test_broken_lines_cost_only_their_own_row(tmp_path):
    """A stray quote, a short row or undecodable bytes are counted as malformed;
    every row after them is still read."""
    path = tmp_path / "pods.csv"
    good = "ok-{i},1,1,1,1000,,BE,Running,{t},{end},{t}"
    lines = [good.format(i=i, t=10 * i, end=10 * i + 60) for i in range(3)]
    lines += [
        '"unterminated,1,1,1,1000,,LS,Running,0,10,0',
        "short,1,2",
        "extra,1,1,1,1000,,LS,Running,0,10,0,surplus",
    ]
    lines += [good.format(i=i, t=10 * i, end=10 * i + 60) for i in range(3, 6)]
    path.write_bytes(
        (HEADER + "\n".join(lines) + "\n").encode()
        + b"bytes\xff\xfe,1,1,1,1000,,BE,Running,70,130,7\xff\n"
    )
    trace = load_gpu_jobs(path, max_duration_s=1000)
    assert trace.num_rows == 10
    assert [j.name for j in trace.jobs] == [f"ok-{i}" for i in range(6)]
    assert trace.skipped == {
        "malformed row (unbalanced quotes)": 1,
        "malformed row (wrong number of fields)": 2,
        "malformed number": 1,
    }
