"""Load generator + serving scenario against a fake streaming server on 127.0.0.1 with planted delays."""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAIServer  # noqa: E402

from harness import loadgen  # noqa: E402
from harness.loadgen import LengthDist, LoadgenError, Workload  # noqa: E402
from harness.scenarios.serving import launched_server, parse_prefix_cache, plan, run_serving  # noqa: E402

# Planted delays are large next to the client + fake server overhead on a loaded 2-core CI box (~5-30 ms).
TTFT, TPOT = 0.08, 0.03


def test_measured_ttft_tpot_match_planted_delays():
    with FakeOpenAIServer(ttft=TTFT, tpot=TPOT) as srv:
        out = run_serving(
            {
                "base_url": srv.base_url,
                "num_requests": 5,
                "warmup_requests": 1,
                "concurrency": 1,
                "prompt_len": 16,
                "output_len": 6,
            }
        )
    m = out["metrics"]
    assert m["completed"] == 5 and m["failed"] == 0
    assert TTFT * 1000 <= m["ttft_p50_ms"] <= TTFT * 1000 + 60
    assert TPOT * 1000 * 0.9 <= m["tpot_p50_ms"] <= TPOT * 1000 * 1.5 + 5
    assert TPOT * 1000 * 0.9 <= m["itl_p50_ms"] <= TPOT * 1000 * 1.5 + 5
    assert m["e2e_p50_ms"] == pytest.approx(m["ttft_p50_ms"] + 5 * m["tpot_p50_ms"], rel=0.2)
    assert m["output_tokens"] == 30 and m["input_tokens"] == 5 * 16
    assert m["output_tok_s"] == pytest.approx(30 / m["duration_s"])
    assert m["request_throughput_req_s"] == pytest.approx(5 / m["duration_s"])
    assert len(out["samples"]) == 5 and all(len(s["itl"]) == 5 for s in out["samples"])
    assert out["telemetry"]["samples"] >= 2


def test_server_prefix_cache_counters_are_recorded_per_cell():
    with FakeOpenAIServer(ttft=0.01, tpot=0.001, prefix_metrics=True) as srv:
        srv.requests = 5  # counters that started before this cell: only the cell's difference counts
        out = run_serving({"base_url": srv.base_url, "num_requests": 4, "warmup_requests": 2, "output_len": 2})
    m = out["metrics"]
    assert m["server_prefix_cache_queries"] == 600.0 and m["server_prefix_cache_hits"] == 240.0  # 6 requests
    assert m["server_prefix_cache_hit_rate"] == pytest.approx(0.4)
    with FakeOpenAIServer(ttft=0.01, tpot=0.001) as srv:  # a server without the counters: no such metric
        out = run_serving({"base_url": srv.base_url, "num_requests": 2, "warmup_requests": 0, "output_len": 2})
    assert not any(k.startswith("server_prefix_cache") for k in out["metrics"])


def test_prefix_cache_page_parsing():
    page = ("# HELP vllm:prefix_cache_hits_total x\n# TYPE vllm:prefix_cache_hits_total counter\n"
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 3.0\n'
            'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 2.0\n'
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1.5e1\n')
    assert parse_prefix_cache(page) == {"hits": 5.0, "queries": 15.0}
    assert parse_prefix_cache("anvil:prefix_cache_queries_total 10.0\nanvil:prefix_cache_hits_total 4.0\n") == {
        "queries": 10.0, "hits": 4.0}
    assert parse_prefix_cache("anvil:prefix_cache_hits_total 4.0\n") is None  # both are needed
    assert parse_prefix_cache('{"object": "list"}') is None


def test_warmup_requests_are_sent_but_excluded():
    with FakeOpenAIServer(ttft=0.01, tpot=0.001) as srv:
        out = run_serving({"base_url": srv.base_url, "num_requests": 4, "warmup_requests": 3, "output_len": 2})
        assert srv.requests == 7
    assert out["metrics"]["requests"] == 4 and len(out["samples"]) == 4
    assert out["info"]["warmup_requests"] == 3
    assert all(s["index"] >= 0 for s in out["samples"])


@pytest.mark.parametrize("conc", [1, 3])
def test_concurrency_is_a_ceiling_and_is_reached(conc):
    with FakeOpenAIServer(ttft=0.05, tpot=0.005) as srv:
        run_serving(
            {"base_url": srv.base_url, "num_requests": 9, "warmup_requests": 0, "concurrency": conc, "output_len": 3}
        )
        assert srv.max_inflight == conc


def test_goodput_counts_only_requests_meeting_every_slo():
    # every 4th request has a 400 ms first token: 2 of 8 miss the 250 ms TTFT SLO
    with FakeOpenAIServer(ttft=0.03, tpot=0.005, slow_every=4, slow_ttft=0.4) as srv:
        out = run_serving(
            {
                "base_url": srv.base_url,
                "num_requests": 8,
                "warmup_requests": 0,
                "concurrency": 2,
                "output_len": 3,
                "slo_ttft_ms": 250,
                "slo_tpot_ms": 100,
            }
        )
    m = out["metrics"]
    assert m["good_requests"] == 6
    assert m["goodput_req_s"] == pytest.approx(6 / m["duration_s"])
    assert m["good_fraction"] == pytest.approx(0.75)
    assert m["slo_pass"] == 0.0  # p99 TTFT is ~400 ms
    with FakeOpenAIServer(ttft=0.03, tpot=0.005) as srv:
        ok = run_serving(
            {
                "base_url": srv.base_url,
                "num_requests": 4,
                "warmup_requests": 0,
                "output_len": 3,
                "slo_ttft_ms": 2000,
                "slo_tpot_ms": 100,
            }
        )
    assert ok["metrics"]["slo_pass"] == 1.0 and ok["metrics"]["good_requests"] == 4


def test_failed_requests_are_samples_not_crashes():
    with FakeOpenAIServer(ttft=0.01, tpot=0.001, fail_every=3) as srv:
        out = run_serving(
            {
                "base_url": srv.base_url,
                "num_requests": 6,
                "warmup_requests": 0,
                "concurrency": 1,
                "output_len": 2,
                "slo_ttft_ms": 1000,
            }
        )
    m = out["metrics"]
    assert m["failed"] == 2 and m["completed"] == 4
    assert any("HTTP 500" in e for e in out["info"]["errors"])
    assert m["slo_pass"] == 0.0  # an aggregate SLO cannot pass with failed requests


def test_run_is_bounded_in_time():
    with FakeOpenAIServer(ttft=0.01, tpot=0.2) as srv:  # 20 tokens would take 4 s per request
        t = time.perf_counter()
        out = run_serving(
            {"base_url": srv.base_url, "num_requests": 3, "warmup_requests": 0, "output_len": 20, "max_duration_s": 0.5}
        )
        assert time.perf_counter() - t < 3.0
    assert out["info"]["truncated"] is True
    assert out["metrics"]["failed"] == 3
    assert any("max_duration_s" in e for e in out["info"]["errors"])


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com:80", "ftp://127.0.0.1:1"])
def test_non_loopback_targets_are_refused(url):
    with pytest.raises(LoadgenError):
        plan({"base_url": url})


def test_loopback_forms_and_explicit_allow():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "http://127.3.4.5:9"):
        loadgen.check_target(url)
    plan({"base_url": "http://10.1.2.3:8000", "allow_remote": True})


def test_unknown_params_and_bad_values_name_the_key():
    with pytest.raises(LoadgenError, match="unknown params.*concurency"):
        plan({"base_url": "http://127.0.0.1:1", "concurency": 4})
    with pytest.raises(LoadgenError, match="range_ratio"):
        plan({"base_url": "http://127.0.0.1:1", "range_ratio": 1.5})
    plan({"base_url": "http://127.0.0.1:1", "max_failed_frac": 0.05})  # read by results.status: a known param
    with pytest.raises(LoadgenError, match="max_failed_frac"):
        plan({"base_url": "http://127.0.0.1:1", "max_failed_frac": -0.1})
    with pytest.raises(LoadgenError, match="lengths"):
        LengthDist.parse([10, 2], "lengths")
    with pytest.raises(LoadgenError, match="unknown SLO"):
        loadgen.summarize(loadgen.LoadResult({}, [], [], 1.0, False), {"ttfb_ms": 1})


def test_poisson_and_gamma_arrivals():
    n, rate = 4000, 50.0
    assert loadgen.arrival_offsets(5, math.inf, 1.0, 0) == [0.0] * 5
    for burst in (1.0, 0.25, 4.0):
        t = loadgen.arrival_offsets(n, rate, burst, seed=1)
        gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
        mean = statistics.fmean(gaps)
        cv2 = statistics.pvariance(gaps) / mean**2
        assert mean == pytest.approx(1 / rate, rel=0.1)
        assert cv2 == pytest.approx(1 / burst, rel=0.2)  # gamma(k): CV^2 = 1/k; Poisson (k=1): 1
    assert loadgen.arrival_offsets(10, 5.0, 1.0, 7) == loadgen.arrival_offsets(10, 5.0, 1.0, 7)


def test_request_rate_spreads_the_sends():
    with FakeOpenAIServer(ttft=0.005, tpot=0.001) as srv:
        out = run_serving(
            {
                "base_url": srv.base_url,
                "num_requests": 6,
                "warmup_requests": 0,
                "output_len": 2,
                "request_rate": 10.0,
                "burstiness": 4.0,
            }
        )
    starts = sorted(s["start"] for s in out["samples"])
    assert starts[-1] == pytest.approx(0.5, abs=0.35)  # 5 gaps of ~0.1 s, steady (burstiness 4)


def test_length_distributions_and_dataset(tmp_path):
    reqs = loadgen.build_requests(Workload(LengthDist("uniform", low=3, high=9), LengthDist.parse([2, 4], "o")), 50)
    assert {len(r.prompt) for r in reqs} <= set(range(3, 10)) and len({len(r.prompt) for r in reqs}) > 2
    assert {r.max_tokens for r in reqs} <= {2, 3, 4}
    assert all(10 <= t < 512 for r in reqs for t in r.prompt)
    text = loadgen.build_requests(Workload(prompt_format="text", prompt_len=LengthDist("fixed", 5)), 1)[0]
    assert isinstance(text.prompt, str) and len(text.prompt.split()) == 5
    ds = tmp_path / "d.jsonl"
    ds.write_text(json.dumps({"prompt_ids": [11, 12, 13], "output_len": 4}) + "\n\n" + json.dumps({"prompt": "hi"}))
    rows = loadgen.build_requests(Workload(dataset=str(ds), output_len=LengthDist("fixed", 7)), 3)
    assert [(r.prompt, r.max_tokens) for r in rows] == [([11, 12, 13], 4), ("hi", 7), ([11, 12, 13], 4)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(LoadgenError, match="bad.jsonl:1"):
        loadgen.build_requests(Workload(dataset=str(bad)), 1)


def test_chat_endpoint_and_server_without_usage():
    with FakeOpenAIServer(ttft=0.01, tpot=0.002, usage=False) as srv:
        out = run_serving(
            {
                "base_url": srv.base_url,
                "endpoint": "/v1/chat/completions",
                "num_requests": 2,
                "warmup_requests": 0,
                "output_len": 4,
                "prompt_format": "text",
            }
        )
        assert "messages" in srv.bodies[0] and srv.bodies[0]["stream"] is True
    assert out["metrics"]["output_tokens"] == 8  # counted from token events: the empty final chunk is not one


def test_launch_starts_polls_and_stops_a_server():
    script = str(Path(__file__).parent / "fake_openai.py")
    params = {
        "launch": shlex.join([sys.executable, script]) + " {port}",
        "num_requests": 2,
        "warmup_requests": 0,
        "output_len": 2,
        "launch_timeout_s": 30,
    }
    out = run_serving(params)
    assert out["metrics"]["completed"] == 2
    with pytest.raises(RuntimeError, match="exited with code"):
        with launched_server([sys.executable, "-c", "raise SystemExit(3)"], {}, timeout_s=10):
            pass


def test_through_the_runner_with_the_openai_http_engine(tmp_path):
    from harness.runner import run_suite
    from harness.suite import parse

    with FakeOpenAIServer(ttft=0.02, tpot=0.005) as srv:
        text = f"""
[suite]
name = "serve"
engines = ["openai_http"]
cell_timeout_s = 120

[options.openai_http]
base_url = "{srv.base_url}"

[[models]]
name = "tiny"

[[scenarios]]
type = "serving"
concurrency = [1, 2]
num_requests = 4
warmup_requests = 1
prompt_len = 12
output_len = 3
slo_ttft_ms = 2000.0
slo_tpot_ms = 100.0
"""
        out = run_suite(parse(text, "serve.toml"), tmp_path / "run")
    assert [r.status for r in out.records] == ["ok", "ok"], [r.reason for r in out.records]
    for r in out.records:
        assert r.metrics["completed"] == 4 and r.metrics["goodput_req_s"] > 0 and r.metrics["slo_pass"] == 1.0
        assert len(r.samples["requests"]) == 4 and r.samples["info"]["base_url"] == srv.base_url
        assert r.samples["requests"][0]["prompt_len"] == 12  # token-id prompts within the model's vocabulary
    assert srv.requests == 2 * (4 + 1)
    from adapters.base import ModelSpec
    from harness.suite import resolve_model
    from harness.workload import vocab_size

    vocab = vocab_size(ModelSpec("tiny", resolve_model("tiny")))
    assert all(max(b["prompt"]) < vocab for b in srv.bodies)


def test_a_request_past_its_timeout_is_an_error_sample():
    with FakeOpenAIServer(ttft=0.01, tpot=0.1) as srv:
        out = run_serving(
            {
                "base_url": srv.base_url,
                "num_requests": 2,
                "warmup_requests": 0,
                "output_len": 10,
                "request_timeout_s": 0.3,
            }
        )
    assert out["metrics"]["failed"] == 2
    assert any("request_timeout_s" in e for e in out["info"]["errors"])


def test_seed_sweeps_into_cells_with_their_own_prompts_and_arrivals():
    # the shipped cold suite: every cell its own seed, the Poisson loads three each
    from harness.suite import parse

    path = Path(__file__).resolve().parents[2] / "suites" / "serving-gpu-cold.toml"
    suite = parse(path.read_text(), str(path), resolve=False)
    cells = [c.param_dict for c in suite.cells]
    got = [(c["request_rate"], c["concurrency"], c["seed"]) for c in cells]
    assert got == [(8.0, 0, 1), (8.0, 0, 2), (8.0, 0, 3), (32.0, 0, 4), (32.0, 0, 5), (32.0, 0, 6),
                   (math.inf, 32, 7), (math.inf, 64, 8)]  # fmt: skip
    works = [plan(c, "http://127.0.0.1:1", vocab_size=1000) for c in cells[:3]]
    prompts = [[r.prompt for r in loadgen.build_requests(w, 8)] for _, w, _ in works]
    offsets = [loadgen.arrival_offsets(8, cfg.request_rate, cfg.burstiness, cfg.seed) for cfg, _, _ in works]
    assert prompts[0] != prompts[1] != prompts[2] and offsets[0] != offsets[1] != offsets[2]
    assert prompts[0] == [r.prompt for r in loadgen.build_requests(works[0][1], 8)]  # deterministic per seed


def test_token_id_prompts_need_a_vocabulary():
    with pytest.raises(LoadgenError, match="prompt_format = 'text'"):
        plan({"base_url": "http://127.0.0.1:1"}, vocab_size=0)
    plan({"base_url": "http://127.0.0.1:1", "prompt_format": "text"}, vocab_size=0)


def test_shipped_serving_suite_runs_end_to_end_against_a_loopback_server(tmp_path):
    """suites/serving.toml as shipped, pointed at a fast fake server and cut to 4 requests a cell: every cell
    (concurrency sweep, Poisson rates, bursty arrivals) completes and writes its percentile columns."""
    import re

    from typer.testing import CliRunner

    from harness.cli import app
    from harness.results import load_records

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "suites" / "serving.toml").read_text()
    with FakeOpenAIServer(ttft=0.005, tpot=0.0005) as srv:
        text = text.replace('base_url = "http://127.0.0.1:8000"', f'base_url = "{srv.base_url}"')
        text = re.sub(r"^launch(_timeout_s)? = .*\n", "", text, flags=re.M)  # the fake stands in for both servers
        text = re.sub(r"num_requests = \d+", "num_requests = 4", text)
        text = text.replace("request_rate = [1.0, 4.0, 16.0]", "request_rate = [8.0, 32.0]")
        suite = tmp_path / "serving.toml"
        suite.write_text(text)
        out = tmp_path / "run"
        res = CliRunner().invoke(app, ["run", str(suite), "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = load_records(out / "records.jsonl")
    assert len(records) == 2 * (4 + 2 + 1) and all(r.status == "ok" for r in records), [r.reason for r in records]
    for r in records:
        assert r.metrics["completed"] == 4 and r.metrics["failed"] == 0
        assert 0 < r.metrics["ttft_p50_ms"] <= r.metrics["ttft_p90_ms"] <= r.metrics["ttft_p99_ms"]
    assert "ttft_p99_ms" in (out / "table.md").read_text()
