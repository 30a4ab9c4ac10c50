"""bench compare: deltas with noise-aware verdicts from each run's own repeat spread."""

from __future__ import annotations

import pytest

from harness import compare
from harness.results import Record, RecordWriter


def rec(engine="anvil", scenario="latency", params=None, metrics=None, samples=None, status="ok") -> Record:
    params = params or {"batch": 1, "prompt_len": 16}
    return Record(
        run_id="r",
        suite="s",
        cell_id=f"c/{engine}",
        scenario=scenario,
        engine=engine,
        engine_version="t",
        model="tiny",
        dtype="float32",
        device="cpu",
        params=params,
        metrics=metrics or {},
        samples=samples or {},
        status=status,
    )


def lat(p50, std):
    return {"ttft_p50_ms": p50, "ttft_std_ms": std, "itl_p50_ms": 10.0, "itl_std_ms": 1.0}


def verdicts(a, b, **kw):
    return {(d.engine, d.metric): d.verdict for d in compare.compare(a, b, **kw)}


def test_shift_beyond_pooled_spread_is_a_verdict_within_it_is_noise():
    v = verdicts([rec(metrics=lat(100.0, 2.0))], [rec(metrics=lat(120.0, 2.0))])
    assert v[("anvil", "ttft_p50_ms")] == "worse"  # 20 ms > 2 x 2 ms, and lower is better
    assert v[("anvil", "itl_p50_ms")] == "noise"
    v = verdicts([rec(metrics=lat(100.0, 15.0))], [rec(metrics=lat(120.0, 15.0))])
    assert v[("anvil", "ttft_p50_ms")] == "noise"  # 20 ms < 2 x 15 ms
    v = verdicts([rec(metrics=lat(100.0, 2.0))], [rec(metrics=lat(80.0, 2.0))])
    assert v[("anvil", "ttft_p50_ms")] == "better"


def test_k_and_min_rel_are_the_knobs():
    a, b = [rec(metrics=lat(100.0, 2.0))], [rec(metrics=lat(103.0, 1.0))]
    assert verdicts(a, b)[("anvil", "ttft_p50_ms")] == "noise"  # pooled ~1.58, 2k = 3.16 > 3
    assert verdicts(a, b, k=1.0)[("anvil", "ttft_p50_ms")] == "worse"
    assert verdicts(a, b, k=1.0, min_rel=0.05)[("anvil", "ttft_p50_ms")] == "noise"


def test_throughput_spread_comes_from_raw_repeats():
    def tp(decode_s):
        samples = {
            "ttft_s": [0.1, 0.1, 0.1],
            "decode_s": decode_s,
            "e2e_s": [1.0, 1.0, 1.0],
            "output_tokens": [17, 17, 17],
        }
        rates = sorted(16 / d for d in decode_s)
        return rec(
            scenario="throughput",
            params={"batch": 1, "prompt_len": 32, "gen_len": 17},
            metrics={"decode_tok_s": rates[1], "prefill_tok_s": 320.0},
            samples=samples,
        )

    steady_a, steady_b = tp([1.0, 1.01, 0.99]), tp([0.8, 0.81, 0.79])
    assert compare.spread(steady_a, "decode_tok_s") == pytest.approx(0.16, rel=0.05)
    assert verdicts([steady_a], [steady_b])[("anvil", "decode_tok_s")] == "better"
    noisy_a, noisy_b = tp([1.0, 0.5, 1.5]), tp([0.8, 0.4, 1.4])
    assert verdicts([noisy_a], [noisy_b])[("anvil", "decode_tok_s")] == "noise"


def test_status_changes_and_unmatched_cells():
    a = [rec(metrics=lat(1, 0)), rec(engine="hf", status="failed"), rec(engine="llamacpp", metrics=lat(1, 0))]
    b = [rec(metrics=lat(1, 0), status="failed"), rec(engine="hf", metrics=lat(1, 0)), rec(engine="vllm")]
    v = verdicts(a, b)
    assert v[("anvil", "status")] == "broke" and v[("hf", "status")] == "fixed"
    assert v[("llamacpp", "-")] == "only in A" and v[("vllm", "-")] == "only in B"


def test_direction_from_metric_names():
    assert compare.direction("decode_tok_s") == "higher" and compare.direction("goodput_req_s") == "higher"
    assert compare.direction("ttft_p99_ms") == "lower" and compare.direction("j_per_token") == "lower"
    assert compare.direction("max_logit_diff") == "lower" and compare.direction("argmax_match_frac") == "higher"
    assert compare.direction("n_tokens") is None


def test_main_reads_run_folders_and_writes_markdown(tmp_path, capsys):
    for name, value in (("a", 100.0), ("b", 150.0)):
        with RecordWriter(tmp_path / name / "records.jsonl") as w:
            w.write(rec(metrics=lat(value, 1.0)))
    md = tmp_path / "cmp.md"
    assert compare.main(tmp_path / "a", tmp_path / "b", md_out=md) == 0
    text = md.read_text()
    assert "| ttft_p50_ms | 100 | 150 | +50 | +50.0% |" in text and "worse" in text
    assert compare.main(tmp_path / "a", tmp_path / "missing") == 2


def test_bench_compare_cli(tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    for name, value in (("a", 100.0), ("b", 150.0)):
        with RecordWriter(tmp_path / name / "records.jsonl") as w:
            w.write(rec(metrics=lat(value, 1.0)))
    res = CliRunner().invoke(
        app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--k", "3", "--md", str(tmp_path / "c.md")]
    )
    assert res.exit_code == 0, res.output
    assert "worse" in (tmp_path / "c.md").read_text()
