"""Trace readers count every row they cannot use, by reason."""

from __future__ import annotations

import json

import pytest

from raysys.runtime.errors import ConfigError
from raysys.runtime.tables import MalformedRow
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
    # only the malformed row is kept as an example: the header is line 1
    assert trace.num_malformed == 1
    assert trace.malformed == [MalformedRow(8, "num_gpu 'one' is not a number")]


def test_malformed_rows_are_reported_with_their_line_and_value(tmp_path):
    good = "ok-{i},1,1,1,1000,,BE,Running,{i},{end},{i}"
    lines = [good.format(i=i, end=i + 60) for i in range(15)]  # lines 2-16
    lines.append("bad,1,1,1,xyz,,LS,Running,5,65,5")  # line 17
    lines.append("")  # line 18, blank: neither a row nor malformed
    lines.append("inf,1,1,1,1000,,BE,Running,1e999,65,5")  # line 19
    lines.append("empty,1,1,1,1000,,BE,Running,5,,5")  # line 20
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + "\n".join(lines) + "\n")
    trace = load_gpu_jobs(path, max_duration_s=1000)
    assert trace.num_rows == 18
    assert len(trace.jobs) == 15
    assert trace.skipped == {"malformed number": 3}
    assert trace.num_malformed == 3
    assert [str(m) for m in trace.malformed] == [
        "line 17: gpu_milli 'xyz' is not a number",
        "line 19: creation_time '1e999' is not a finite number",
        "line 20: deletion_time is missing",
    ]
    assert trace.malformed_summary(limit=2) == (
        "line 17: gpu_milli 'xyz' is not a number; "
        "line 19: creation_time '1e999' is not a finite number; and 1 more"
    )


def test_only_the_first_malformed_rows_are_kept_but_all_are_counted(tmp_path):
    lines = [f"bad-{i},1,1,1,x{i},,BE,Running,0,10,0" for i in range(25)]
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + "\n".join(lines) + "\n")
    trace = load_gpu_jobs(path, max_duration_s=1000)
    assert trace.skipped == {"malformed number": 25}
    assert trace.num_malformed == 25
    assert trace.malformed == [
        MalformedRow(i + 2, f"gpu_milli 'x{i}' is not a number") for i in range(20)
    ]
    assert trace.malformed_summary() == (
        "line 2: gpu_milli 'x0' is not a number; "
        "line 3: gpu_milli 'x1' is not a number; "
        "line 4: gpu_milli 'x2' is not a number; "
        "line 5: gpu_milli 'x3' is not a number; "
        "line 6: gpu_milli 'x4' is not a number; and 20 more"
    )


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
    (tmp_path / "notes.txt").write_text("not a series: not *.json")
    series, skipped, problems = load_availability(tmp_path)
    assert [(s.name, s.gap_s, s.counts) for s in series] == [
        ("a", 300.0, (1, 2, 2, 2, 3))
    ]
    assert skipped == {
        "bad live count (kept the previous one)": 2,
        "series never has a live machine": 1,
        "unreadable series file (not JSON: Expecting value)": 1,
    }
    assert problems == [
        "a.json: 2 bad live count(s) kept the previous one, first data[2] = -1 "
        "(not an integer >= 0)",
        "b.json: never has a live machine (all 2 counts are 0)",
        "c.json: not JSON (Expecting value at line 1 column 1)",
    ]
    single, _, single_problems = load_availability(tmp_path / "a.json")
    assert single[0].peak == 3
    assert single_problems == problems[:1]
    with pytest.raises(ConfigError) as info:
        load_availability(tmp_path / "b.json")
    assert str(info.value) == (
        f"no usable availability series under {str(tmp_path / 'b.json')!r}: "
        "b.json: never has a live machine (all 2 counts are 0); each file must "
        'hold {"metadata": {"gap_seconds": 300}, "data": [n_live, ...]} with a '
        "live machine at some point"
    )


def test_a_folder_of_bad_series_names_each_file_and_its_problem(tmp_path):
    (tmp_path / "zone-a.json").write_text('{"metadata": {}, "data": [1]}')
    (tmp_path / "zone-b.json").write_text("oops")
    (tmp_path / "zone-c.json").write_text("[1, 2]")
    (tmp_path / "zone-d.json").write_text('{"metadata": {"gap_seconds": 300}}')
    (tmp_path / "zone-e.json").write_text(
        '{"metadata": {"gap_seconds": 300}, "data": {"n": 1}}'
    )
    (tmp_path / "zone-f.json").write_bytes(b'{"metadata": "\xff"}')
    (tmp_path / "zone-g.json").mkdir()
    with pytest.raises(ConfigError) as info:
        load_availability(tmp_path)
    assert str(info.value) == (
        f"no usable availability series under {str(tmp_path)!r}: "
        "zone-a.json: no 'gap_seconds' field in its metadata; "
        "zone-b.json: not JSON (Expecting value at line 1 column 1); "
        "zone-c.json: top level is a list, not a JSON object; "
        "zone-d.json: no 'data' field; "
        "zone-e.json: 'data' is {'n': 1}, not a list of live counts; "
        "and 2 more; each file must hold "
        '{"metadata": {"gap_seconds": 300}, "data": [n_live, ...]} with a live '
        "machine at some point"
    )


@pytest.mark.parametrize(
    "entries, listed",
    [
        ([], " (it is empty)"),
        (["a.csv", "b.txt"], ", only 'a.csv', 'b.txt'"),
        (["a", "b", "c", "d", "e"], ", only 'a', 'b', 'c' and 2 more"),
    ],
)
def test_a_folder_without_series_files_is_named_with_the_pattern(
    tmp_path, entries, listed
):
    for name in entries:
        (tmp_path / name).write_text("")
    with pytest.raises(ConfigError) as info:
        load_availability(tmp_path)
    assert str(info.value) == (
        f"availability folder {str(tmp_path)!r} holds no series files *.json"
        f"{listed}; pass a folder of provider-churn JSON series or one such file, "
        'each {"metadata": {"gap_seconds": 300}, "data": [n_live, ...]}'
    )


def test_a_missing_availability_path_is_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_availability(tmp_path / "nope")
    assert str(info.value) == (
        f"availability {str(tmp_path / 'nope')!r} does not exist; pass a "
        'provider-churn JSON series ({"metadata": {"gap_seconds": 300}, "data": '
        "[n_live, ...]}) or a folder of them"
    )


@pytest.mark.parametrize(
    "metadata, reason",
    [
        ('{"gap_seconds": NaN}', "gap_seconds nan is not a number >= 1"),
        ('{"gap_seconds": Infinity}', "gap_seconds inf is not a number >= 1"),
        ('{"gap_seconds": 1e-6}', "gap_seconds 1e-06 is not a number >= 1"),
        ('{"gap_seconds": "300s"}', "gap_seconds '300s' is not a number >= 1"),
        ('{"gap_seconds": true}', "gap_seconds True is not a number >= 1"),
        ("{}", "a.json: no 'gap_seconds' field in its metadata"),
        ("[]", "a.json: 'metadata' is [], not a JSON object"),
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
    assert [str(m) for m in trace.malformed] == [
        "line 5: unbalanced quotes",
        "line 6: 3 fields, expected 11",
        "line 7: 12 fields, expected 11",
        "line 11: scheduled_time '7\ufffd' is not a number",
    ]
