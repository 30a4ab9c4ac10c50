"""Int4LinearMethod / NF4LinearMethod on engine.model.layers.linear.Linear: buffers, loading through a state dict,
the CPU reference matmul, prologue / epilogue, weight bytes; on the GPU the Triton path against the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("engine.model.layers.linear", reason="the pluggable Linear is not in this tree")

from engine.model.layers.linear import Linear  # noqa: E402
from engine.quant.int4 import matmul_reference, quantize_rtn  # noqa: E402
from engine.quant.methods import Int4LinearMethod, NF4LinearMethod  # noqa: E402
from engine.quant.nf4 import matmul_reference_nf4, quantize_nf4  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available (torch.cuda.is_available() is False)")


def int4_linear(n=200, k=384, g_idx=False, in_scale=False, device="cpu", dtype=torch.float32):
    w = torch.randn(n, k) * 0.05
    q = quantize_rtn(w, 128)
    if g_idx:
        q.g_idx = (torch.arange(k) // 128)[torch.randperm(k)].to(torch.int32)
    if in_scale:
        q.in_scale = torch.rand(k) + 0.5
    q = q.to(device, dtype)
    lin = Linear(k, n, method=Int4LinearMethod.for_weight(q)).to(device)
    lin.load_state_dict(q.tensors(), strict=True)
    lin.method.process_weights_after_loading(lin)
    return lin, q


@pytest.mark.parametrize("g_idx,in_scale", [(False, False), (True, False), (False, True)])
def test_int4_method_buffers_and_reference_matmul(g_idx, in_scale):
    lin, q = int4_linear(g_idx=g_idx, in_scale=in_scale)
    names = {n for n, _ in lin.named_buffers()}
    assert {"qweight", "scales", "zeros"} <= names and ("g_idx" in names) == g_idx
    assert not any(n == "weight" for n, _ in lin.named_parameters())
    x = torch.randn(5, 384)
    torch.testing.assert_close(lin(x), matmul_reference(x, q), rtol=0, atol=0)
    assert lin.method.weight_bytes(lin) == sum(t.numel() * t.element_size() for t in q.tensors().values())


def test_int4_method_prologue_and_residual():
    from engine import ops
    from engine.model.layers.norm import RMSNorm

    lin, q = int4_linear(n=96, k=256)
    norm = RMSNorm(256, 1e-5)
    norm.weight.data = torch.rand(256) + 0.5
    x, r = torch.randn(3, 256), torch.randn(3, 96)
    expect = r + matmul_reference(ops.rms_norm(x, norm.weight, 1e-5), q)
    torch.testing.assert_close(lin(x, norm=norm, residual=r), expect)
    lin2, q2 = int4_linear(n=96, k=128)
    h = torch.randn(4, 256)
    torch.testing.assert_close(lin2(h, act=True), matmul_reference(ops.silu_and_mul(h), q2))


def test_nf4_method():
    w = torch.randn(96, 256) * 0.05
    q = quantize_nf4(w)
    lin = Linear(256, 96, method=NF4LinearMethod())
    lin.load_state_dict({"qweight": q.qweight, "absmax": q.absmax}, strict=True)
    lin = lin.to(torch.bfloat16)  # a model-wide cast rounds absmax; loading restores float32
    lin.absmax = q.absmax.clone()
    lin.method.process_weights_after_loading(lin)
    assert lin.absmax.dtype == torch.float32
    x = torch.randn(3, 256)
    torch.testing.assert_close(lin(x), matmul_reference_nf4(x, q), rtol=0, atol=0)


def test_meta_build_then_assign():
    """The loader's path: create_weights on the meta device, load_state_dict(assign=True)."""
    q = quantize_rtn(torch.randn(64, 256), 128)
    with torch.device("meta"):
        lin = Linear(256, 64, method=Int4LinearMethod(128))
    lin.load_state_dict(q.tensors(), strict=True, assign=True)
    x = torch.randn(2, 256)
    torch.testing.assert_close(lin(x), matmul_reference(x, q), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 8, 9, 64])
@pytest.mark.parametrize("g_idx,in_scale", [(False, False), (True, True)])
def test_int4_method_cuda_matches_reference(m, g_idx, in_scale):
    lin, q = int4_linear(n=4096, k=4096, g_idx=g_idx, in_scale=in_scale, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = matmul_reference(x.float(), q.to("cuda", torch.float32))
    out = lin(x).float()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["rtn", "nf4"])
def test_tiny_quantized_on_gpu_matches_cpu_reference(method):
    import engine
    from engine.generator import Generator
    from engine.quant import quantize_model

    cpu = engine.load("tiny", "float32", "cpu")
    gpu = engine.load("tiny", "float32", "cuda")
    quantize_model(cpu.model, method)
    quantize_model(gpu.model, method)
    ids = cpu.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    a = Generator(cpu.model, 1, 64).logits([ids])[0]
    b = Generator(gpu.model, 1, 64).logits([ids])[0]
    assert (a - b).abs().max().item() < 1e-2
    out = Generator(gpu.model, 1, 64).generate([ids], 8)
    ref = Generator(cpu.model, 1, 64).generate([ids], 8)
    assert out[0].tokens == ref[0].tokens
