"""The Triton attention backend's dispatch (fresh prompts -> SDPA, chunks over a cached prefix and sliding windows ->
the paged Triton kernel, decode -> split-KV, all in one step) runs on the CPU
under the Triton interpreter, in a subprocess (TRITON_INTERPRET must be set before the kernels are defined), and
gives the reference loop's greedy tokens."""

from __future__ import annotations

import textwrap

import pytest
import torch

from engine.testing import run_script

pytest.importorskip("triton", reason="the Triton interpreter needs the triton package")

SCRIPT = textwrap.dedent(
    """
    import torch
    from engine import LLM, EngineConfig
    from engine.generator import Generator
    from engine.presets import synthetic

    torch.manual_seed(0)
    for preset in ("tiny-test", "tiny-test-mistral"):
        lm = synthetic(preset, seed=3)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (45, 5, 17)]
        ref = [Generator(lm, 1, 96).generate([p], 6)[0].tokens for p in prompts]
        llm = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=96, max_num_batched_tokens=40, prefill_chunk=20,
                                   attention_backend="triton", fresh_attention="sdpa"))
        assert llm.info()["attention_backend"] == "triton"
        got = [o.tokens for o in llm.generate(prompts, max_tokens=6)]
        assert got == ref, (preset, got, ref)
    # fresh_attention="triton": fresh prompts through the paged kernel too (no SDPA call at all);
    # "sdpa": tiny-test has no sliding window, so its fresh prompts take one SDPA call
    import torch.nn.functional as F
    lm = synthetic("tiny-test", seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (45, 5, 17)]
    ref = [Generator(lm, 1, 96).generate([p], 6)[0].tokens for p in prompts]
    calls = []
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    lens = []
    F.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or lens.append(a[0].shape[2]) or real(*a, **k)
    for fresh, pad in (("triton", 0), ("sdpa", 0), ("sdpa", 16)):  # fresh_pad: 5 -> 16, 17 -> 32 rows
        llm = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=96, max_num_batched_tokens=40, prefill_chunk=20,
                                   attention_backend="triton", fresh_attention=fresh, fresh_pad=pad))
        assert llm.info()["fresh_attention"] == fresh and llm.info()["fresh_pad"] == pad
        calls.clear()
        lens.clear()
        got = [llm.generate([p], max_tokens=6)[0].tokens for p in prompts[1:]]  # one fresh prompt per step
        assert got == ref[1:], (fresh, pad, got, ref)
        assert bool(calls) == (fresh == "sdpa"), (fresh, len(calls))
        assert set(lens) == ({16, 32} if pad else {5, 17} if fresh == "sdpa" else set()), (fresh, pad, set(lens))
    # fresh_attention="tma": fresh prompt rows of any lengths in one launch of the TMA kernel (step 1 holds fresh chunks
    # of 20, 5 and 15 tokens in its 40-token budget); chunks over a cached prefix through the paged kernel, and so
    # are fresh prompts longer than mistral's 16-token window (shorter ones: the window masks nothing, TMA again);
    # greedy tokens equal the reference loop's either way
    short = [prompts[1], prompts[2][:15], prompts[0][:13]]  # 5, 15 and 13 tokens: within the window, one step
    for preset, windowed in (("tiny-test", False), ("tiny-test-mistral", True)):
        lm = synthetic(preset, seed=3)
        ref = [Generator(lm, 1, 96).generate([p], 6)[0].tokens for p in prompts + short]
        llm = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=96, max_num_batched_tokens=40, prefill_chunk=20,
                                   attention_backend="triton", fresh_attention="tma"))
        be = llm.core.runner.backend
        seen, real_tma = [], be._fresh_tma
        be._fresh_tma = lambda *a, **k: seen.append(a[5:8]) or real_tma(*a, **k)
        got = [o.tokens for o in llm.generate(prompts, max_tokens=6)]
        assert got == ref[:3], (preset, got, ref)
        assert llm.info()["fresh_tma_fallback"] == {}, llm.info()
        # (first sequence, sequences, longest) per layer of step 1; the window (16) is below its 20-token chunk
        assert seen[:2] == ([] if windowed else [(0, 3, 20)] * 2), seen
        seen.clear()
        got = [o.tokens for o in llm.generate(short, max_tokens=6)]
        assert got == ref[3:], (preset, got, ref)
        assert seen[:2] == [(0, 3, 15)] * 2, (preset, seen)  # all three fresh prompts in step 1
    print("OK")
    """
)


def test_padded_fresh_sdpa_equals_exact_length_call_on_random_inputs():
    # EngineConfig.fresh_pad: the zero rows after each prompt stay out of its real rows (causal masking); GQA 8:2,
    # two prompts of an awkward length, pads that do and do not divide it
    from engine.attention.base import AttentionLayerSpec
    from engine.attention.triton_backend import TritonBackend

    g = torch.Generator().manual_seed(7)
    spec = AttentionLayerSpec(n_heads=8, n_kv_heads=2, head_dim=16, scale=0.25, window=0)
    m, n = 2, 37
    q = torch.randn(m * n, 8, 16, generator=g)
    k, v = torch.randn(2, m * n, 2, 16, generator=g)
    ref = TritonBackend("sdpa")._sdpa_call(q, k, v, m, spec)
    for pad in (1, 16, 37, 64):
        got = TritonBackend("sdpa", fresh_pad=pad)._sdpa_call(q, k, v, m, spec)
        assert got.shape == (m, n, 8, 16)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the reference itself: prompt 1, last row = softmax over its own 37 keys (kv head 0 serves q heads 0..3)
    kk, vv = k.view(m, n, 2, 16)[1, :, 0], v.view(m, n, 2, 16)[1, :, 0]
    w = torch.softmax(q.view(m, n, 8, 16)[1, -1, 3] @ kk.T * 0.25, dim=-1)
    torch.testing.assert_close(ref[1, -1, 3], w @ vv, atol=1e-5, rtol=1e-5)
    # k / v as the backend passes them: strided row views of one wide [T, heads * D] buffer (v is a slice of qkv)
    wide = torch.randn(m * n, (8 + 2 + 2) * 16, generator=g)
    wide[:, 8 * 16 :] = torch.cat([k, v], dim=1).view(m * n, 4 * 16)
    ks, vs = wide[:, 8 * 16 : 10 * 16].view(m * n, 2, 16), wide[:, 10 * 16 :].view(m * n, 2, 16)
    assert not ks.is_contiguous() and not vs.is_contiguous()
    torch.testing.assert_close(TritonBackend("sdpa")._sdpa_call(q, ks, vs, m, spec), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="^fresh_pad: expected an int >= 0, got -1"):
        TritonBackend(fresh_pad=-1)


def test_triton_backend_dispatch_equals_reference_under_the_interpreter():
    run_script(SCRIPT, timeout=900)


KERNELS = textwrap.dedent(
    """
    import torch
    from engine.kernels.triton import fused, gemv
    from engine.kernels.triton.paged_attention import choose_num_splits

    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g)
    for n, k, cfg in ((100, 300, gemv.GemvConfig("fma", 16, 128, 4, 1)), (64, 256, gemv.GemvConfig("fma", 8, 64, 4, 1)),
                      (37, 96, gemv.GemvConfig("fma", 4, 64, 4, 1))):
        w, x, res, nw = r(n, k), r(1, k), r(1, n), r(k).abs() + 0.5
        # plain, residual epilogue, RMSNorm prologue, SwiGLU prologue: the double-buffered fma GEMV vs torch
        assert torch.allclose(gemv.linear(x, w, cfg=cfg), x @ w.T, atol=1e-4, rtol=1e-4)
        got = gemv.linear_fused(x, w, cfg, residual=res.clone())
        assert torch.allclose(got, x @ w.T + res, atol=1e-4, rtol=1e-4)
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * nw
        assert torch.allclose(gemv.linear_fused(x, w, cfg, norm_weight=nw, eps=1e-5), xn @ w.T, atol=1e-4, rtol=1e-4)
        x2 = r(1, 2 * k)
        act = torch.nn.functional.silu(x2[:, :k]) * x2[:, k:]
        assert torch.allclose(gemv.linear_fused(x2, w, cfg, act=True), act @ w.T, atol=1e-4, rtol=1e-4)
        xm = r(5, k)
        dot = gemv.linear(xm, w, cfg=gemv.GemvConfig("dot", 16, 64, 4, 2), residual=res.expand(5, n).contiguous())
        assert torch.allclose(dot, xm @ w.T + res, atol=1e-4, rtol=1e-4)
    for m, v in ((1, 5000), (3, 4096), (4, 9001)):
        x = r(m, v)
        x[-1, 3] = x[-1, 4099 % v] = x.max() + 1  # a tie across blocks: the first index wins, as in torch
        assert torch.equal(fused.argmax(x), x.argmax(-1))
        assert torch.equal(fused.argmax(x.bfloat16()), x.bfloat16().argmax(-1))
    splits = {choose_num_splits(b, 8, L) for b in range(1, 300) for L in (16, 100, 1000, 5000, 131072)}
    assert splits <= {1, 2, 4, 8, 16, 32}, splits
    print("OK")
    """
)


def test_gemv_and_argmax_kernels_equal_torch_under_the_interpreter():
    """The fma GEMV (double-buffered weight tiles, PDL off on the CPU) with each prologue / epilogue, the dot GEMV,
    and the two-stage argmax (ties across blocks) against torch at sizes that are not multiples of the tiles."""
    run_script(KERNELS, timeout=900)


QKV_ROPE = textwrap.dedent(
    """
    import torch
    from engine import LLM, EngineConfig
    from engine.generator import Generator
    from engine.kernels.triton import fused, gemv
    from engine.presets import synthetic
    from engine.worker import tuning

    # the kernel: bit for bit linear_fused + rope_write_kv, GQA, with and without bias / norm, positions across
    # pages and -1 (no cache write), every fma config that holds whole rotation pairs
    g = torch.Generator().manual_seed(0)
    for dt, h, hkv, d, k, bias, norm in ((torch.bfloat16, 4, 2, 64, 96, False, True),
                                         (torch.float32, 4, 1, 32, 200, True, False),
                                         (torch.bfloat16, 6, 2, 16, 130, True, True)):
        n = (h + 2 * hkv) * d
        w, x = (torch.randn(n, k, generator=g) * 0.1).to(dt), torch.randn(1, k, generator=g).to(dt)
        b = torch.randn(n, generator=g).to(dt) if bias else None
        nw = (torch.rand(k, generator=g) + 0.5).to(dt) if norm else None
        cs, bt = torch.randn(40, d, generator=g), torch.tensor([[3, 1, 5, 2]], dtype=torch.int32)
        seq = torch.zeros(1, dtype=torch.int32)
        for cfg in gemv.FMA_CONFIGS[:3] + [gemv.GemvConfig("fma", 16, 64, 4, 1)]:
            if not gemv.rope_supported(cfg, n, h, hkv, d):
                assert cfg.block_n == 1 or (d // 2) % (cfg.block_n // 2), cfg
                continue
            for pos in (0, 8, 13, -1):
                p = torch.tensor([pos])
                kc, vc = torch.randn(2, 6, hkv, 4, d, generator=g).to(dt)
                kc2, vc2 = kc.clone(), vc.clone()
                qkv = gemv.linear_fused(x, w, cfg, bias=b, norm_weight=nw, eps=1e-5)
                ref = fused.rope_write_kv(qkv, cs, p, h, hkv, d, seq, bt, kc, vc)
                got = gemv.linear_rope(x, w, cfg, cs, p, seq, bt, kc2, vc2, h, hkv, d, bias=b, norm_weight=nw, eps=1e-5)
                assert torch.equal(got, ref) and torch.equal(kc2, kc) and torch.equal(vc2, vc), (dt, cfg, pos)
    # the engine: batch-1 decode through the fused projection gives the reference loop's greedy tokens
    calls = []
    real = gemv.linear_rope
    gemv.linear_rope = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    for preset in ("tiny-test", "tiny-test-qwen2"):  # qwen2: the qkv bias
        lm = synthetic(preset, seed=3)
        prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (9, 20)]
        ref = [Generator(lm, 1, 64).generate([p], 4)[0].tokens for p in prompts]
        llm = LLM(lm, EngineConfig(max_num_seqs=2, max_model_len=64, attention_backend="triton"))
        assert llm.info()["qkv_rope"] is True
        tuning.install(lm.model, [1], "triton")  # what the CUDA runner installs (fixed fma config at batch 1)
        calls.clear()
        got = [llm.generate([p], max_tokens=4)[0].tokens for p in prompts]
        assert got == ref, (preset, got, ref)
        assert len(calls) == lm.config.n_layers * 3 * len(prompts), len(calls)  # every layer of the 3 decode steps
    print("OK")
    """
)


def test_qkv_projection_with_rope_epilogue_equals_the_unfused_path_under_the_interpreter():
    run_script(QKV_ROPE, timeout=900, ANVIL_QKV_ROPE="1")


DECODE = textwrap.dedent(
    """
    import torch
    from engine.kernels import reference_paged as RP
    from engine.kernels.triton.paged_attention import paged_decode_attention

    # split-KV decode, the merge kernel and the fused merge (the last of the splits that hold keys merges them, or the
    # one split that holds them all writes the output): padding rows (0 keys), one key, sliding windows, fewer key
    # chunks than splits, every split busy, a minimum chunk per split (min_chunk: one split or few), 32-key tiles;
    # repeated calls (the fused merge's counters reset themselves); a poisoned output (every element written)
    g = torch.Generator().manual_seed(0)
    for b, h, hkv, d, page, lens, window, splits in ((3, 8, 2, 128, 16, [1, 97, 1025], 0, None),
                                                     (2, 4, 4, 59, 8, [97, 0], 0, 3),
                                                     (4, 12, 4, 111, 32, [5, 1025, 300, 64], 50, 7),
                                                     (1, 32, 8, 64, 16, [200], 0, 32),
                                                     (2, 6, 2, 64, 16, [130, 640], 0, 8)):
        maxb = -(-max(lens) // page)
        nb = b * maxb + 5
        kc, vc = torch.randn(2, nb, hkv, page, d, generator=g)
        bt = (torch.randperm(nb - 1, generator=g)[: b * maxb].reshape(b, maxb) + 1).int()
        q = torch.randn(b, h, d, generator=g)
        sl = torch.tensor(lens, dtype=torch.int32)
        ref = RP.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, sl, d**-0.5, window)
        for min_chunk, block_n in ((0, 64), (128, 64), (1024, 64), (64, 32)):
            got = {}
            for fused in (False, True):
                for _ in range(3):
                    out = torch.full_like(q, float("nan"))
                    paged_decode_attention(q, kc, vc, bt, sl, d**-0.5, window=window, num_splits=splits, out=out,
                                           fused=fused, min_chunk=min_chunk, block_n=block_n)  # fmt: skip
                    rel = ((out.double() - ref).norm() / ref.norm()).item()
                    assert torch.isfinite(out).all() and rel < 1e-5, (lens, splits, fused, min_chunk, block_n, rel)
                got[fused] = out
            # the same merge (the fused one loads 8 splits at a time, the merge kernel all at once: rounding apart)
            assert torch.allclose(got[True], got[False], rtol=1e-6, atol=1e-7), (lens, min_chunk, block_n)
    for bad, msg in (({"min_chunk": 100}, "multiple of block_n"), ({"block_n": 48}, "block_n 48")):
        try:
            paged_decode_attention(q, kc, vc, bt, sl, d**-0.5, **bad)
        except AssertionError as e:
            assert msg in str(e), (bad, e)
        else:
            raise SystemExit(f"no error for {bad}")
    print("OK")
    """
)


def test_split_kv_decode_and_its_fused_merge_equal_the_reference_under_the_interpreter():
    run_script(DECODE, timeout=900)


@pytest.mark.parametrize(
    "env,msg",
    [
        ({"ANVIL_DECODE_MIN_CHUNK": "100"}, "ANVIL_DECODE_MIN_CHUNK=100: a multiple of the block_n 64"),
        ({"ANVIL_DECODE_MIN_CHUNK": "48", "ANVIL_DECODE_BLOCK_N": "32"}, "a multiple of the block_n 32"),
        ({"ANVIL_DECODE_WARPS": "3"}, "ANVIL_DECODE_WARPS='3': out of range"),
        ({"ANVIL_DECODE_BLOCK_N": "48"}, "ANVIL_DECODE_BLOCK_N='48': out of range"),
        ({"ANVIL_DECODE_MIN_CHUNK": "lots"}, "ANVIL_DECODE_MIN_CHUNK='lots': expected an integer"),
    ],
)
def test_decode_kernel_knobs_are_checked_when_the_backend_starts(env, msg, monkeypatch):
    from engine.attention.triton_backend import TritonBackend

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as e:
        TritonBackend()
    assert msg in str(e.value)


def test_decode_kernel_knobs_default_and_override(monkeypatch):
    from engine.attention.triton_backend import TritonBackend
    from engine.kernels.triton.paged_attention import default_block_n

    assert TritonBackend().info()["decode"] == {"min_chunk": 0, "num_warps": 4, "block_n": None}
    assert [default_block_n(b) for b in (1, 8, 9, 32)] == [32, 32, 64, 64]  # H200: 32-key tiles win up to 8 rows
    monkeypatch.setenv("ANVIL_DECODE_MIN_CHUNK", "256")
    monkeypatch.setenv("ANVIL_DECODE_BLOCK_N", "128")
    monkeypatch.setenv("ANVIL_DECODE_WARPS", "8")
    assert TritonBackend().info()["decode"] == {"min_chunk": 256, "num_warps": 8, "block_n": 128}
