"""The engine core on a GPU (Triton backend, tuned/fixed GEMVs, CUDA graphs) == the reference loop, and the Triton
paged prefill kernel == the torch backend at awkward sizes, under its default and the sweep's launch configs. Needs a
CUDA GPU."""

from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.generator import Generator
from engine.kernels.reference import _attend, _window_mask
from engine.kernels.reference_paged import gather_paged
from engine.presets import synthetic

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


PREFILL_CASES = [
    (8, 2, 128, 16, [(5, 37), (97, 97), (1, 20), (64, 1025)], 0, torch.bfloat16),
    (4, 4, 59, 8, [(13, 13), (7, 300)], 0, torch.float16),
    (12, 4, 111, 32, [(33, 200), (100, 100)], 50, torch.bfloat16),
    (6, 2, 64, 16, [(17, 130), (2, 2)], 7, torch.float32),
    # GQA 4:1 d128 (the Llama layout): a long chunk over a long prefix, fresh, a window, speculative rows
    (8, 2, 128, 16, [(300, 2100), (1, 1), (257, 257), (4, 999)], 0, torch.bfloat16),
    (8, 2, 128, 16, [(200, 1500), (3, 64), (129, 129)], 100, torch.bfloat16),
    (16, 2, 96, 16, [(1, 700)] * 5 + [(6, 70)], 0, torch.float16),  # 8:1, d96, many one-query sequences
]
# launch configs of benchmarks/bench_attention.py's sweep (BLOCK_M, BLOCK_N, warps, stages[, maxnreg]), on the 16-bit
# GQA cases (the others run the default config only)
PREFILL_CONFIGS = [(128, 64, 8, 2), (128, 128, 8, 5), (128, 32, 8, 7, 128), (64, 64, 4, 5), (256, 32, 16, 5)]
PREFILL_PARAMS = [(*c, None) for c in PREFILL_CASES] + [(*PREFILL_CASES[i], cfg) for i in (0, 4, 5, 6)
                                                          for cfg in PREFILL_CONFIGS]  # fmt: skip


@pytest.mark.parametrize("h,hkv,d,page,specs,window,dtype,config", PREFILL_PARAMS)
def test_paged_prefill_kernel_matches_reference(h, hkv, d, page, specs, window, dtype, config):
    import triton

    from engine.kernels.triton.paged_prefill import paged_prefill_attention

    if config is not None:
        config = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg"), config, strict=False))

    g = torch.Generator(device="cuda").manual_seed(0)
    nb = sum(math.ceil(n / page) for _, n in specs) + 5
    kc = torch.randn(nb, hkv, page, d, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn(nb, hkv, page, d, device="cuda", dtype=dtype, generator=g)
    perm = (torch.randperm(nb - 1) + 1).tolist()
    qs, lens, tables, off = [0], [], [], 0
    width = max(math.ceil(n / page) for _, n in specs)
    for ql, n in specs:
        k = math.ceil(n / page)
        tables.append(perm[off : off + k] + [0] * (width - k))
        off += k
        qs.append(qs[-1] + ql)
        lens.append(n)
    q = torch.randn(qs[-1], h, d, device="cuda", dtype=dtype, generator=g)
    bt = torch.tensor(tables, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    try:
        paged_prefill_attention(q, kc, vc, bt, torch.tensor(qs, dtype=torch.int32, device="cuda"),
                                torch.tensor(lens, dtype=torch.int32, device="cuda"), d**-0.5, window, 0, len(specs),
                                max(ql for ql, _ in specs), out=out, config=config)  # fmt: skip
    except triton.runtime.errors.OutOfResources as e:
        if config is None:
            raise
        pytest.skip(f"{config} does not fit this GPU: {e}")
    for b, (ql, n) in enumerate(specs):
        s, e = qs[b], qs[b + 1]
        ks = gather_paged(kc, bt[b], n).repeat_interleave(h // hkv, 0).double()
        vs = gather_paged(vc, bt[b], n).repeat_interleave(h // hkv, 0).double()
        mask = _window_mask(ql, n, n - ql, True, window, "cuda")
        ref = _attend(q[s:e].transpose(0, 1).double(), ks, vs, d**-0.5, mask).transpose(0, 1)
        same = _attend(q[s:e].transpose(0, 1), ks.to(dtype), vs.to(dtype), d**-0.5, mask).transpose(0, 1)
        err = (out[s:e].double() - ref).abs().max().item()
        bound = max(2 * (same.double() - ref).abs().max().item(), 1e-5)
        assert err <= bound, (b, err, bound)


@pytest.mark.parametrize("preset", ["tiny-test", "tiny-test-mistral", "tiny-test-qwen2"])
@pytest.mark.parametrize("gemv,graphs", [("triton", True), ("tune", True), ("cublas", False)])
def test_core_on_gpu_equals_reference_loop(preset, gemv, graphs):
    lm = synthetic(preset, "float32", "cuda", seed=1)
    prompts = _prompts([5, 17, 1, 30, 64], lm.config.vocab_size, seed=3)
    ref = [Generator(lm, 1, 160).generate([p], 48)[0].tokens for p in prompts]
    llm = LLM(lm, EngineConfig(max_num_seqs=8, max_model_len=160, max_num_batched_tokens=64, prefill_chunk=23,
                               gemv=gemv, cuda_graphs=graphs))  # fmt: skip
    outs = llm.generate(prompts, max_tokens=48)
    assert [o.tokens for o in outs] == ref
    info = llm.info()
    assert info["attention_backend"] == "triton"
    assert (info.get("graphs") is not None) == graphs and info["graph_fallback"] in (None, "disabled")
    s = SamplingParams(temperature=0.8, top_k=50, seed=5)
    a = llm.generate(prompts[:2], [s, s], max_tokens=16)
    b = [llm.generate([p], [s], max_tokens=16)[0] for p in prompts[:2]]
    assert [x.tokens for x in a] == [x.tokens for x in b]


@pytest.mark.parametrize("preset", ["tiny-test", "tiny-test-mistral", "tiny-test-qwen2"])
@pytest.mark.parametrize("switches", [("ANVIL_QKV_ROPE",), ("ANVIL_DECODE_FUSED_MERGE",), ("ANVIL_PREFETCH_WO",),
                                      ("ANVIL_QKV_ROPE", "ANVIL_DECODE_FUSED_MERGE", "ANVIL_PREFETCH_WO"),
                                      ("ANVIL_DECODE_FUSED_MERGE", "ANVIL_DECODE_MIN_CHUNK=64", "ANVIL_DECODE_BLOCK_N=64"),
                                      ("ANVIL_DECODE_MIN_CHUNK=32", "ANVIL_DECODE_WARPS=8", "ANVIL_DECODE_BLOCK_N=32")])  # fmt: skip
def test_decode_fusion_switches_on_gpu_equal_reference_loop(preset, switches, monkeypatch):
    # ANVIL_QKV_ROPE=1: one-token decode steps rotate and write the cache inside the qkv GEMV; ANVIL_DECODE_FUSED_MERGE=1:
    # the split-KV kernel merges its own partials; ANVIL_PREFETCH_WO=1: batch-1 attention asks L2 for wo's weights;
    # ANVIL_DECODE_MIN_CHUNK / _WARPS / _BLOCK_N: the split kernel's fewest keys per split, warps, keys per tile
    # (prompts + outputs of 41-70 tokens: one split or two at 64). One request at a time (every decode step is a
    # one-token step), graphs on, fixed Triton GEMVs
    from engine.kernels.triton import gemv as gemv_mod

    for sw in switches:
        name, _, value = sw.partition("=")
        monkeypatch.setenv(name, value or "1")
    calls = []
    real = gemv_mod.linear_rope
    monkeypatch.setattr(gemv_mod, "linear_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm = synthetic(preset, "float32", "cuda", seed=1)
    prompts = _prompts([5, 17, 1, 30], lm.config.vocab_size, seed=3)
    ref = [Generator(lm, 1, 160).generate([p], 40)[0].tokens for p in prompts]
    llm = LLM(lm, EngineConfig(max_num_seqs=8, max_model_len=160, max_num_batched_tokens=64, gemv="triton"))
    info = llm.info()
    assert info["qkv_rope"] == ("ANVIL_QKV_ROPE" in switches) and info["graph_fallback"] is None
    assert info["decode_fused_merge"] == ("ANVIL_DECODE_FUSED_MERGE" in switches)
    assert info["prefetch_wo_max_batch"] == ("ANVIL_PREFETCH_WO" in switches)
    knobs = {k: int(v) for k, _, v in (sw.partition("=") for sw in switches) if v}
    assert info["decode"] == {"min_chunk": knobs.get("ANVIL_DECODE_MIN_CHUNK", 0),
                              "num_warps": knobs.get("ANVIL_DECODE_WARPS", 4),
                              "block_n": knobs.get("ANVIL_DECODE_BLOCK_N")}  # None: default_block_n  # fmt: skip
    assert bool(calls) == info["qkv_rope"], "the batch-1 graph's projection is not the one asked for"
    assert [llm.generate([p], max_tokens=40)[0].tokens for p in prompts] == ref
    assert [o.tokens for o in llm.generate(prompts, max_tokens=40)] == ref  # batched: the fused path at b1 only


def test_core_bf16_on_the_trained_tiny_model_equals_reference():
    import engine

    lm = engine.load(engine.hub.resolve("tiny"), dtype="bfloat16", device="cuda")
    tok = lm.tokenizer
    prompts = [tok.encode(s) for s in ("def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def ")]
    ref = [Generator(lm, 1, 256).generate([p], 64)[0].tokens for p in prompts]
    outs = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=256)).generate(prompts, max_tokens=64)
    agree = [sum(a == b for a, b in zip(o.tokens, r, strict=True)) for o, r in zip(outs, ref, strict=True)]
    # bf16: the Triton/cuBLAS sums and the torch reference may round differently; most tokens still agree
    assert all(x >= 32 for x in agree), agree


@pytest.mark.parametrize("preset", ["tiny-test", "tiny-test-mistral"])
@pytest.mark.parametrize("cap", [0, 64])
def test_mixed_steps_replayed_as_graph_rows_equal_reference_loop(preset, cap):
    # arrivals while others decode, prompts in chunks of 7: with graph_mixed_tokens = 64 every mixed step replays a
    # captured decode graph, one row per prompt token (engine/worker/graphs.py); 0 runs them eagerly
    lm = synthetic(preset, "float32", "cuda", seed=2)
    prompts = _prompts([5, 17, 1, 30, 9, 23], lm.config.vocab_size, seed=6)
    ref = [Generator(lm, 1, 160).generate([p], 32)[0].tokens for p in prompts]
    llm = LLM(lm, EngineConfig(max_num_seqs=8, max_model_len=160, max_num_batched_tokens=64, prefill_chunk=7,
                               graph_mixed_tokens=cap, gemv="cublas"))  # fmt: skip
    got: dict[str, list[int]] = {}
    order, pending, steps = [], list(prompts), 0
    while pending or llm.has_unfinished():
        if pending and steps % 3 == 0:
            order.append(llm.add_request(pending.pop(0), max_tokens=32))
            got[order[-1]] = []
        for o in llm.step():
            got[o.request_id] += o.new_token_ids
        steps += 1
    assert [got[r] for r in order] == ref
    st = llm.info()["steps"]
    assert (st["graph_mixed"] > 0) == (cap > 0) and (st["eager"] == 0) == (cap > 0), st


@pytest.mark.parametrize("fresh, pad", [("flash", 0), ("triton", 0), ("sdpa", 64), ("tma", 0)])
def test_fresh_attention_choices_on_gpu_equal_reference_loop(fresh, pad):
    # fresh prompts of one length (SDPA's case) through FlashAttention-2 only, through the paged Triton kernel, or
    # through SDPA's default (cuDNN) padded to 64-row buckets (warmed at start-up up to 256 tokens)
    lm = synthetic("tiny-test", "float16", "cuda", seed=1)
    prompts = _prompts([40, 40, 40], lm.config.vocab_size, seed=4) + _prompts([13], lm.config.vocab_size, seed=5)
    base = dict(max_num_seqs=8, max_model_len=160, max_num_batched_tokens=256)
    ref_cfg = EngineConfig(**base, attention_backend="torch", cuda_graphs=False)  # torch's backend: no graphs
    ref = [o.tokens for o in LLM(lm, ref_cfg).generate(prompts, max_tokens=24)]
    llm = LLM(lm, EngineConfig(**base, fresh_attention=fresh, fresh_pad=pad))
    assert llm.info()["fresh_attention"] == fresh and llm.info()["fresh_pad"] == pad
    got = [o.tokens for o in llm.generate(prompts, max_tokens=24)]
    same = sum(g[:8] == r[:8] for g, r in zip(got, ref, strict=True))  # fp16: allow late near-tie flips only
    assert same == len(prompts), (got, ref)
