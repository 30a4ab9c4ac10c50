"""The padded verify path of engine/worker/verify_graphs.py on the CPU (capture=False: the static buffers the CUDA
graphs replay, run eagerly with the torch backend, float32): its logits equal the eager verify forward's on a batch
of awkward sizes (0, 1 and k drafts, contexts off block boundaries, pad rows past max_model_len, padding sequences
in the bucket, stale block-table columns from an earlier step); greedy speculation through it equals plain greedy;
steps with prompt chunks, batches above the largest bucket and Medusa (hidden states) take the eager path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine
from engine import LLM, EngineConfig
from engine.core.scheduler import SchedulerOutput
from engine.request import Request
from engine.worker.verify_graphs import VerifyGraphs
from tests.engine.spec._helpers import code_prompts, run

REPO = Path(__file__).resolve().parents[3]
MAX_LEN = 96
LENS = [7, 90, 33, 150, 3]
N_NEW = 32
E2E_LEN = 176  # the 150-token prompt stops at the context limit: pad rows pass max_model_len there


@pytest.fixture(scope="module")
def tiny():
    if not (REPO / "models" / "tiny" / "config.json").is_file():
        pytest.skip("models/tiny is not in this checkout")
    return engine.load("tiny")


def cfg(spec="none", **kw) -> EngineConfig:
    extra = {"draft": {"draft_model": "tiny-draft"}, "medusa": {"draft_model": str(REPO / "models" / "tiny")}}
    return EngineConfig(**{"max_num_seqs": 8, "max_model_len": E2E_LEN, "max_num_batched_tokens": 512,
                           "spec": spec, **extra.get(spec, {}), **kw})  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny):
    prompts = code_prompts(tiny.tokenizer, LENS)
    return prompts, [o.tokens for o in LLM(tiny, cfg()).generate(prompts, max_tokens=N_NEW)]


def _verify_batch(llm: LLM, k: int, specs: list[tuple[int, int]]) -> SchedulerOutput:
    """Requests of (prompt length, drafts) with every prompt token but the last in the cache (one eager forward
    each), scheduled as one verify step: its last token plus its drafts (random ids) per request."""
    core, runner = llm.core, llm.core.runner
    g = torch.Generator().manual_seed(k)
    vocab = runner.mc.vocab_size
    reqs, num_new = [], []
    for n_prompt, s in specs:
        r = Request(torch.randint(vocab, (n_prompt,), generator=g).tolist(), max_tokens=64)
        c0 = n_prompt - 1
        assert core.blocks.allocate(r, c0 + 1 + s)
        if c0:
            runner.execute_verify(SchedulerOutput([r], [c0]))
        r.num_computed_tokens = c0
        r.spec_tokens = torch.randint(vocab, (s,), generator=g).tolist()
        reqs.append(r)
        num_new.append(1 + s)
    return SchedulerOutput(reqs, num_new)


@pytest.mark.parametrize(("k", "max_len", "tol"), [(3, MAX_LEN, 4e-5), (5, MAX_LEN, 4e-5), (5, 2048, 4e-5)])
def test_padded_verify_logits_equal_eager(tiny, k, max_len, tol):
    """Decodes first (execute_verify's order): a mid-block decode, a decode at position max_model_len - 1 (pad
    rows at max_model_len .. + k - 1), then 1 draft with pad rows past the request's last block (scratch), k
    drafts, 2 drafts near the end, a 1-token prompt with drafts; 6 requests in the bucket of 8. max_len 2048 is
    tiny's max_position_embeddings: the pad rows need rope positions past the table the model was loaded with.
    tol: float32 rounding of different matmul shapes only (|logits| ~ 20, an ulp 2e-6; the eager forward of one of
    these requests alone differs from it in this batch by up to 9.5e-6; over 2048 keys padded vs eager reaches
    1.2e-5; on an AVX-512 machine the matmuls round otherwise: 1.7e-5 at k=3 over 96 keys, so 4e-5 = 20 ulp, where
    a wrong row is off by O(1)). The eager forward after the padded steps must repeat the first one exactly."""
    llm = LLM(tiny, EngineConfig(max_num_seqs=8, max_model_len=max_len, max_num_batched_tokens=max_len))
    runner = llm.core.runner
    specs = [(21, 0), (max_len, 0), (46, 1), (60, k), (max_len - 6, 2), (1, k - 1)]
    sched = _verify_batch(llm, k, specs)
    vg = VerifyGraphs(runner, k, [1, 2, 8], capture=False)
    assert vg.fits(sched) and vg.bucket(len(specs)) == 8
    eager, sampled, hidden = runner.execute_verify(sched)
    assert eager.shape[0] == sum(1 + s for _, s in specs) and hidden is None
    padded, p_sampled, p_hidden = vg.run(sched)
    assert p_sampled == sampled and p_hidden is None
    assert padded.shape == eager.shape
    assert (padded - eager).abs().max().item() <= tol

    # a later step of requests 0 and 2 only: row 1 held request 1's 6-column table, and request 2's pad rows now
    # reach column 3, past its own blocks and past every table of the step: it must be zeroed (scratch), not
    # left pointing at request 1's block 3
    out, got, _ = vg.run(SchedulerOutput([sched.requests[0], sched.requests[2]], [1, 2]))
    assert got == [sched.requests[0], sched.requests[2]]
    assert (out - eager[[0, 2, 3]]).abs().max().item() <= tol
    again, _, _ = runner.execute_verify(sched)  # every request's cached prefix is intact
    assert torch.equal(again, eager)


def test_fits_only_draft_verification(tiny):
    llm = LLM(tiny, EngineConfig(max_num_seqs=8, max_model_len=MAX_LEN, max_num_batched_tokens=256))
    vg = VerifyGraphs(llm.core.runner, 3, [1, 2], capture=False)
    sched = _verify_batch(llm, 3, [(9, 1), (30, 3)])
    assert vg.fits(sched)
    r = sched.requests[0]
    assert not vg.fits(SchedulerOutput(sched.requests, [1, 4]))  # a request computing less than it drafted
    r.num_computed_tokens -= 2  # its last 3 tokens as a chunk: not only the last token
    assert not vg.fits(SchedulerOutput(sched.requests, [4, 4]))
    r.num_computed_tokens += 2
    three = _verify_batch(llm, 3, [(5, 0)])
    assert not vg.fits(SchedulerOutput(sched.requests + three.requests, sched.num_new + three.num_new))  # > bucket
    r.spec_tokens = r.spec_tokens * 4  # 4 drafts > k
    assert not vg.fits(SchedulerOutput(sched.requests, [1 + len(r.spec_tokens), 4]))


def _padded(llm: LLM, buckets=(1, 2, 4, 8)) -> dict:
    """Give the CPU engine's speculative step the padded verify path (no capture) and return its counters."""
    spec = llm.core.spec
    assert llm.info()["spec"]["verify_graphs"] is None  # never built on the CPU
    spec.verify_graphs = VerifyGraphs(llm.core.runner, spec.k, list(buckets), capture=False)
    return spec.paths


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_greedy_speculation_through_padded_verify_equals_plain(tiny, reference, spec):
    prompts, ref = reference
    llm = LLM(tiny, cfg(spec, num_spec_tokens=4))
    paths = _padded(llm)
    got, _ = run(llm, prompts, N_NEW)
    assert got == ref
    assert paths["graphed_verify_steps"] > 0 and paths["eager_verify_steps"] == 0
    info = llm.info()["spec"]
    assert info["verify_graphs"] == [1, 2, 4, 8] and info["graphed_verify_steps"] == paths["graphed_verify_steps"]
    assert llm.core.blocks.num_free == llm.core.blocks.num_usable


def test_prompt_chunks_and_large_batches_verify_eagerly(tiny, reference):
    """A 24-token budget mixes verification with 7-token prompt chunks (eager); buckets up to 2 leave a batch of
    5 eager until 2 requests remain."""
    prompts, ref = reference
    llm = LLM(tiny, cfg("ngram", num_spec_tokens=6, max_num_batched_tokens=24, prefill_chunk=7))
    paths = _padded(llm)
    got, _ = run(llm, prompts, N_NEW)
    assert got == ref
    assert paths["eager_verify_steps"] > 0 and paths["graphed_verify_steps"] > 0

    llm = LLM(tiny, cfg("ngram", num_spec_tokens=4))
    paths = _padded(llm, buckets=(1, 2))
    seen = []
    spec = llm.core.spec
    fits = spec.verify_graphs.fits
    spec.verify_graphs.fits = lambda s: seen.append(len(s.requests)) or fits(s)
    got, _ = run(llm, prompts, N_NEW)
    assert got == ref
    assert paths["eager_verify_steps"] > 0 and paths["graphed_verify_steps"] > 0
    assert max(seen) > 2


def test_medusa_keeps_the_eager_path(tiny, reference):
    prompts, ref = reference
    llm = LLM(tiny, cfg("medusa", num_spec_tokens=3))
    assert llm.info()["spec"]["verify_graph_fallback"] == "the proposer needs hidden states"
    paths = _padded(llm)  # even when handed verify graphs, a proposer that needs hidden states verifies eagerly
    got, _ = run(llm, prompts, N_NEW)
    assert got == ref
    assert paths["graphed_verify_steps"] == 0 and paths["eager_verify_steps"] > 0
