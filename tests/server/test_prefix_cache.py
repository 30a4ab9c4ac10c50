"""Session KV reuse and automatic prefix caching (enable_prefix_caching) in the core (engine/core/prefix_cache.py, BlockManager, the scheduler's admission): a second turn
computes fewer tokens and gives exactly the tokens it gives without the cache; idle cached blocks are evicted least
recently used under a small pool; logprobs of sampled tokens equal the reference logits'."""

from __future__ import annotations

import torch

from engine import LLM, EngineConfig
from engine.presets import synthetic
from engine.request import Request
from tests.engine.conftest import random_prompts


def cfg(**kw) -> EngineConfig:
    return EngineConfig(**{"max_num_seqs": 8, "max_model_len": 256, "max_num_batched_tokens": 64, **kw})


def run(llm: LLM, prompt: list[int], max_tokens: int, session: str | None = None, **kw) -> tuple[Request, list[int]]:
    req = Request(list(prompt), max_tokens=max_tokens, session_id=session, **kw)
    llm.core.add_request(req)
    out: list[int] = []
    before = llm.core.stats["tokens"]
    while llm.has_unfinished():
        for o in llm.step():
            out += o.new_token_ids
    req.computed_here = llm.core.stats["tokens"] - before
    return req, out


def solo(model, prompt: list[int], max_tokens: int) -> list[int]:
    return run(LLM(model, cfg()), prompt, max_tokens)[1]


def test_second_turn_reuses_the_session_prefix_and_gives_the_same_tokens():
    model = synthetic("tiny-test", seed=7)
    p1, extra = random_prompts([40, 10], model.config.vocab_size, seed=3)
    llm = LLM(model, cfg())
    r1, out1 = run(llm, p1, 20, session="s")
    assert r1.num_cached_tokens == 0
    cache = llm.core.blocks.cache
    # turn 1 computed 40 + 19 tokens (the last one is never fed): 3 full blocks of 16 stay cached, idle
    assert len(cache.idle) == 3 and llm.core.blocks.num_free == llm.core.blocks.num_usable
    p2 = p1 + out1 + extra  # 70 tokens: the chat history and a new user turn
    r2, out2 = run(llm, p2, 20, session="s")
    assert r2.num_cached_tokens == 48
    assert r2.computed_here == (70 - 48) + 19  # only the uncached prompt tail, then decode
    assert cache.hit_tokens == 48 and cache.query_tokens == 40 + 70
    assert out2 == solo(model, p2, 20)
    assert llm.core.blocks.num_free == llm.core.blocks.num_usable


def test_a_prompt_inside_the_cache_still_computes_its_last_token():
    model = synthetic("tiny-test", seed=7)
    (p,) = random_prompts([33], model.config.vocab_size, seed=4)
    llm = LLM(model, cfg())
    run(llm, p, 16, session="s")  # caches 3 blocks (33 + 15 = 48 computed)
    again = p + solo(model, p, 16)[:15]  # exactly the 48 cached tokens
    r, out = run(llm, again, 5, session="s")
    assert r.num_cached_tokens == 32  # the third block holds the last prompt token: it is computed again
    assert out == solo(model, again, 5)


def test_requests_without_a_session_neither_cache_nor_reuse():
    model = synthetic("tiny-test", seed=7)
    (p,) = random_prompts([40], model.config.vocab_size, seed=3)
    llm = LLM(model, cfg())
    run(llm, p, 20)
    assert len(llm.core.blocks.cache) == 0
    r, _ = run(llm, p, 4, session="s")
    assert r.num_cached_tokens == 0


def test_automatic_prefix_caching_reuses_any_finished_request_and_gives_the_same_tokens():
    model = synthetic("tiny-test", seed=7)
    p, tail = random_prompts([40, 9], model.config.vocab_size, seed=3)
    llm = LLM(model, cfg(enable_prefix_caching=True))
    r1, out1 = run(llm, p, 20)  # no session: cached anyway (40 + 19 computed = 3 full blocks)
    assert r1.num_cached_tokens == 0 and len(llm.core.blocks.cache.idle) == 3
    r2, out2 = run(llm, p, 20)  # the same prompt: 2 blocks (32 tokens); the third holds its last token
    assert r2.num_cached_tokens == 32 and r2.computed_here == (40 - 32) + 19
    assert out2 == out1 == solo(model, p, 20)
    r3, out3 = run(llm, p + tail, 12)  # the same first 40 tokens, another continuation: the first 2 blocks match
    assert r3.num_cached_tokens == 32 and out3 == solo(model, p + tail, 12)
    r4, out4 = run(llm, p + out1 + tail, 12)  # the first turn's prompt + output, then more: all 3 of its blocks
    assert r4.num_cached_tokens == 48 and out4 == solo(model, p + out1 + tail, 12)
    assert llm.core.blocks.cache.hit_tokens == 32 + 32 + 48


def test_automatic_prefix_caching_is_off_by_default_and_on_for_bench_serve():
    from harness.serve_cmd import parse_options

    assert EngineConfig().enable_prefix_caching is False
    assert EngineConfig.from_options(parse_options([])).enable_prefix_caching is True
    assert parse_options(["enable_prefix_caching=false"])["enable_prefix_caching"] is False


def test_eviction_is_least_recently_used_under_a_small_pool():
    model = synthetic("tiny-test", seed=7)
    pa, pb, pc = random_prompts([60, 60, 120], model.config.vocab_size, seed=9)
    llm = LLM(model, cfg(num_kv_blocks=13))  # 12 usable blocks of 16 tokens
    blocks = llm.core.blocks
    _, oa = run(llm, pa, 10, session="a")  # 69 computed: 4 blocks cached
    _, ob = run(llm, pb, 10, session="b")  # 4 more; 8 idle, 4 plain free
    assert len(blocks.cache.idle) == 8
    run(llm, pc, 10)  # 129 tokens: 9 blocks = the 4 free + 5 evicted: all of a's, then b's last
    assert blocks.cache.evictions == 5
    ra, out_a = run(llm, pa + oa, 6, session="a")
    rb, out_b = run(llm, pb + ob, 6, session="b")
    assert ra.num_cached_tokens == 0 and rb.num_cached_tokens == 48
    assert out_a == solo(model, pa + oa, 6) and out_b == solo(model, pb + ob, 6)
    assert blocks.num_free == blocks.num_usable


def test_logprobs_of_sampled_tokens_equal_the_reference_logits():
    model = synthetic("tiny-test", seed=7)
    (p,) = random_prompts([12], model.config.vocab_size, seed=2)
    llm = LLM(model, cfg())
    req = Request(list(p), max_tokens=6, logprobs=3)
    llm.core.add_request(req)
    got = []
    while llm.has_unfinished():
        for o in llm.step():
            assert o.logprobs is not None and len(o.logprobs) == len(o.new_token_ids)
            got += list(zip(o.new_token_ids, o.logprobs, strict=True))
    assert len(got) == 6
    toks = [t for t, _ in got]
    ref = torch.log_softmax(llm.logits(p + toks[:-1]), dim=-1)[len(p) - 1 :]  # [6, V]
    for i, (t, lp) in enumerate(got):
        top = ref[i].topk(3)
        assert [tid for tid, _ in lp.top] == top.indices.tolist()
        assert torch.allclose(torch.tensor([v for _, v in lp.top]), top.values, atol=1e-4)
        assert lp.top[0][0] == t and abs(lp.logprob - ref[i, t].item()) < 1e-4  # greedy: the most likely


def test_logprobs_zero_gives_the_token_logprob_only_and_sampling_is_unchanged():
    from engine.request import SamplingParams

    model = synthetic("tiny-test", seed=7)
    (p,) = random_prompts([12], model.config.vocab_size, seed=2)
    s = SamplingParams(temperature=0.9, seed=5)
    plain = run(LLM(model, cfg()), p, 8, sampling=s)[1]
    llm = LLM(model, cfg())
    req = Request(list(p), s, 8, logprobs=0)
    llm.core.add_request(req)
    toks, lps = [], []
    while llm.has_unfinished():
        for o in llm.step():
            toks += o.new_token_ids
            lps += o.logprobs
    assert toks == plain and all(lp.top == [] and lp.logprob <= 0 for lp in lps)


def test_serving_cells_record_the_anvil_servers_prefix_cache_hits(tiny):
    # the serving scenario reads /metrics before and after a cell: a second cell with the same seed resends the same
    # prompts, and with automatic prefix caching the server takes their full blocks from its cache
    from harness.scenarios.serving import run_serving
    from tests.server.helpers import LiveServer

    params = {"num_requests": 4, "warmup_requests": 0, "concurrency": 2, "prompt_len": 40, "output_len": 3,
              "prompt_format": "ids", "model_name": "tiny"}  # fmt: skip
    with LiveServer(tiny, cfg(enable_prefix_caching=True)) as s:
        p = {**params, "base_url": s.base}
        first = run_serving(p, vocab_size=tiny.config.vocab_size)["metrics"]
        s.wait_idle()
        second = run_serving(p, vocab_size=tiny.config.vocab_size)["metrics"]
    assert first["failed"] == second["failed"] == 0
    assert first["server_prefix_cache_queries"] == second["server_prefix_cache_queries"] == 4 * 40
    assert first["server_prefix_cache_hits"] == 0
    assert second["server_prefix_cache_hits"] == 4 * 32  # 2 full blocks of each 40-token prompt
    assert second["server_prefix_cache_hit_rate"] == 0.8
