"""Speculation through a suite's [options.anvil]: the adapter validates the spec options, generates the same
greedy tokens as without them, and records the speculative totals in its info."""

from __future__ import annotations

import pytest

from adapters.anvil import AnvilAdapter
from adapters.base import GenRequest, ModelSpec


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    from engine.testing import tiny_config

    return make_checkpoint(tiny_config("llama"), seed=3, std=0.1)


def test_spec_options_tokens_and_info(ckpt):
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [40, 41, 42]]
    plain = AnvilAdapter()
    plain.load(ModelSpec(name=str(ckpt), path=str(ckpt)))
    ref = plain.generate([GenRequest(p, 12) for p in prompts])
    assert plain.info()["spec"] is None
    a = AnvilAdapter()
    opts = {"spec": "ngram", "num_spec_tokens": 3}
    AnvilAdapter.validate_options(opts)
    a.load(ModelSpec(name=str(ckpt), path=str(ckpt)), opts)
    got = a.generate([GenRequest(p, 12) for p in prompts])
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    assert all(len(r.token_times) == 12 for r in got)
    spec = a.info()["spec"]
    assert spec["method"] == "ngram" and spec["num_spec_tokens"] == 3 and spec["proposed"] > 0
    with pytest.raises(ValueError, match="^spec:"):
        AnvilAdapter.validate_options({"spec": "eagle"})


def test_suite_records_carry_the_speculative_totals(tmp_path):
    """A suite with [options.anvil] spec keys on models/tiny (it falls into loops that prompt lookup drafts): each
    record's engine_info holds the totals after its cell (the info at load time has none), growing cell to cell."""
    from harness.runner import run_suite
    from harness.suite import parse

    text = """
[suite]
name = "spec-records"
engines = ["anvil"]
engine_warmup_s = 0.0

[options.anvil]
spec = "ngram"
num_spec_tokens = 3

[[models]]
name = "tiny"
dtype = "float32"
device = "cpu"

[[scenarios]]
type = "throughput"
batch = 1
prompt_len = 16
gen_len = [32, 48]
warmup = 0
repeats = 1
"""
    out = run_suite(parse(text, "spec.toml"), tmp_path / "run")
    assert [r.status for r in out.records] == ["ok", "ok"], [r.reason for r in out.records]
    specs = [r.engine_info["spec"] for r in out.records]
    assert all(s["method"] == "ngram" and s["num_spec_tokens"] == 3 for s in specs)
    assert 0 < specs[0]["verify_steps"] + specs[0]["proposed"] < specs[1]["verify_steps"] + specs[1]["proposed"]
