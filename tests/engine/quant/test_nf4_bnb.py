"""Our NF4 (engine/quant/nf4.py) against bitsandbytes' own NF4 on the CPU, bit for bit: the same code book, block
64, the same packed bytes (element 2i in the high nibble), the same absmax, the same dequantized weights; and
Linear4bit holds exactly our bytes, its forward within bf16 rounding of our reference matmul (its CPU kernel
computes in bf16)."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.quant.nf4 import NF4_CODE, dequantize_nf4, matmul_reference_nf4, quantize_nf4

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    Fb = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("shape", [(96, 320), (7, 64), (33, 1088)])  # odd rows, one block, 17 blocks per row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_nf4_equals_bitsandbytes_bit_for_bit(shape, dtype):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    w = (torch.randn(*shape, generator=g) * 0.05).to(dtype)
    w[0, :5] = torch.tensor([0.0, 1.0, -1.0, 0.3, -0.02]).to(dtype)  # exact levels and a zero block entry
    q, st = Fb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w)
    assert torch.allclose(st.code.float().cpu(), torch.tensor(NF4_CODE))
    assert torch.equal(st.absmax.float().view(shape[0], -1), ours.absmax)
    assert torch.equal(q.view(shape[0], -1), ours.qweight)
    assert torch.equal(Fb.dequantize_4bit(q, st), dequantize_nf4(ours, dtype))  # code * absmax, rounded once


def test_linear4bit_forward_equals_our_reference_matmul():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 192, generator=g) * 0.05, torch.randn(5, 192, generator=g)
    lin = bnb.nn.Linear4bit(192, 48, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    # compress_statistics=False: plain float32 absmax (its default double-quantizes it with an 8-bit code of its own)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=False)
    lin.weight.quant_state = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = lin.to("cpu")  # quantizes on the move, as on CUDA
        got = lin(x)
    ours = quantize_nf4(w)
    assert torch.equal(lin.weight.data.view(48, -1), ours.qweight)
    assert torch.equal(lin.weight.quant_state.absmax.float().view(48, -1), ours.absmax)
    ref = matmul_reference_nf4(x, ours)
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max(), (got - ref).abs().max()
