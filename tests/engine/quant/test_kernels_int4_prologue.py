"""The RMSNorm and SwiGLU prologues inside the int4 tensor-core GEMV (`ext.int4_gemv_norm` / `int4_gemv_swiglu`,
int4_tc_gemv.cu's stage_x) on fresh random inputs at awkward sizes, and Int4LinearMethod.apply's use of them
(ANVIL_INT4_FUSED_NORM=1 / ANVIL_INT4_FUSED_ACT=1).

- Against the unfused path (the Triton rms_norm / silu_and_mul, then int4_gemv): the per-row sum of squares runs in
  another order, the exp is `__expf`, so a staged element can differ by one ulp; the products agree to a few ulps of
  their largest value.
- Against float64 (dequantized W, the norm without rounding): within the bf16 / fp16 rounding of the normalized x.
- The residual epilogue: `int4_gemv_norm(..., residual=r)` == `r + int4_gemv_norm(...)` bit for bit.
- Where the kernel does not take the shape (x too large for shared memory, ANVIL_INT4_TC_V=1), `int4_gemv_takes_prologue`
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
    if not ext.int4_gemv_takes_prologue(m, n, k, group):
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
@pytest.mark.parametrize("variant", ["2", "3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group", SHAPES + [(4096, 14336, 128)])
@pytest.mark.parametrize("m", [1, 3])
def test_int4_gemv_swiglu_matches_unfused_and_float64_gpu(n, k, group, m, dtype, variant, monkeypatch):
    from engine.kernels import ext
    from engine.kernels.triton import fused

    monkeypatch.setenv("ANVIL_INT4_TC_V", variant)
    if not ext.int4_gemv_takes_prologue(m, n, k, group):
        assert m * (k // 128) * 320 + 8 * 2 * 512 > 46 * 1024
        pytest.skip(f"M = {m}, K = {k}: x does not fit the kernel's shared memory")
    w, _, _, bias, g = _case(n, k, group, m, dtype, n * m)
    gu = (torch.randn(m, 2 * k, generator=g) * 2).to("cuda", dtype)  # [gate | up]
    got = ext.int4_gemv_swiglu(gu, w.qweight, w.scales, w.zeros, group, bias)
    unfused = ext.int4_gemv(fused.silu_and_mul(gu), w.qweight, w.scales, w.zeros, group, bias)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    assert (got.float() - unfused.float()).abs().max().item() <= 4 * ulp * unfused.float().abs().max().item()
    gate, up = gu.double()[:, :k], gu.double()[:, k:]
    truth = (gate * torch.sigmoid(gate) * up) @ dequantize(w).double().T + bias.double()
    assert (got.double() - truth).abs().max().item() <= 2 * ulp * truth.abs().max().item()
    r = torch.randn(m, n, generator=g).to("cuda", dtype)
    assert torch.equal(ext.int4_gemv_swiglu(gu, w.qweight, w.scales, w.zeros, group, bias, r), r + got)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 2K\] = \[gate \| up\]"):
        ext.int4_gemv_swiglu(gu[:, 1:].contiguous(), w.qweight, w.scales, w.zeros, group, bias)


@pytest.mark.gpu
@needs_gpu
def test_int4_gemv_norm_rejects_what_it_does_not_take_gpu(monkeypatch):
    from engine.kernels import ext

    w, x, nw, bias, _ = _case(64, 14336, 128, 5, torch.bfloat16, 0)
    assert not ext.int4_gemv_takes_prologue(5, 64, 14336, 128)  # 5 x 112 chunks x 320 bytes of x > 46 KB
    with pytest.raises(RuntimeError, match=r"M = 5, K = 14336, group 128 is not a shape the fused prologues take"):
        ext.int4_gemv_norm(x, w.qweight, w.scales, w.zeros, 128, nw, 1e-5)
    assert ext.int4_gemv_takes_prologue(1, 64, 14336, 128)
    with pytest.raises(RuntimeError, match=r"norm_weight must be a contiguous, 16-byte aligned \[K\] = \[14336\]"):
        ext.int4_gemv_norm(x[:1], w.qweight, w.scales, w.zeros, 128, nw[:-8], 1e-5)
    monkeypatch.setenv("ANVIL_INT4_TC_V", "1")  # the first kernel stages no x, so it has no norm prologue
    assert not ext.int4_gemv_takes_prologue(1, 64, 14336, 128)


@pytest.mark.gpu
@needs_gpu
def test_int4_apply_fuses_prologues_where_taken_gpu(monkeypatch):
    """ANVIL_INT4_FUSED_NORM=1 / ANVIL_INT4_FUSED_ACT=1: apply(norm=...) / apply(act=True) run int4_gemv_norm /
    int4_gemv_swiglu for the rows the tensor-core GEMV takes (M = 1 and 8 here) and the prologue kernel + int4_mma at
    M = 12, agreeing with the unfused apply either way."""
    from engine.kernels import ext
    from engine.model.layers.norm import RMSNorm

    w, _, nw, bias, g = _case(512, 1024, 128, 1, torch.bfloat16, 5)
    layer = torch.nn.Module()
    layer.qweight, layer.scales, layer.zeros, layer.bias = w.qweight, w.scales, w.zeros, bias
    norm = RMSNorm(1024, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data.copy_(nw)
    meth = methods.Int4LinearMethod(128)
    calls = []
    for name in ("int4_gemv_norm", "int4_gemv_swiglu"):
        real = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *a, real=real, name=name: calls.append((name, a[0].shape[0])) or real(*a))
    for m in (1, 8, 12):
        r = torch.randn(m, 512, generator=g).to("cuda", torch.bfloat16)
        for kw, width in (({"norm": norm}, 1024), ({"act": True}, 2048)):
            x = (torch.randn(m, width, generator=g) * 3).to("cuda", torch.bfloat16)
            monkeypatch.setattr(methods, "INT4_FUSED_NORM", False)
            monkeypatch.setattr(methods, "INT4_FUSED_ACT", False)
            want = meth.apply(layer, x, residual=r, **kw)
            monkeypatch.setattr(methods, "INT4_FUSED_NORM", True)
            monkeypatch.setattr(methods, "INT4_FUSED_ACT", True)
            got = meth.apply(layer, x, residual=r, **kw)
            assert (got.float() - want.float()).abs().max().item() <= 8 * 2.0**-7 * want.float().abs().max().item()
    assert calls == [(n, m) for m in (1, 8) for n in ("int4_gemv_norm", "int4_gemv_swiglu")]


@pytest.mark.gpu
@needs_gpu
def test_int4_engine_with_fused_prologues_agrees_with_unfused_gpu(monkeypatch):
    """The trained tiny model in bf16, RTN int4 g128 (hidden 384, MLP 1,152: every Linear on the tensor-core path),
    through the engine core with CUDA graphs: the fused prologues are really taken, and greedy decoding agrees with
    the unfused engine (the staged x can differ by an ulp, so near-ties may flip late tokens; most agree)."""
    import engine
    from engine import LLM, EngineConfig
    from engine.kernels import ext
    from engine.quant import quantize_model

    lm = engine.load(engine.hub.resolve("tiny"), dtype="bfloat16", device="cuda")
    quantize_model(lm.model, "rtn")
    tok = lm.tokenizer
    prompts = [tok.encode(s) for s in ("def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def ")]
    calls = {"int4_gemv_norm": 0, "int4_gemv_swiglu": 0}
    for name in calls:
        real = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *a, real=real, name=name: calls.__setitem__(name, calls[name] + 1)
                            or real(*a))  # fmt: skip
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(methods, "INT4_FUSED_NORM", on)
        monkeypatch.setattr(methods, "INT4_FUSED_ACT", on)
        llm = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=256))
        outs[on] = [o.tokens for o in llm.generate(prompts, max_tokens=64)]
        del llm
        if not on:
            assert calls == {"int4_gemv_norm": 0, "int4_gemv_swiglu": 0}
    assert calls["int4_gemv_norm"] > 0 and calls["int4_gemv_swiglu"] > 0, calls
    agree = [sum(a == b for a, b in zip(x, y, strict=True)) for x, y in zip(outs[True], outs[False], strict=True)]
    assert all(a >= 48 for a in agree), agree
