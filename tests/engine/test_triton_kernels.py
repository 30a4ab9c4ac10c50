"""Triton kernels of the CUDA path vs the pure-torch references at awkward sizes (paged decode attention, GEMVs with
their fused prologues/epilogues, norm / RoPE+KV write / SwiGLU). Needs a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference as R
from engine.kernels import reference_paged as RP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "b,h,hkv,d,page,lens,window,splits,dtype",
    [
        (3, 8, 2, 128, 16, [1, 97, 1025], 0, None, torch.bfloat16),
        (2, 4, 4, 59, 8, [97, 0], 0, 3, torch.float16),
        (4, 12, 4, 111, 32, [5, 1025, 300, 64], 50, 7, torch.bfloat16),
        (2, 32, 8, 128, 16, [2048, 3999], 0, 32, torch.bfloat16),
        (2, 6, 2, 64, 16, [130, 17], 0, 4, torch.float32),
    ],
)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("knobs", [{}, {"min_chunk": 256}, {"num_warps": 8, "min_chunk": 2048}, {"block_n": 32}],
                         ids=["default", "min256", "w8-min2048", "n32"])
def test_triton_paged_attention_matches_reference(b, h, hkv, d, page, lens, window, splits, dtype, fused, knobs):
    from engine.kernels.triton.paged_attention import paged_decode_attention

    dev = "cuda"
    maxb = -(-max(lens) // page)
    nb = b * maxb + 5
    kc = torch.randn(nb, hkv, page, d, device=dev, dtype=dtype)
    vc = torch.randn(nb, hkv, page, d, device=dev, dtype=dtype)
    bt = (torch.randperm(nb - 1, device=dev)[: b * maxb].reshape(b, maxb) + 1).int()
    q = torch.randn(b, h, d, device=dev, dtype=dtype)
    sl = torch.tensor(lens, dtype=torch.int32, device=dev)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    for _ in range(3):  # repeated calls: the fused merge's split counters must reset themselves
        out.fill_(float("nan"))
        paged_decode_attention(q, kc, vc, bt, sl, d**-0.5, window=window, num_splits=splits, out=out, fused=fused,
                               **knobs)
        ref = RP.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, sl, d**-0.5, window)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < TOL[dtype]
    # an L2 prefetch of another buffer (awkward size: not a multiple of the lines per program) changes nothing
    pf = torch.randn(3 * 1000 * 1000 + 7, device=dev, dtype=torch.bfloat16)
    before = pf.clone()
    got = paged_decode_attention(q, kc, vc, bt, sl, d**-0.5, window=window, num_splits=splits, fused=fused, prefetch=pf,
                                 **knobs)
    assert torch.equal(got, out) and torch.equal(pf, before)


@pytest.mark.parametrize(
    "m,act,bias,dtype",
    [
        (1, False, False, torch.bfloat16),
        (1, True, True, torch.bfloat16),
        (3, True, False, torch.bfloat16),
        (16, False, True, torch.bfloat16),
        (17, True, False, torch.bfloat16),
        (32, False, False, torch.bfloat16),
        (1, True, False, torch.float32),
        (17, False, True, torch.float32),
        (33, True, True, torch.bfloat16),  # short-prefill widths: BLOCK_M 64 and 128
        (100, False, False, torch.bfloat16),
        (128, True, False, torch.bfloat16),
        (77, False, True, torch.float32),
    ],
)
def test_triton_gemv_configs_match_reference(m, act, bias, dtype):
    """A few configs of each kernel here; on the device the tuner also checks every config it times."""
    from engine.kernels.triton import gemv

    n, k = 1000, 4100  # neither divides any block size
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    x = torch.randn(m, 2 * k if act else k, device="cuda", dtype=dtype)
    xin = R.silu_and_mul(x) if act else x
    ref = xin.double() @ w.double().T + (b.double() if bias else 0)
    # configs whose shared memory fits at this dtype (fp32 tiles are twice the bytes; the tuner skips misfits)
    dots = [gemv.DOT_CONFIGS[0], gemv.DOT_CONFIGS[3]] if dtype == torch.bfloat16 else [gemv.DOT_CONFIGS[0]]
    if m > 32:
        dots = gemv.WIDE_DOT_CONFIGS if dtype == torch.bfloat16 else [gemv.WIDE_DOT_CONFIGS[2]]
    for cfg in [gemv.FMA_CONFIGS[0], gemv.FMA_CONFIGS[-1], *dots]:
        y = gemv.linear(x, w, b, act=act, cfg=cfg)
        assert y.shape == (m, n) and torch.isfinite(y).all(), str(cfg)
        assert _rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5), str(cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [4096, 1000])
def test_triton_fused_gemv_norm_prologue_and_residual_epilogue(dtype, k):
    from engine.kernels.triton import gemv

    n, dev = 777, "cuda"
    w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    x = torch.randn(1, k, device=dev, dtype=dtype)
    g = 1 + 0.1 * torch.randn(k, device=dev, dtype=dtype)
    r = torch.randn(1, n, device=dev, dtype=dtype)
    gu = torch.randn(1, 2 * k, device=dev, dtype=dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for cfg in [gemv.FMA_CONFIGS[0], gemv.FMA_CONFIGS[2]]:
        y = gemv.linear_fused(x, w, cfg, norm_weight=g, eps=1e-5)
        ref = R.rms_norm(x, g, 1e-5).double() @ w.double().T
        assert _rel(y, ref) < tol, str(cfg)
        res = r.clone()
        gemv.linear_fused(gu, w, cfg, act=True, residual=res, out=res)  # in place on the residual stream
        ref = (R.silu_and_mul(gu).double() @ w.double().T).to(dtype).double() + r.double()
        assert _rel(res, ref) < tol, str(cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_norm_rope_kv_silu_match_reference(dtype):
    from engine.kernels.triton import fused

    dev = "cuda"
    x = torch.randn(7, 4096 + 37, device=dev, dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(x.shape[1], device=dev, dtype=dtype)
    out, _ = fused.rms_norm(x, w, 1e-5)
    assert _rel(out, R.rms_norm(x, w, 1e-5)) < (1e-5 if dtype == torch.float32 else 4e-3)
    out, res = fused.rms_norm(x, w, 1e-5, r)
    ref, ref_res = R.fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, ref_res) and _rel(out, ref) < (1e-5 if dtype == torch.float32 else 4e-3)
    gu = torch.randn(5, 2 * 1111, device=dev, dtype=dtype)
    assert _rel(fused.silu_and_mul(gu), R.silu_and_mul(gu)) < (1e-6 if dtype == torch.float32 else 4e-3)

    h, hkv, d, t, page = 12, 4, 96, 9, 16
    qkv = torch.randn(t, (h + 2 * hkv) * d, device=dev, dtype=dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
    cs = R.rope_cos_sin(inv, 256)
    pos = torch.tensor([0, 1, 2, 3, 200, 17, 18, -1, 5], dtype=torch.int32, device=dev)
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2], dtype=torch.int32, device=dev)
    bt = torch.randint(1, 40, (3, 16), dtype=torch.int32, device=dev)
    bt[:, :2] = torch.tensor([[1, 2], [3, 4], [5, 6]], device=dev)
    bt[1, 12] = 7
    caches = [torch.zeros(40, hkv, page, d, device=dev, dtype=dtype) for _ in range(4)]
    k_out = torch.empty(t, hkv, d, device=dev, dtype=dtype)
    q = fused.rope_write_kv(qkv, cs, pos, h, hkv, d, seq, bt, caches[0], caches[1], k_out=k_out)
    k_ref = torch.empty_like(k_out)
    q_ref = RP.rope_write_kv(qkv, cs, pos, h, hkv, d, seq, bt, caches[2], caches[3], k_out=k_ref)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(q, q_ref) < tol and _rel(k_out, k_ref) < tol
    assert _rel(caches[0], caches[2]) < tol and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_triton_gemv_residual_epilogue(dtype, m):
    from engine.kernels.triton import gemv

    x = torch.randn(m, 1000, device="cuda", dtype=dtype)
    w = torch.randn(333, 1000, device="cuda", dtype=dtype) * 0.05
    r = torch.randn(m, 333, device="cuda", dtype=dtype)
    ref = (x.double() @ w.double().T).to(dtype).double() + r.double()
    cfgs = gemv.DOT_CONFIGS[:2] + (gemv.FMA_CONFIGS[:2] if m == 1 else []) + [gemv.CUBLAS]
    for cfg in cfgs:
        y = gemv.linear(x, w, cfg=cfg, residual=r)
        assert _rel(y, ref) < TOL[dtype] * 5, str(cfg)
