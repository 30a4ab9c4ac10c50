"""Verify graphs on CUDA (float32, Triton backend): the replayed padded verify forward equals the eager verify
forward (logits within 1e-4, identical argmax; 5.8e-6 / 6.7e-6 seen on the H200), stale block-table columns of an
earlier step do not leak, the eager path is unchanged after replays, and greedy speculation through the graphs
equals plain greedy token for token (ngram and draft, the draft's proposal steps replayed from its own graphs)."""

from __future__ import annotations

import gc

import pytest
import torch

import engine
from engine import LLM, EngineConfig
from engine.core.scheduler import SchedulerOutput
from tests.engine.spec._helpers import code_prompts, run
from tests.engine.spec.test_verify_graphs import REPO, _verify_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _collect():
    """Free earlier tests' engines now: a garbage collection inside a later capture invalidates it (runners sit in
    reference cycles), seen on the H200 as cudaErrorStreamCaptureInvalidated."""
    gc.collect()
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def tiny_cuda():
    if not (REPO / "models" / "tiny" / "config.json").is_file():
        pytest.skip("models/tiny is not in this checkout")
    return engine.load("tiny", "float32", "cuda")


@pytest.mark.parametrize(("k", "max_len"), [(3, 96), (5, 2048)])
def test_verify_graphs_match_eager_verify(tiny_cuda, k, max_len):
    llm = LLM(tiny_cuda, EngineConfig(max_num_seqs=8, max_model_len=max_len, max_num_batched_tokens=max_len,
                                      spec="ngram", num_spec_tokens=k))  # fmt: skip
    info = llm.info()["spec"]
    assert info["verify_graphs"] == [1, 2, 4, 8] and info["verify_graph_fallback"] is None
    vg, runner = llm.core.spec.verify_graphs, llm.core.runner
    sched = _verify_batch(llm, k, [(21, 0), (max_len, 0), (46, 1), (60, k), (max_len - 6, 2), (1, k - 1)])
    assert vg.fits(sched) and vg.graphs.has(8)
    eager, sampled, _ = runner.execute_verify(sched)
    graphed, got, hidden = vg.run(sched)
    assert got == sampled and hidden is None
    assert (graphed - eager).abs().max().item() <= 1e-4
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))
    out, _, _ = vg.run(SchedulerOutput([sched.requests[0], sched.requests[2]], [1, 2]))  # stale table columns
    assert (out - eager[[0, 2, 3]]).abs().max().item() <= 1e-4
    again, _, _ = runner.execute_verify(sched)  # no cached prefix was overwritten by pad rows
    assert torch.equal(again, eager)


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_greedy_speculation_with_verify_graphs(tiny_cuda, spec):
    prompts = code_prompts(tiny_cuda.tokenizer, [7, 90, 33, 150, 3])
    base = dict(max_num_seqs=8, max_model_len=176, max_num_batched_tokens=512)
    ref = [o.tokens for o in LLM(tiny_cuda, EngineConfig(**base)).generate(prompts, max_tokens=48)]
    extra = {"draft_model": "tiny-draft"} if spec == "draft" else {}
    llm = LLM(tiny_cuda, EngineConfig(**base, spec=spec, num_spec_tokens=4, **extra))
    got, _ = run(llm, prompts, 48)
    assert llm.info()["spec"]["graphed_verify_steps"] > 0
    if spec == "draft":  # the draft's one-token proposal steps replay its own decode graphs
        p = llm.core.spec.proposer
        assert p.runner.graphs is not None and p.graph_steps > 0
    assert got == ref
