"""Statistics from raw samples and the versioned JSONL record format."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness import metrics as M
from harness.results import SCHEMA_VERSION, Record, RecordWriter, load_records


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy_linear(n):
    xs = list(np.random.default_rng(n).exponential(size=n))
    for p in (0, 50, 90, 99, 100):
        assert M.percentile(xs, p) == pytest.approx(float(np.percentile(xs, p, method="linear")))


def test_summarize_names_carry_units_and_scale():
    s = M.summarize("itl", [0.001, 0.002, 0.003], "ms", 1e3)
    assert set(s) == {"itl_mean_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "itl_std_ms"}
    assert s["itl_p50_ms"] == pytest.approx(2.0) and s["itl_mean_ms"] == pytest.approx(2.0)
    assert s["itl_std_ms"] == pytest.approx(1.0)


def test_empty_and_degenerate_inputs():
    assert math.isnan(M.percentile([], 50)) and math.isnan(M.mean([]))
    assert math.isnan(M.rate(10, 0.0))
    assert M.clean({"a": math.nan, "b": 1.23456789, "c": 3}) == {"a": None, "b": 1.23457, "c": 3}
    with pytest.raises(ValueError):
        M.percentile([1.0], 101)


def rec(**kw):
    base = dict(run_id="r", suite="s", cell_id="c", scenario="latency", engine="hf", engine_version="1",
                model="tiny", dtype="float32", device="cpu", params={"batch": 1})
    return Record(**{**base, **kw})


def test_jsonl_round_trip_and_torn_last_line(tmp_path):
    p = tmp_path / "records.jsonl"
    with RecordWriter(p) as w:
        w.write(rec(metrics={"ttft_p50_ms": 1.5}, samples={"ttft_s": [0.0015]}))
        w.write(rec(cell_id="d", status="failed", reason="boom"))
    with open(p, "a") as f:
        f.write('{"schema_version": 1, "run_id"')  # a writer killed mid-line
    got = load_records(tmp_path)
    assert [r.cell_id for r in got] == ["c", "d"]
    assert got[0].metrics == {"ttft_p50_ms": 1.5} and got[0].schema_version == SCHEMA_VERSION
    assert got[1].status == "failed" and got[1].reason == "boom" and got[1].time.endswith("Z")


def test_gzipped_records_load_like_plain_ones(tmp_path):
    import gzip

    p = tmp_path / "records.jsonl"
    with RecordWriter(p) as w:
        w.write(rec(metrics={"decode_tok_s": 210.8}))
        w.write(rec(cell_id="d"))
    gz = tmp_path / "records.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert [r.to_dict() for r in load_records(gz)] == [r.to_dict() for r in load_records(p)]
    assert load_records(gz)[0].metrics == {"decode_tok_s": 210.8}


def test_record_rejects_unknown_status_and_other_schema_versions(tmp_path):
    with pytest.raises(ValueError, match="status"):
        rec(status="weird")
    d = rec().to_dict()
    d["schema_version"] = 99
    (tmp_path / "records.jsonl").write_text(json.dumps(d) + "\n")
    with pytest.raises(ValueError, match="schema_version 99"):
        load_records(tmp_path)


def test_union_length_counts_overlaps_once():
    from harness.scenarios.throughput import union_length

    assert union_length([(0.0, 2.0), (1.0, 3.0)]) == 3.0  # batched: overlapping decode phases
    assert union_length([(0.0, 1.0), (2.0, 4.0)]) == 3.0  # serial: disjoint phases add up
    assert union_length([(0.0, 5.0), (1.0, 2.0)]) == 5.0  # nested
    assert union_length([]) == 0.0
