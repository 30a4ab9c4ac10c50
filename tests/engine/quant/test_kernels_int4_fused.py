"""The int4 CUDA kernels' fused residual epilogue and the GEMV's programmatic dependent launch (PDL), on fresh
random inputs at awkward sizes.

Residual: `int4_gemv(..., residual=r)` / `int4_mma(..., residual=r)` must equal `r + <the same kernel without it>`
bit for bit (the product is the same accumulation; the epilogue rounds it to x.dtype, then adds r in float and
rounds once more, which is what torch's x.dtype add does). PDL (sm_90): the GEMV issues its first weight loads
before `griddepcontrol.wait`, so a missing or misplaced wait reads a stale x; the test replays CUDA graphs in which
x is written by the kernel right before the GEMV (a Triton PDL kernel that lets its dependents start early, and
another GEMV) and compares every replay with the eager result. The CPU test checks Int4LinearMethod.apply's
residual path against the base class's composition."""

from __future__ import annotations

import pytest
import torch

from engine.model.layers.linear import UnquantizedLinearMethod
from engine.quant import methods
from engine.quant.int4 import quantize_rtn

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(
    not HAS_CUDA, reason="CUDA not available (torch.cuda.is_available() is False): the int4 CUDA kernels need a GPU"
)


def _layer(w, bias=None):
    layer = torch.nn.Module()
    layer.qweight, layer.scales, layer.zeros, layer.bias = w.qweight, w.scales, w.zeros, bias
    return layer


def test_int4_apply_residual_matches_base_composition_cpu():
    """CPU: apply(residual=r) == r + matmul (the base class's order), with the norm and SwiGLU prologues."""
    from engine.model.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(7)
    w = quantize_rtn(torch.randn(48, 256, generator=g) * 0.05, 128)
    layer = _layer(w, torch.randn(48, generator=g))
    meth = methods.Int4LinearMethod(128)
    x, r = torch.randn(3, 256, generator=g), torch.randn(3, 48, generator=g)
    norm = RMSNorm(256, 1e-5)
    torch.nn.init.normal_(norm.weight, generator=g)
    base = UnquantizedLinearMethod.apply  # the default composition, run with the int4 matmul
    for kw in ({}, {"norm": norm}):
        got = meth.apply(layer, x, residual=r, **kw)
        want = base(meth, layer, x, residual=r, **kw)
        assert torch.equal(got, want)
        assert not torch.equal(got, meth.apply(layer, x, **kw))  # the residual is really added
    x2 = torch.randn(3, 512, generator=g)
    assert torch.equal(meth.apply(layer, x2, act=True, residual=r), base(meth, layer, x2, act=True, residual=r))


def _weights(n, k, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = quantize_rtn(torch.randn(n, k, generator=g) * 0.05, group).to("cuda", dtype)
    return w, g


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group", [(200, 384, 128), (37, 1056, 32), (4001, 3072, 128), (77, 5152, 32)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int4_gemv_residual_bit_exact_gpu(n, k, group, m, dtype, monkeypatch):
    from engine.kernels import ext

    w, g = _weights(n, k, group, dtype, n + m)
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    r = torch.randn(m, n, generator=g).to("cuda", dtype) * 4
    monkeypatch.setenv("ANVIL_INT4_GEMV_TC", "0")  # the FMA kernel (test_kernels_int4_tc.py: the tensor-core path)
    variants = [("", "")] + ([(a, b) for a in ("2", "4", "8") for b in ("1", "2", "4")] if m == 1 else [])
    for rows, stages in variants:
        monkeypatch.setenv("ANVIL_INT4_GEMV_R", rows)
        monkeypatch.setenv("ANVIL_INT4_GEMV_P", stages)
        for b in (None, bias):
            plain = ext.int4_gemv(x, w.qweight, w.scales, w.zeros, group, b)
            fused = ext.int4_gemv(x, w.qweight, w.scales, w.zeros, group, b, r)
            assert torch.equal(fused, r + plain), (rows, stages, b is None)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(200, 384), (4096, 4096), (333, 2560)])
@pytest.mark.parametrize("m", [2, 17, 64])
def test_int4_mma_residual_bit_exact_gpu(n, k, m, dtype):
    from engine.kernels import ext

    w, g = _weights(n, k, 128, dtype, n * m)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    r = torch.randn(m, n, generator=g).to("cuda", dtype) * 4
    plain = ext.int4_mma(x, w.qweight, w.scales, w.zeros, 128)
    assert torch.equal(ext.int4_mma(x, w.qweight, w.scales, w.zeros, 128, None, r), r + plain)


@pytest.mark.gpu
@needs_gpu
def test_int4_residual_rejects_bad_shape_gpu():
    from engine.kernels import ext

    w, _ = _weights(64, 256, 128, torch.bfloat16, 0)
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"residual must be contiguous \[M, N\] = \[2, 64\], got \[2, 65\]"):
        ext.int4_gemv(x, w.qweight, w.scales, w.zeros, 128, None, torch.zeros(2, 65, device="cuda",
                                                                            dtype=torch.bfloat16))  # fmt: skip
    with pytest.raises(RuntimeError, match="residual"):
        ext.int4_mma(x, w.qweight, w.scales, w.zeros, 128, None, torch.zeros(2, 64, device="cuda"))  # float32


@pytest.mark.gpu
@needs_gpu
def test_int4_linear_method_fuses_residual_gpu(monkeypatch):
    """apply(residual=r) hands r to the CUDA kernel (M = 1 and 5: int4_gemv, up to ANVIL_INT4_CUDA_MAX_M = 8 rows;
    M = 12: int4_mma) and equals r + matmul."""
    from engine.kernels import ext

    w, g = _weights(512, 1024, 128, torch.bfloat16, 3)
    layer, meth = _layer(w), methods.Int4LinearMethod(128)
    seen = []
    for name in ("int4_gemv", "int4_mma"):
        real = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *a, real=real, name=name: seen.append((name, a[-1] is not None))
                            or real(*a))  # fmt: skip
    for m in (1, 5, 12):
        x = torch.randn(m, 1024, generator=g).to("cuda", torch.bfloat16)
        r = torch.randn(m, 512, generator=g).to("cuda", torch.bfloat16)
        assert torch.equal(meth.apply(layer, x, residual=r), r + meth.matmul(layer, x))
    assert seen == [("int4_gemv", True), ("int4_gemv", False)] * 2 + [("int4_mma", True), ("int4_mma", False)]


@pytest.mark.gpu
@needs_gpu
def test_int4_apply_prologues_gpu():
    """apply's norm / SwiGLU prologues on the GPU (the Triton PDL kernels on sm_90) == engine.ops' composition,
    up to last bits (another reduction order for the rms, another exp), at M = 1 and 5."""
    from engine import ops
    from engine.model.layers.norm import RMSNorm

    w, g = _weights(384, 1024, 128, torch.bfloat16, 5)
    layer, meth = _layer(w), methods.Int4LinearMethod(128)
    norm = RMSNorm(1024, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.copy_(torch.randn(1024, generator=g))
    for m in (1, 5, 12):
        x = torch.randn(m, 1024, generator=g).to("cuda", torch.bfloat16)
        r = torch.randn(m, 384, generator=g).to("cuda", torch.bfloat16)
        want = r + meth.matmul(layer, ops.rms_norm(x, norm.weight, norm.eps))
        got = meth.apply(layer, x, norm=norm, residual=r)
        assert (got.float() - want.float()).abs().max().item() <= 2e-2 * want.float().abs().max().item(), m
        x2 = torch.randn(m, 2048, generator=g).to("cuda", torch.bfloat16)
        want = meth.matmul(layer, ops.silu_and_mul(x2)).float()  # exp may differ in the last bit between the two
        got = meth.apply(layer, x2, act=True).float()
        assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item(), m


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_gemv_pdl_in_cuda_graph_gpu(dtype, monkeypatch):
    """A graph of [Triton PDL rms_norm -> int4_gemv -> int4_gemv (+ residual)]: x of each GEMV is written by the
    kernel just before it. Every replay on fresh inputs equals the eager chain bit for bit (a GEMV that read x
    before its wait would see the previous replay's x)."""
    from engine.kernels import ext
    from engine.kernels.triton import fused

    n = k = 4096
    w1, g = _weights(n, k, 128, dtype, 11)
    w2, _ = _weights(n, k, 128, dtype, 12)
    norm_w = torch.randn(k, generator=g).to("cuda", dtype)
    h = torch.zeros(1, k, device="cuda", dtype=dtype)

    def chain():
        x = fused.rms_norm(h, norm_w, 1e-5)[0]
        y = ext.int4_gemv(x, w1.qweight, w1.scales, w1.zeros, 128)
        return ext.int4_gemv(y, w2.qweight, w2.scales, w2.zeros, 128, None, y)

    for tc, stages in (("0", "1"), ("0", "4"), ("1", "2"), ("1", "4")):  # the FMA kernel, the tensor-core path
        monkeypatch.setenv("ANVIL_INT4_GEMV_TC", tc)
        monkeypatch.setenv("ANVIL_INT4_GEMV_P", stages)
        monkeypatch.setenv("ANVIL_INT4_TC_P", stages)
        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        for i in range(6):
            h.copy_(torch.randn(1, k, generator=g).to("cuda", dtype) * (i + 1))
            graph.replay()
            want = chain()
            assert torch.equal(out, want), (tc, stages, i)
