"""int4_gemv's tensor-core path (engine/kernels/csrc/int4_tc_gemv.cu: K and G multiples of 128, M <= 8) on fresh
random inputs at awkward sizes, at the per-shape default and at every tile x K-split x stages variant
(ANVIL_INT4_TC_R 1 / 2 x ANVIL_INT4_TC_KS 2 / 4 / 8 x ANVIL_INT4_TC_P 2 / 4), of both kernels (ANVIL_INT4_TC_V 1, and
2: x in shared memory where it fits — M = 5 at K = 14,336 falls back to 1; 3: that kernel with x stored as B
fragments, at the plan and KS = 8).

- Against the reference (dequantize, float64 product) under test_kernels_int4.py's bound.
- The residual epilogue: `int4_gemv(..., residual=r)` == `r + int4_gemv(...)` bit for bit.
- Against the FMA kernel (ANVIL_INT4_GEMV_TC=0): both accumulate in fp32, so they agree to a few bf16 ulps.
"""

from __future__ import annotations

import pytest
import torch

from engine.quant.int4 import quantize_rtn
from tests.engine.quant.test_kernels_int4 import gpu_case

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(
    not HAS_CUDA, reason="CUDA not available (torch.cuda.is_available() is False): the int4 CUDA kernels need a GPU"
)
VARIANTS = [("", "", "", v) for v in ("1", "2", "3")]
VARIANTS += [(r, ks, p, v) for v in ("1", "2") for r in ("1", "2") for ks in ("2", "4", "8") for p in ("2", "4")]
VARIANTS += [(r, "8", p, "3") for r in ("1", "2") for p in ("2", "4")]
# N not a multiple of 16 or of a block's rows; K of 1, 3, 20 and 112 chunks of 128 (fewer chunks than warps, not a
# multiple of KS x P); G = 128, 256 and G = K (one group per row)
SHAPES = [(9, 128, 128), (200, 384, 128), (333, 2560, 256), (4001, 3072, 3072), (1000, 14336, 128)]


def _set(monkeypatch, r, ks, p, v):
    monkeypatch.setenv("ANVIL_INT4_GEMV_TC", "1")
    monkeypatch.setenv("ANVIL_INT4_TC_V", v)
    monkeypatch.setenv("ANVIL_INT4_TC_R", r)
    monkeypatch.setenv("ANVIL_INT4_TC_KS", ks)
    monkeypatch.setenv("ANVIL_INT4_TC_P", p)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_int4_tc_gemv_matches_reference_gpu(n, k, group, m, monkeypatch):
    for v in VARIANTS if m in (1, 5) else VARIANTS[:3]:
        _set(monkeypatch, *v)
        for dtype in ("bfloat16", "float16"):
            gpu_case(kind="int4_cuda", n=n, k=k, m=m, dtype=dtype, group=group, seed=n + m, bias=m != 2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group", SHAPES[:4])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int4_tc_gemv_residual_bit_exact_and_near_fma_gpu(n, k, group, m, dtype, monkeypatch):
    from engine.kernels import ext

    g = torch.Generator().manual_seed(n * m)
    w = quantize_rtn(torch.randn(n, k, generator=g) * 0.05, group).to("cuda", dtype)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    r = torch.randn(m, n, generator=g).to("cuda", dtype) * 4
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    monkeypatch.setenv("ANVIL_INT4_GEMV_TC", "0")
    fma = ext.int4_gemv(x, w.qweight, w.scales, w.zeros, group, bias).float()
    for v in VARIANTS:
        _set(monkeypatch, *v)
        plain = ext.int4_gemv(x, w.qweight, w.scales, w.zeros, group, bias)
        assert torch.equal(ext.int4_gemv(x, w.qweight, w.scales, w.zeros, group, bias, r), r + plain), v
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert (plain.float() - fma).abs().max().item() <= 4 * ulp * fma.abs().max().item(), v
