"""Speculative decoding is lossless under greedy decoding: every proposer's output equals plain greedy output
token for token on the trained tiny model (held-out code prompts of mixed lengths), with requests that do not
speculate in the same batch, under a small token budget with chunked prefill, under preemption, with stop ids;
and the per-request statistics add up."""

from __future__ import annotations

from pathlib import Path

import pytest

import engine
from engine import LLM, EngineConfig
from tests.engine.spec._helpers import code_prompts, run

REPO = Path(__file__).resolve().parents[3]
LENS = [7, 90, 33, 150, 3]
N_NEW = 48
PROPOSERS = ["ngram", "lookahead", "draft", "medusa"]


def cfg(spec="none", **kw) -> EngineConfig:
    extra = {"draft": {"draft_model": "tiny-draft"}, "medusa": {"draft_model": str(REPO / "models" / "tiny")}}
    return EngineConfig(**{"max_num_seqs": 8, "max_model_len": 512, "max_num_batched_tokens": 512, "spec": spec,
                           **extra.get(spec, {}), **kw})  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    if not (REPO / "models" / "tiny" / "config.json").is_file():
        pytest.skip("models/tiny is not in this checkout")
    return engine.load("tiny")


@pytest.fixture(scope="module")
def reference(tiny):
    prompts = code_prompts(tiny.tokenizer, LENS)
    return prompts, [o.tokens for o in LLM(tiny, cfg()).generate(prompts, max_tokens=N_NEW)]


@pytest.mark.parametrize("spec", PROPOSERS)
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculation_equals_plain_greedy(tiny, reference, spec, k):
    prompts, ref = reference
    llm = LLM(tiny, cfg(spec, num_spec_tokens=k))
    got, outs = run(llm, prompts, N_NEW)
    assert got == ref
    info = llm.info()["spec"]
    assert info["method"] == spec and info["proposed"] > 0 and 0 <= info["accepted"] <= info["proposed"]
    assert sum(o.spec_proposed for o in outs) == info["proposed"]
    assert sum(o.spec_accepted for o in outs) == info["accepted"]
    for o in outs:
        if o.spec_steps:
            assert 1.0 <= o.mean_accepted_len <= k + 1 and 0.0 <= o.acceptance_rate <= 1.0
    assert llm.core.blocks.num_free == llm.core.blocks.num_usable


@pytest.mark.parametrize("spec", PROPOSERS)
def test_requests_without_speculation_in_the_same_batch(tiny, reference, spec):
    prompts, ref = reference
    llm = LLM(tiny, cfg(spec, num_spec_tokens=3))
    got, outs = run(llm, prompts, N_NEW, no_spec={1, 4})
    assert got == ref
    assert outs[1].spec_proposed == 0 and outs[4].spec_proposed == 0
    assert sum(o.spec_proposed for o in outs) > 0


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_small_budget_chunked_prefill_and_late_lengths(tiny, reference, spec):
    """A 24-token budget with 7-token chunks cuts drafts short and mixes verification with prompt chunks;
    per-request max_tokens end speculation exactly at the limit."""
    prompts, ref = reference
    lens = [N_NEW, 5, 17, N_NEW, 1]
    llm = LLM(tiny, cfg(spec, num_spec_tokens=6, max_num_batched_tokens=24, prefill_chunk=7))
    got, _ = run(llm, prompts, lens)
    assert got == [r[:n] for r, n in zip(ref, lens, strict=True)]


@pytest.mark.parametrize("spec", ["ngram", "lookahead", "draft"])
def test_preemption_with_speculation(tiny, reference, spec):
    prompts, ref = reference
    llm = LLM(tiny, cfg(spec, num_spec_tokens=4, num_kv_blocks=14, block_size=16))
    got, _ = run(llm, prompts, N_NEW)
    assert llm.core.scheduler.num_preemptions > 0
    assert got == ref
    assert llm.core.blocks.num_free == llm.core.blocks.num_usable


def test_stop_inside_accepted_drafts(tiny, reference):
    """A stop id accepted in the middle of a draft chain ends the request there, as it does without drafts."""
    prompts, ref = reference
    stop = ref[3][20]  # a token the 4th request emits, possibly while drafts are accepted
    plain, _ = run(LLM(tiny, cfg()), prompts, N_NEW, stop_ids=[stop])
    got, outs = run(LLM(tiny, cfg("ngram", num_spec_tokens=8)), prompts, N_NEW, stop_ids=[stop])
    assert got == plain
    assert got[3][-1] == stop and outs[3].finish_reason == "stop"


def test_abort_releases_draft_blocks(tiny, reference):
    prompts, _ = reference
    llm = LLM(tiny, cfg("draft", num_spec_tokens=4))
    rid = llm.add_request(prompts[1], max_tokens=N_NEW)
    for _ in range(4):
        llm.step()
    prop = llm.core.spec.proposer
    assert prop.blocks.num_free < prop.blocks.num_usable
    llm.abort(rid)
    assert prop.blocks.num_free == prop.blocks.num_usable and not prop.state


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="^spec:"):
        EngineConfig(spec="eagle")
    with pytest.raises(ValueError, match="^num_spec_tokens:"):
        EngineConfig(spec="ngram", num_spec_tokens=0)
    with pytest.raises(ValueError, match="^draft_model: required"):
        EngineConfig(spec="draft")
    with pytest.raises(ValueError, match="^draft_model:"):
        EngineConfig.from_options({"spec": "medusa", "draft_model": ""})
    assert EngineConfig.from_options({"spec": "lookahead", "num_spec_tokens": 6}).num_spec_tokens == 6
