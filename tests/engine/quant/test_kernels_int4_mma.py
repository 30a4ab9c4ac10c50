"""The tensor-core int4 kernel (engine/kernels/csrc/int4_mma.cu) against the float64 product of x and the
dequantized weights, with the bound of test_kernels_int4.py (2 * |torch same precision - ref64| + a floor), on
fresh random inputs: the Llama-3-8B shapes and awkward ones (N not a multiple of a block's 16 / 32 rows, one
128-column iteration, fewer iterations than the block's 8 warps, every M tile shape 1..64, G = 256, bias), every
variant (n8 tiles per warp, env ANVIL_INT4_MMA_NT; registers for blocks per SM, ANVIL_INT4_MMA_OCC;
persistent blocks, ANVIL_INT4_MMA_BLOCKS_PER_SM; read per call) and the dispatch of Int4LinearMethod."""

from __future__ import annotations

import pytest
import torch

from tests.engine.quant.interp_cases import run_case

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(
    not HAS_CUDA, reason="CUDA not available (torch.cuda.is_available() is False): mma.sync needs an sm_80+ GPU"
)
DTYPES = ["bfloat16", "float16"]
M_ALL = [1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 48, 64]  # each M-tile variant and its edges


def mma_case(**kw) -> None:
    torch.empty(1 << 26, device="cuda").fill_(float("nan"))  # unwritten outputs show up as NaN
    err, bound = run_case(kind="int4_mma", device="cuda", **kw)
    assert err <= bound, f"{kw}: max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(4096, 4096), (28672, 4096), (4096, 14336), (6144, 4096)])
@pytest.mark.parametrize("m", [1, 8, 16, 32, 64])
def test_int4_mma_llama_shapes_gpu(n, k, m, dtype):
    mma_case(n=n, k=k, m=m, dtype=dtype, seed=m, bias=m == 8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("nt,occ,bps", [("2", "2", "0"), ("4", "2", "0"), ("4", "1", "0"), ("2", "2", "1"),
                                         ("4", "1", "2")])  # fmt: skip
@pytest.mark.parametrize("n,k,group", [(200, 384, 128), (37, 128, 128), (1000, 4096, 256), (4001, 1152, 128),
                                       (8, 2048, 128), (333, 2560, 256), (8200, 256, 128)])  # fmt: skip
def test_int4_mma_awkward_gpu(n, k, group, nt, occ, bps, monkeypatch):
    """bps > 0: that many blocks per SM loop over the tiles (N 4001 / 8200: several tiles per block, and at
    K = 256 warps with no iteration that still join each tile's reduction)."""
    monkeypatch.setenv("ANVIL_INT4_MMA_NT", nt)
    monkeypatch.setenv("ANVIL_INT4_MMA_OCC", occ)
    monkeypatch.setenv("ANVIL_INT4_MMA_BLOCKS_PER_SM", bps)
    for m in M_ALL:
        for dtype in DTYPES:
            mma_case(n=n, k=k, m=m, dtype=dtype, group=group, seed=n + m, bias=m % 2 == 1)


@pytest.mark.gpu
@needs_gpu
def test_int4_mma_rejects_bad_input_gpu():
    from engine.kernels import ext
    from engine.quant.int4 import quantize_rtn

    p = quantize_rtn(torch.randn(64, 256) * 0.05, 128).to("cuda", torch.bfloat16)
    x = torch.randn(65, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="1 <= M <= 64 rows, got 65"):
        ext.int4_mma(x, p.qweight, p.scales, p.zeros, 128)
    with pytest.raises(RuntimeError, match="float16 or bfloat16 x only"):
        ext.int4_mma(x[:2].float(), p.qweight, p.scales, p.zeros, 128)
    p64 = quantize_rtn(torch.randn(64, 256) * 0.05, 64).to("cuda", torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"group size \(64\) must be multiples of 128"):
        ext.int4_mma(x[:2], p64.qweight, p64.scales, p64.zeros, 64)
    assert not ext.int4_mma_supported(x, 128, None)  # M = 65: dequantize + cuBLAS
    assert ext.int4_mma_supported(x[:64], 128, None)
    assert not ext.int4_mma_supported(x[:64], 64, None) and not ext.int4_mma_supported(x[:64], 128, p.qweight[0])


@pytest.mark.gpu
@needs_gpu
def test_int4_linear_method_uses_mma_gpu(monkeypatch):
    """auto: up to 8 rows with G = 128 go to the CUDA GEMV (its tensor-core path), 9..64 to int4_mma, more to
    dequantize + cuBLAS; with G = 64: the GEMV (FMA kernel) at M = 1, Triton at M = 2, dequantize + cuBLAS at 300;
    all match the reference."""
    from engine.kernels import ext
    from engine.quant import methods
    from engine.quant.int4 import matmul_reference, quantize_rtn

    calls = []
    for name in ("int4_mma", "int4_gemv"):
        real = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *a, _r=real, _n=name, **kw: calls.append((_n, a[0].shape[0])) or _r(*a, **kw))
    monkeypatch.setattr(methods, "INT4_KERNEL", "auto")
    from engine.kernels.triton import int4_dequant

    real_dq = int4_dequant.int4_dequantize
    monkeypatch.setattr(int4_dequant, "int4_dequantize",
                        lambda *a, **kw: calls.append(("dequant", a[0].shape[0])) or real_dq(*a, **kw))  # fmt: skip
    for group, ms in ((128, (1, 2, 8, 9, 33, 64, 65)), (64, (1, 2, 300))):
        w = quantize_rtn(torch.randn(512, 1024) * 0.05, group).to("cuda", torch.bfloat16)
        layer = torch.nn.Module()
        layer.qweight, layer.scales, layer.zeros, layer.bias = w.qweight, w.scales, w.zeros, None
        meth = methods.Int4LinearMethod(group)
        for m in ms:
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            ref = matmul_reference(x, w).float()
            err = (meth.matmul(layer, x).float() - ref).abs().max().item()
            assert err <= 2e-2 * ref.abs().max().item(), (group, m, err)
    assert calls == [("int4_gemv", 1), ("int4_gemv", 2), ("int4_gemv", 8), ("int4_mma", 9), ("int4_mma", 33),
                     ("int4_mma", 64), ("dequant", 512), ("int4_gemv", 1), ("dequant", 512)]


def test_int4_mma_not_supported_off_gpu():
    """On the CPU the dispatcher never picks the CUDA kernel (the reference runs instead)."""
    from engine.kernels import ext

    assert not ext.int4_mma_supported(torch.zeros(1, 256, dtype=torch.bfloat16), 128, None)
