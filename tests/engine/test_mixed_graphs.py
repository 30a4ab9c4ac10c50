"""Mixed prefill + decode steps through the decode graphs' static buffers (EngineConfig.graph_mixed_tokens): every
prompt token of the step becomes a one-query row at its own position over the paged cache. On the CPU the graphs
run uncaptured (capture=False: the same buffers, eagerly, with the torch backend), and the tokens must be the
reference loop's for llama, mistral (sliding window) and qwen2 shapes, with arrivals while others decode, chunks
of awkward sizes, preemption and prefix-cache hits."""

from __future__ import annotations

import pytest

from engine import LLM, EngineConfig
from engine.worker.graphs import DecodeGraphs
from tests.engine import test_core

N_NEW = test_core.N_NEW
model, reference = test_core.model, test_core.reference  # fixtures: three model shapes, their reference tokens


def _llm(model, **kw) -> LLM:
    cfg = {"max_num_seqs": 8, "max_model_len": 128, "max_num_batched_tokens": 64, "prefill_chunk": 7, **kw}
    llm = LLM(model, EngineConfig(**cfg))
    r = llm.core.runner
    r.graphs = DecodeGraphs(r, [1, 2, 4, 8, 16, 32], capture=False)  # what CUDA captures, run eagerly
    return llm


def _staggered(llm: LLM, prompts: list[list[int]], every: int = 3) -> list[list[int]]:
    """A new request every `every` steps while the earlier ones decode; tokens per request in arrival order."""
    got: dict[str, list[int]] = {}
    order, pending, steps = [], list(prompts), 0
    while pending or llm.has_unfinished():
        if pending and steps % every == 0:
            rid = llm.add_request(pending.pop(0), max_tokens=N_NEW)
            got[rid] = []
            order.append(rid)
        for o in llm.step():
            got[o.request_id] += o.new_token_ids
        steps += 1
    return [got[r] for r in order]


@pytest.mark.parametrize("cap", [0, 7, 64])
def test_mixed_steps_as_graph_rows_equal_reference(model, reference, cap):
    prompts, ref = reference
    llm = _llm(model, graph_mixed_tokens=cap)
    assert _staggered(llm, prompts) == ref
    steps = llm.info()["steps"]
    assert steps["graph"] > 0 and steps["eager"] + steps["graph_mixed"] > 0, steps
    if cap == 0:
        assert steps["graph_mixed"] == 0, steps
    else:  # chunks of <= 7 tokens beside the decodes: every mixed step of the largest cap fits a bucket
        assert steps["graph_mixed"] > 0, steps
    if cap == 64:
        assert steps["eager"] == 0, steps


def test_mixed_graph_rows_under_preemption_and_prefix_hits(model, reference):
    prompts, ref = reference
    # 10 blocks of 16 tokens: the five requests cannot all hold their KV (preemption, then recompute as a chunk of
    # prompt + output tokens); the second pass finds the first pass's blocks in the prefix cache
    llm = _llm(model, num_kv_blocks=10, enable_prefix_caching=True, prefill_chunk=None, graph_mixed_tokens=32)
    assert _staggered(llm, prompts, every=2) == ref
    assert _staggered(llm, prompts, every=1) == ref
    assert llm.info()["steps"]["graph_mixed"] > 0
    assert llm.core.scheduler.stats()["preemptions"] > 0


def test_graph_mixed_tokens_validation():
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match=f"^graph_mixed_tokens: expected an int >= 0 \\(0: never\\), got {bad!r}"):
            EngineConfig(graph_mixed_tokens=bad)


def test_seeded_sampling_through_graph_rows_equals_eager_mixed_steps(model, reference):
    # each request samples with its own seeded generator: the rows path hands sample() the same logits rows in the
    # same order as the eager forward (only the sampling requests' last prompt rows and decode rows)
    from engine import SamplingParams

    prompts, _ = reference
    runs = []
    for cap in (0, 64):
        llm = _llm(model, graph_mixed_tokens=cap)
        got: dict[str, list[int]] = {}
        order, pending, steps = [], list(enumerate(prompts)), 0
        while pending or llm.has_unfinished():
            if pending and steps % 3 == 0:
                i, p = pending.pop(0)
                sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=100 + i)
                order.append(llm.add_request(p, sp, max_tokens=16))
                got[order[-1]] = []
            for o in llm.step():
                got[o.request_id] += o.new_token_ids
            steps += 1
        runs.append([got[r] for r in order])
        assert (llm.info()["steps"]["graph_mixed"] > 0) == (cap > 0)
    assert runs[0] == runs[1] and all(len(t) == 16 for t in runs[0])
