"""The generation core (LLM / EngineCore.step) against the plain reference loop (engine/generator.py), on the CPU:
greedy parity one at a time and batched, chunked prefill, late arrivals, forced preemption, per-request sampling,
abort, refusals."""

from __future__ import annotations

import pytest
import torch

import engine
from engine import LLM, EngineConfig, SamplingParams
from engine.generator import Generator
from engine.presets import synthetic
from tests.engine.conftest import random_prompts

N_NEW = 64
LENS = [5, 17, 1, 30, 9]


def cfg(**kw) -> EngineConfig:
    return EngineConfig(**{"max_num_seqs": 8, "max_model_len": 128, "max_num_batched_tokens": 64, **kw})


@pytest.fixture(scope="module", params=["tiny-test", "tiny-test-mistral", "tiny-test-qwen2"])
def model(request):
    return synthetic(request.param, seed=7)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy tokens of the reference loop, one prompt at a time."""
    prompts = random_prompts(LENS, model.config.vocab_size, seed=5)
    gen = Generator(model, 1, 128)
    return prompts, [gen.generate([p], N_NEW)[0].tokens for p in prompts]


def test_single_requests_equal_reference(model, reference):
    prompts, ref = reference
    llm = LLM(model, cfg())
    for p, r in zip(prompts, ref, strict=True):
        (out,) = llm.generate([p], max_tokens=N_NEW)
        assert out.tokens == r and out.finish_reason == "length"


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_mixed_batch_with_chunked_prefill_equals_reference(model, reference, chunk):
    prompts, ref = reference
    llm = LLM(model, cfg(prefill_chunk=chunk))
    outs = llm.generate(prompts, max_tokens=N_NEW)
    assert [o.tokens for o in outs] == ref
    assert all(len(o.token_times) == N_NEW for o in outs)


def test_requests_arriving_while_others_decode(model, reference):
    prompts, ref = reference
    llm = LLM(model, cfg(prefill_chunk=7))
    got: dict[str, list[int]] = {}
    order = []
    pending = list(enumerate(prompts))
    steps = 0
    while pending or llm.has_unfinished():
        if pending and steps % 5 == 0:  # a new request every 5 steps, while the earlier ones decode
            i, p = pending.pop(0)
            rid = llm.add_request(p, max_tokens=N_NEW)
            got[rid] = []
            order.append(rid)
        for o in llm.step():
            got[o.request_id] += o.new_token_ids
        steps += 1
    assert [got[r] for r in order] == ref


def test_preemption_by_a_small_pool_recomputes_identically(model, reference):
    prompts, ref = reference
    # 12 blocks of 16 tokens: 5 requests of up to 30 + 64 tokens cannot all hold their KV at once
    llm = LLM(model, cfg(num_kv_blocks=13, block_size=16))
    outs = llm.generate(prompts, max_tokens=N_NEW)
    assert llm.core.scheduler.num_preemptions > 0
    assert [o.tokens for o in outs] == ref
    assert llm.core.blocks.num_free == llm.core.blocks.num_usable  # every block back


def test_preemption_with_prefix_caching_recomputes_identically(model, reference):
    # APC on: a victim's computed blocks are named before they are freed; its readmission may start from them
    prompts, ref = reference
    llm = LLM(model, cfg(num_kv_blocks=13, block_size=16, enable_prefix_caching=True))
    outs = llm.generate(prompts, max_tokens=N_NEW)
    assert llm.core.scheduler.num_preemptions > 0
    assert [o.tokens for o in outs] == ref
    assert llm.core.blocks.num_free == llm.core.blocks.num_usable  # idle cached blocks count as free


def test_per_request_sampling_equals_each_run_alone(model):
    prompts = random_prompts([6, 11, 3, 20], model.config.vocab_size, seed=9)
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(),
              SamplingParams(temperature=1.0, top_k=5, seed=2), SamplingParams(temperature=0.7, top_p=0.9, seed=3)]
    llm = LLM(model, cfg())
    batch = llm.generate(prompts, params, max_tokens=24)
    alone = [llm.generate([p], [s], max_tokens=24)[0] for p, s in zip(prompts, params, strict=True)]
    assert [b.tokens for b in batch] == [a.tokens for a in alone]
    again = llm.generate(prompts, params, max_tokens=24)
    assert [b.tokens for b in batch] == [a.tokens for a in again]
    other = llm.generate([prompts[0]], [SamplingParams(temperature=0.8, seed=99)], max_tokens=24)[0]
    assert other.tokens != batch[0].tokens  # another seed, another draw (24 tokens at T=0.8)


def test_seeded_sampling_equals_reference_loop(model):
    p = random_prompts([13], model.config.vocab_size, seed=4)[0]
    s = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    ref = Generator(model, 1, 128).generate([p], 20, s)[0].tokens
    assert LLM(model, cfg()).generate([p], s, max_tokens=20)[0].tokens == ref


def test_abort_frees_blocks(model):
    llm = LLM(model, cfg())
    bm = llm.core.blocks
    a = llm.add_request([1, 2, 3] * 10, max_tokens=50)
    b = llm.add_request([4, 5] * 8, max_tokens=50)
    for _ in range(3):
        llm.step()
    held = bm.num_usable - bm.num_free
    assert held >= 3
    req_a = llm.core.requests[a]
    n_a = len(req_a.block_ids)
    out = llm.abort(a)
    assert out.finished and out.finish_reason == "abort"
    assert bm.num_usable - bm.num_free == held - n_a and req_a.block_ids == []
    assert llm.abort(a) is None
    while llm.has_unfinished():
        for o in llm.step():
            assert o.request_id == b
    assert bm.num_free == bm.num_usable


def test_stop_ids_and_max_tokens(model, reference):
    prompts, ref = reference
    stop = ref[0][10]
    cut = ref[0].index(stop) + 1
    llm = LLM(model, cfg())
    out = llm.generate([prompts[0], prompts[1]], max_tokens=[N_NEW, 7], stop_ids=[[stop], []])
    assert out[0].tokens == ref[0][:cut] and out[0].finish_reason == "stop"
    assert out[1].tokens == ref[1][:7] and out[1].finish_reason == "length"
    assert llm.core.blocks.num_free == llm.core.blocks.num_usable


def test_too_long_prompt_refused_rest_completes(model, reference):
    prompts, ref = reference
    llm = LLM(model, cfg(max_model_len=40))
    outs = llm.generate([prompts[0], [1] * 41, prompts[2]], max_tokens=8)
    assert outs[1].finish_reason == "error" and "max_model_len 40" in outs[1].error
    assert outs[0].tokens == ref[0][:8] and outs[2].tokens == ref[2][:8]
    small = LLM(model, cfg(num_kv_blocks=3, block_size=16))  # 2 usable blocks = 32 tokens
    (o,) = small.generate([[1] * 33], max_tokens=2)
    assert o.finish_reason == "error" and "KV pool (32 tokens)" in o.error
    v, before = model.config.vocab_size, len(llm.core.requests)
    for prompt, bad in (([v], v), ([5, -1, 7], -1), ([3, True], True), ([1.0], 1.0), ([2, 4, v + 9, 1], v + 9)):
        with pytest.raises(ValueError, match=rf"token id {bad!r} outside the vocabulary \[0, {v}\)"):
            llm.add_request(prompt)
    assert len(llm.core.requests) == before  # a refused prompt adds nothing
    with pytest.raises(ValueError, match="empty prompt"):
        llm.add_request([])


def test_context_limit_finishes_with_length(model):
    llm = LLM(model, cfg(max_model_len=20))
    (o,) = llm.generate([[3] * 15], max_tokens=50)
    assert o.finish_reason == "length" and len(o.tokens) == 5  # 15 + 5 = max_model_len


def test_logits_equal_reference(model, reference):
    prompts, _ = reference
    llm = LLM(model, cfg())
    ref = Generator(model, 1, 128).logits([prompts[3]])[0]
    assert (llm.logits(prompts[3]) - ref).abs().max().item() < 1e-5
    hs = llm.hidden_states(prompts[3])
    assert len(hs) == model.config.n_layers and hs[0].shape == (len(prompts[3]), model.config.dim)


def test_tiny_trained_model_greedy_equals_reference():
    lm = engine.load(engine.hub.resolve("tiny"))
    tok = lm.tokenizer
    prompts = [tok.encode(s) for s in ("def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def ")]
    ref = Generator(lm, 3, 256).generate(prompts, N_NEW)
    outs = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=256, prefill_chunk=7)).generate(prompts, max_tokens=N_NEW)
    assert [o.tokens for o in outs] == [r.tokens for r in ref]


def test_sampling_params_validation():
    for bad in (dict(temperature=float("nan")), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_k=-1), dict(top_p=float("nan"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_engine_config_validation_names_the_key():
    with pytest.raises(ValueError, match="^bogus: unknown engine option"):
        EngineConfig.from_options({"bogus": 1})
    with pytest.raises(ValueError, match="^block_size: must be a power of two"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="^max_num_seqs: expected a positive int, got '8'"):
        EngineConfig.from_options({"max_num_seqs": "8"})
    with pytest.raises(ValueError, match="^kv_fraction"):
        EngineConfig(kv_fraction=1.5)
    with pytest.raises(ValueError, match="^attention_backend"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="^fresh_attention: expected one of sdpa, flash, triton, tma, got 'cudnn'"):
        EngineConfig.from_options({"fresh_attention": "cudnn"})
    for bad in (-64, True, 6.5):
        with pytest.raises(ValueError, match=f"^fresh_pad: expected an int >= 0 \\(0: no padding\\), got {bad!r}"):
            EngineConfig.from_options({"fresh_pad": bad})
    with pytest.raises(ValueError, match="^enable_prefix_caching: expected true or false"):
        EngineConfig.from_options({"enable_prefix_caching": 1})
    assert EngineConfig.from_options({"graph_buckets": [4, 1, 4]}).graph_buckets == (1, 4)


def test_no_cuda_path_on_cpu_says_why(model):
    llm = LLM(model, cfg())
    info = llm.info()
    assert info["attention_backend"] == "torch" and info["graph_fallback"] == "not a CUDA device"
    assert torch.device(info["device"]).type == "cpu"


def test_two_llms_over_one_model_keep_their_own_kv_pools(model, reference):
    # each LLM binds its pool to the model's layers; one that runs after another re-attaches its own
    prompts, ref = reference
    a, b = LLM(model, cfg()), LLM(model, cfg(prefill_chunk=7))
    ra = a.add_request(prompts[3], max_tokens=N_NEW)
    got: list[int] = []
    for _ in range(10):  # a prefills and decodes a little, then b runs to completion over the same model object
        got += [t for o in a.step() if o.request_id == ra for t in o.new_token_ids]
    assert [o.tokens for o in b.generate(prompts, max_tokens=N_NEW)] == ref
    while a.has_unfinished():
        got += [t for o in a.step() if o.request_id == ra for t in o.new_token_ids]
    assert got == ref[3]
