"""Long-context scenario: prefill/decode figures from planted timings, refusal of prompts past the context."""

from __future__ import annotations

import json

import pytest

from adapters.base import Adapter, GenRequest, GenResult, ModelSpec
from harness.scenarios.long_context import context_limit, run_long_context


class PlantedAdapter(Adapter):
    """Answers with planted timestamps: prefill 10 us/token, decode 2 ms/token; fails past `n_ctx` tokens."""

    name = "planted"

    def __init__(self, n_ctx: int | None = None, fail: str | None = None):
        self.n_ctx, self.fail, self.seen, self.prompts = n_ctx, fail, [], []

    @classmethod
    def available(cls):
        return True, "test"

    def load(self, model, opts=None):
        pass

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        (req,) = requests
        self.seen.append(len(req.prompt_ids))
        self.prompts.append(tuple(req.prompt_ids))
        if self.fail:
            raise RuntimeError(self.fail)
        if self.n_ctx and len(req.prompt_ids) + req.max_new_tokens > self.n_ctx:
            raise ValueError(f"sequence too long for n_ctx={self.n_ctx}")
        t0 = 100.0
        first = t0 + 1e-5 * len(req.prompt_ids)
        times = [first + 0.002 * i for i in range(req.max_new_tokens)]
        return [GenResult(list(range(req.max_new_tokens)), None, t0, first, times, "length", len(req.prompt_ids))]


def model_dir(tmp_path, ctx=4096, vocab=1000):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": ctx, "vocab_size": vocab}))
    return ModelSpec("local", str(tmp_path))


def test_prefill_and_decode_speed_from_planted_timings(tmp_path):
    ad = PlantedAdapter()
    out = run_long_context(ad, model_dir(tmp_path), {"prompt_len": 2000, "decode_tokens": 11, "repeats": 2})
    assert out["status"] == "ok", out["reason"]
    m = out["metrics"]
    assert m["ttft_ms"] == pytest.approx(20.0)
    assert m["prefill_tok_s"] == pytest.approx(100_000.0)
    assert m["decode_tok_s"] == pytest.approx(500.0)
    assert m["decode_ms_per_token"] == pytest.approx(2.0)
    assert m["prompt_tokens"] == 2000
    assert "rss_peak_mb" in m  # peak memory on the CPU: the process's resident set
    assert out["telemetry"]["gpu_present"] in (True, False)
    assert len(out["samples"]) == 2
    assert ad.seen == [2000, 2000, 2000]  # a warm-up of the measured length, then the measured runs
    assert len(set(ad.prompts)) == 3  # each its own prompt: no prefix cache serves a repeat


def test_warmup_len_and_count(tmp_path):
    ad = PlantedAdapter()
    out = run_long_context(ad, model_dir(tmp_path), {"prompt_len": 300, "warmup": 2, "warmup_len": 64})
    assert out["status"] == "ok" and ad.seen == [64, 64, 300]
    ad = PlantedAdapter()
    run_long_context(ad, model_dir(tmp_path), {"prompt_len": 30, "warmup": 0, "warmup_len": 64})
    assert ad.seen == [30]


def test_prompt_longer_than_the_context_is_refused_not_truncated(tmp_path):
    ad = PlantedAdapter()
    out = run_long_context(ad, model_dir(tmp_path, ctx=4096), {"prompt_len": 4090, "decode_tokens": 16})
    assert out["status"] == "skipped"
    assert "4090" in out["reason"] and "4096" in out["reason"] and "not truncated" in out["reason"]
    assert "config.json" in out["reason"]
    assert ad.seen == []  # nothing was sent, so nothing could be cut


def test_limits_come_from_suite_adapter_preset_and_engine_options(tmp_path):
    spec = model_dir(tmp_path, ctx=8192)
    assert context_limit(spec, {"context_len": 100})[0] == 100
    assert context_limit(spec, {}) == (8192, f"max_position_embeddings in {tmp_path}/config.json")
    assert context_limit(spec, {}, opts={"max_seq_len": 2048})[0] == 2048
    ad = PlantedAdapter()
    ad.max_context = 1024
    assert context_limit(spec, {}, ad)[0] == 1024
    assert context_limit(ModelSpec("x", None), {})[0] is None
    pytest.importorskip("engine.presets")
    assert context_limit(ModelSpec("synthetic:llama-3-8b", None), {})[0] == 131072


def test_engine_that_fails_at_a_length_records_failed_with_the_reason(tmp_path):
    out = run_long_context(PlantedAdapter(fail="CUDA out of memory"), model_dir(tmp_path), {"prompt_len": 1024})
    assert out["status"] == "failed" and "out of memory" in out["reason"]
    out = run_long_context(PlantedAdapter(n_ctx=512), ModelSpec("x", None), {"prompt_len": 1024, "warmup": False})
    assert out["status"] == "failed" and "n_ctx=512" in out["reason"]


def test_bad_params_raise():
    with pytest.raises(ValueError, match="prompt_len is required"):
        run_long_context(PlantedAdapter(), ModelSpec("x", None), {})
    with pytest.raises(ValueError, match="unknown params"):
        run_long_context(PlantedAdapter(), ModelSpec("x", None), {"prompt_len": 8, "lenght": 3})


def test_through_the_runner_with_the_tiny_model(tmp_path):
    pytest.importorskip("engine.generator")
    from harness.runner import run_suite
    from harness.suite import parse

    text = """
[suite]
name = "lc"
engines = ["anvil"]
cell_timeout_s = 300

[[models]]
name = "tiny"

[[scenarios]]
type = "long_context"
prompt_len = [48, 100000]
decode_tokens = 4
warmup = 0
"""
    out = run_suite(parse(text, "lc.toml"), tmp_path / "run")
    by = {r.params["prompt_len"]: r for r in out.records}
    ok, long = by[48], by[100000]
    assert ok.status == "ok", ok.reason
    assert ok.metrics["prompt_tokens"] == 48 and ok.metrics["prefill_tok_s"] > 0 and ok.metrics["decode_tok_s"] > 0
    assert ok.samples["telemetry"]["gpu_present"] is False and ok.samples["runs"][0]["output_tokens"] == 4
    assert long.status == "skipped"
    assert (
        "100000 tokens" in long.reason and "not truncated" in long.reason and "max_position_embeddings" in long.reason
    )
