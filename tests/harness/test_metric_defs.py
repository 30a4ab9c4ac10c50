"""Metric definitions on planted timings: vLLM's TTFT / TPOT / ITL, throughputs over the batch's wall time, and a
prefill rate only where prefill and decode did not interleave (a chunked-prefill engine gets a note instead)."""

from __future__ import annotations

from pathlib import Path

import pytest
from timing_fakes import Bursty, ChunkedPrefill, Serial, StaticBatch

from harness import metrics as M
from harness.scenarios import latency, throughput
from harness.workload import Context, random_prompts

EXACT = {"rel": 1e-9, "abs": 1e-9}  # planted ms / 1e3 offsets from t0 = 100 s carry float rounding only
ROUNDED = 1e-5  # records keep 6 significant digits (harness.metrics.clean)


def ctx(**kw) -> Context:
    return Context(engine="planted", case_id="c", vocab_size=50, out_dir=Path("."), **kw)


def timing(adapter, batch: int, prompt_len: int, gen_len: int) -> M.BatchTiming:
    from harness.workload import run_batch

    return M.batch_timing(run_batch(adapter, random_prompts(50, batch, prompt_len, 0), gen_len))


def test_static_batch_phases_do_not_interleave_and_every_rate_is_defined():
    t = timing(StaticBatch(), batch=4, prompt_len=8, gen_len=5)  # first tokens at 40 ms, then 10 ms steps
    assert t.interleaved is None
    assert t.ttft == pytest.approx([0.040] * 4, **EXACT) and t.e2e == pytest.approx([0.080] * 4, **EXACT)
    assert t.tpot == pytest.approx([0.010] * 4, **EXACT) and t.itl == pytest.approx([0.010] * 16, **EXACT)
    assert t.wall == pytest.approx(0.080, **EXACT)
    assert t.output_tok_s == pytest.approx(20 / 0.080, **EXACT)  # 250
    assert t.total_tok_s == pytest.approx((32 + 20) / 0.080, **EXACT)  # 650
    assert t.prefill_tok_s == pytest.approx(32 / 0.040, **EXACT)  # 800: 4 x 8 prompt tokens in 40 ms
    assert t.decode_tok_s == pytest.approx(16 / 0.040, **EXACT)  # 400: 4 requests x 100 steps/s
    assert t.step == pytest.approx(0.010, **EXACT)


def test_chunked_prefill_interleaves_so_no_prefill_rate_but_decode_step_is_the_pure_one():
    t = timing(ChunkedPrefill(), batch=3, prompt_len=8, gen_len=4)
    assert t.interleaved == ("prefill and decode interleaved: request 2's first token came at 60 ms, "
                             "after request 0's second token at 40 ms")
    assert t.ttft == pytest.approx([0.020, 0.040, 0.060], **EXACT)
    assert t.e2e == pytest.approx([0.070, 0.080, 0.090], **EXACT)
    assert t.tpot == pytest.approx([0.050 / 3, 0.040 / 3, 0.030 / 3], **EXACT)
    assert sorted(t.itl) == pytest.approx([0.010] * 6 + [0.020] * 3, **EXACT)
    assert t.output_tok_s == pytest.approx(12 / 0.090, **EXACT)
    assert t.total_tok_s == pytest.approx((24 + 12) / 0.090, **EXACT)
    assert t.prefill_tok_s != t.prefill_tok_s  # NaN: not measurable
    assert t.decode_window == pytest.approx(0.030, **EXACT) and t.decode_window_tokens == 6  # after 60 ms
    assert t.decode_tok_s == pytest.approx(200.0, **EXACT)
    assert t.decode_gaps == pytest.approx([0.010] * 6, **EXACT)  # the 20 ms mixed steps are not decode steps
    assert t.decode_steps == pytest.approx([0.010] * 3, **EXACT) and t.step == pytest.approx(0.010, **EXACT)


def test_throughput_scenario_on_the_interleaving_engine_omits_prefill_and_says_why():
    params = {"batch": 3, "prompt_len": 8, "gen_len": 4, "warmup": 1, "repeats": 2, "seed": 0}
    m, s = throughput.run(ChunkedPrefill(), params, ctx(weight_bytes=1_000_000_000, copy_gb_s=400.0))
    assert "prefill_tok_s" not in m
    assert m["prefill_tok_s_note"] == ("not measurable: prefill and decode interleaved: request 2's first token "
                                       "came at 60 ms, after request 0's second token at 40 ms (repeat 0; 2 of 2 "
                                       "repeats interleaved)")
    assert m["ttft_mean_ms"] == pytest.approx(40.0) and m["ttft_p50_ms"] == pytest.approx(40.0)
    assert m["tpot_mean_ms"] == pytest.approx(40.0 / 3, rel=ROUNDED) and m["tpot_p50_ms"] == pytest.approx(40.0 / 3, rel=ROUNDED)
    assert m["itl_p50_ms"] == pytest.approx(10.0) and m["itl_mean_ms"] == pytest.approx(120.0 / 9, rel=ROUNDED)
    assert m["itl_p90_ms"] == pytest.approx(20.0)
    assert m["e2e_p50_ms"] == pytest.approx(80.0) and m["batch_ttft_p50_ms"] == pytest.approx(60.0)
    assert m["output_tok_s"] == pytest.approx(133.333, rel=ROUNDED) and m["gen_tok_s"] == m["output_tok_s"]
    assert m["total_tok_s"] == pytest.approx(400.0)
    assert m["decode_tok_s"] == pytest.approx(200.0)
    assert m["step_ms"] == pytest.approx(10.0)
    assert m["weight_gb_s"] == pytest.approx(100.0) and m["weight_pct_copy"] == pytest.approx(25.0)
    assert s["ttft_s"] == pytest.approx([0.060, 0.060]) and s["decode_s"] == pytest.approx([0.030, 0.030])
    assert s["step_s"] == pytest.approx([0.010, 0.010]) and s["output_tokens"] == [12, 12]
    assert len(s["request_ttft_s"]) == 6 and len(s["itl_s"]) == 18


def test_throughput_scenario_on_the_static_batch_engine_reports_the_prefill_rate():
    params = {"batch": 4, "prompt_len": 8, "gen_len": 5, "warmup": 0, "repeats": 3, "seed": 0}
    m, _ = throughput.run(StaticBatch(), params, ctx())
    assert "prefill_tok_s_note" not in m
    assert m["prefill_tok_s"] == pytest.approx(800.0)
    assert m["decode_tok_s"] == pytest.approx(400.0)
    assert m["output_tok_s"] == pytest.approx(250.0) and m["total_tok_s"] == pytest.approx(650.0)
    assert m["ttft_p50_ms"] == pytest.approx(40.0) and m["tpot_p50_ms"] == pytest.approx(10.0)
    assert m["itl_p99_ms"] == pytest.approx(10.0) and m["step_ms"] == pytest.approx(10.0)
    assert "weight_gb_s" not in m  # no weight bytes known


def test_serial_engine_decode_rate_and_step_are_its_one_request_ones():
    params = {"batch": 2, "prompt_len": 8, "gen_len": 3, "warmup": 0, "repeats": 1, "seed": 0}
    m, _ = throughput.run(Serial(), params, ctx())  # r0: 30 40 50   r1: 80 90 100
    assert "prefill_tok_s" not in m and "request 1's first token came at 80 ms" in m["prefill_tok_s_note"]
    assert m["ttft_mean_ms"] == pytest.approx(55.0) and m["tpot_mean_ms"] == pytest.approx(10.0)
    assert m["output_tok_s"] == pytest.approx(60.0) and m["total_tok_s"] == pytest.approx(220.0)
    assert m["decode_tok_s"] == pytest.approx(100.0) and m["step_ms"] == pytest.approx(10.0)


def test_latency_scenario_uses_the_same_definitions():
    params = {"batch": 3, "prompt_len": 8, "gen_len": 4, "warmup": 0, "repeats": 1, "seed": 1}
    m, s = latency.run(ChunkedPrefill(), params, ctx())
    assert m["ttft_p50_ms"] == pytest.approx(40.0) and m["ttft_p99_ms"] == pytest.approx(59.6)
    assert m["tpot_mean_ms"] == pytest.approx(40.0 / 3, rel=ROUNDED)
    assert m["itl_p50_ms"] == pytest.approx(10.0) and m["itl_max_ms"] == pytest.approx(20.0)
    assert m["e2e_p50_ms"] == pytest.approx(80.0)
    assert m["output_tok_s"] == pytest.approx(12 / 0.090, rel=ROUNDED) and m["total_tok_s"] == pytest.approx(400.0)
    assert len(s["itl_s"]) == 9 and len(s["tpot_s"]) == 3


def test_tokens_handed_over_in_bursts_are_timed_per_token():
    params = {"batch": 2, "prompt_len": 8, "gen_len": 7, "warmup": 0, "repeats": 1, "seed": 0}
    m, _ = throughput.run(Bursty(), params, ctx(weight_bytes=1_000_000_000))  # 40, then 70 70 70 100 100 100
    assert m["itl_p50_ms"] == pytest.approx(0.0)  # the median gap says nothing about the step ...
    assert m["step_ms"] == pytest.approx(10.0) and m["tpot_p50_ms"] == pytest.approx(10.0)  # ... the mean does
    assert m["weight_gb_s"] == pytest.approx(100.0) and m["decode_tok_s"] == pytest.approx(200.0)
