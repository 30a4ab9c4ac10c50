"""The RMSNorm prologue inside the int4 tensor-core GEMV (`ext.int4_gemv_norm`, int4_tc_gemv.cu's stage_x) on fresh
random inputs at awkward sizes, and Int4LinearMethod.apply's use of it (ANVIL_INT4_FUSED_NORM=1).

- Against the unfused path (the Triton rms_norm, then int4_gemv): the per-row sum of squares runs in another order,
  so a normalized element can differ by one ulp; the products agree to a few ulps of their largest value.
- Against float64 (dequantized W, the norm without rounding): within the bf16 / fp16 rounding of the normalized x.
- The residual epilogue: `int4_gemv_norm(..., residual=r)` == `r + int4_gemv_norm(...)` bit for bit.
- Where the kernel does not take the shape (x too large for shared memory, ANVIL_INT4_TC_V=1), `int4_gemv_takes_norm`
  says so and `int4_gemv_norm` raises a clear error; apply then runs the norm kernel and the GEMV as before.
"""

from __future__ import annotations

import pytest
import torch

from engine.quant import methods
from engine.quant.int4 import dequantize, quantize_rtn

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(
    not HAS_CUDA, reason="CUDA not available (torch.cuda.is_available() is False): the int4 CUDA kernels need a GPU"
)
# N not a multiple of a block's rows; K of 3, 20, 24 and 32 chunks of 128; G = 128, 256 and G = K
SHAPES = [(200, 384, 128), (333, 2560, 256), (4001, 3072, 3072), (1000, 4096, 128)]


def _case(n, k, group, m, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = quantize_rtn(torch.randn(n, k, generator=g) * 0.05, group).to("cuda", dtype)
    x = (torch.randn(m, k, generator=g) * 3).to("cuda", dtype)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to("cuda", dtype)
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    return w, x, nw, bias, g


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", ["2", "3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int4_gemv_norm_matches_unfused_and_float64_gpu(n, k, group, m, dtype, variant, monkeypatch):
    from engine.kernels import ext
    from engine.kernels.triton import fused

    monkeypatch.setenv("ANVIL_INT4_TC_V", variant)
    if not ext.int4_gemv_takes_norm(m, n, k, group):
        assert m * (k // 128) * 320 + 8 * 2 * 512 > 46 * 1024  # only where x does not fit (R = 2 at most, KS = 8)
        pytest.skip(f"M = {m}, K = {k}: x does not fit the kernel's shared memory (the error test covers this)")
    w, x, nw, bias, g = _case(n, k, group, m, dtype, n + m)
    eps = 1e-5
    got = ext.int4_gemv_norm(x, w.qweight, w.scales, w.zeros, group, nw, eps, bias)
    unfused = ext.int4_gemv(fused.rms_norm(x, nw, eps)[0], w.qweight, w.scales, w.zeros, group, bias)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    scale = unfused.float().abs().max().item()
    assert (got.float() - unfused.float()).abs().max().item() <= 4 * ulp * scale
    x64 = x.double()
    xn = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * nw.double()
    truth = xn @ dequantize(w).double().T + bias.double()
    # the normalized x is rounded to dtype once (relative ulp / 2 per element), the output once more
    assert (got.double() - truth).abs().max().item() <= 2 * ulp * truth.abs().max().item()
    r = torch.randn(m, n, generator=g).to("cuda", dtype)
    assert torch.equal(ext.int4_gemv_norm(x, w.qweight, w.scales, w.zeros, group, nw, eps, bias, r), r + got)


@pytest.mark.gpu
@needs_gpu
def test_int4_gemv_norm_rejects_what_it_does_not_take_gpu(monkeypatch):
    from engine.kernels import ext

    w, x, nw, bias, _ = _case(64, 14336, 128, 5, torch.bfloat16, 0)
    assert not ext.int4_gemv_takes_norm(5, 64, 14336, 128)  # 5 x 112 chunks x 320 bytes of x > 46 KB
    with pytest.raises(RuntimeError, match=r"M = 5, K = 14336, group 128 is not a shape the fused RMSNorm takes"):
        ext.int4_gemv_norm(x, w.qweight, w.scales, w.zeros, 128, nw, 1e-5)
    assert ext.int4_gemv_takes_norm(1, 64, 14336, 128)
    with pytest.raises(RuntimeError, match=r"norm_weight must be a contiguous, 16-byte aligned \[K\] = \[14336\]"):
        ext.int4_gemv_norm(x[:1], w.qweight, w.scales, w.zeros, 128, nw[:-8], 1e-5)
    monkeypatch.setenv("ANVIL_INT4_TC_V", "1")  # the first kernel stages no x, so it has no norm prologue
    assert not ext.int4_gemv_takes_norm(1, 64, 14336, 128)


@pytest.mark.gpu
@needs_gpu
def test_int4_apply_fuses_norm_where_taken_gpu(monkeypatch):
    """ANVIL_INT4_FUSED_NORM=1: apply(norm=...) runs int4_gemv_norm for the rows the tensor-core GEMV takes (M = 1 and
    8 here) and the norm kernel + int4_mma at M = 12, agreeing with the unfused apply either way."""
    from engine.kernels import ext
    from engine.model.layers.norm import RMSNorm

    w, _, nw, bias, g = _case(512, 1024, 128, 1, torch.bfloat16, 5)
    layer = torch.nn.Module()
    layer.qweight, layer.scales, layer.zeros, layer.bias = w.qweight, w.scales, w.zeros, bias
    norm = RMSNorm(1024, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data.copy_(nw)
    meth = methods.Int4LinearMethod(128)
    calls = []
    real = ext.int4_gemv_norm
    monkeypatch.setattr(ext, "int4_gemv_norm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for m in (1, 8, 12):
        x = (torch.randn(m, 1024, generator=g) * 3).to("cuda", torch.bfloat16)
        r = torch.randn(m, 512, generator=g).to("cuda", torch.bfloat16)
        monkeypatch.setattr(methods, "INT4_FUSED_NORM", False)
        want = meth.apply(layer, x, norm=norm, residual=r)
        monkeypatch.setattr(methods, "INT4_FUSED_NORM", True)
        got = meth.apply(layer, x, norm=norm, residual=r)
        assert (got.float() - want.float()).abs().max().item() <= 8 * 2.0**-7 * want.float().abs().max().item()
    assert calls == [1, 8]
