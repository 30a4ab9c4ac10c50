"""Tests of the anvil CUDA kernels against engine.kernels.reference: awkward sizes, fresh random inputs, poisoned
outputs, error bounded by 2x a same-precision torch result vs a float32 reference (GPU tests skip without CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.kernels import ext
from engine.kernels import reference as ref

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available (torch.cuda.is_available() is False)")
DTYPES = [torch.float16, torch.bfloat16]
EPS = {torch.float16: 1e-3, torch.bfloat16: 2e-3, torch.float32: 1e-5}


def test_availability_never_raises():
    assert isinstance(ext.is_available(), bool)
    assert isinstance(ext.why_unavailable(), str) and ext.why_unavailable()


@pytest.fixture(scope="module")
def dev():
    if not HAS_CUDA:
        pytest.skip("CUDA not available (torch.cuda.is_available() is False)")
    if not ext.is_available():
        pytest.fail(f"CUDA present but the extension did not load: {ext.why_unavailable()}")
    return torch.device("cuda")


def poison_allocator(nbytes: int = 1 << 28) -> None:
    """Fill freed cached blocks with NaN so an output the kernel forgets to write shows up."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def assert_close_2x(out, out_lowp, out_ref, dtype, what=""):
    """|out - ref| <= 2 |torch_same_precision - ref| + eps, elementwise max (flash-attention test style)."""
    assert out.shape == out_ref.shape, (out.shape, out_ref.shape)
    assert not out.isnan().any(), f"{what}: NaN in output (unwritten elements?)"
    err = (out.float() - out_ref.float()).abs().max().item()
    base = (out_lowp.float() - out_ref.float()).abs().max().item()
    eps = EPS[dtype] * max(1.0, out_ref.float().abs().max().item())  # eps relative to the output's magnitude
    assert err <= 2 * base + eps, f"{what}: max err {err:.3g} > 2 x {base:.3g} + {eps:.3g}"


def attention_lowp(q, k, v, scale, mask):
    """Attention with the matmuls and softmax in the input dtype (the same-precision torch result)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def prefill_lowp(q, k, v, cu, scale, causal, window):
    h, hkv = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:], strict=True):
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0)
        mask = ref._window_mask(e - s, e - s, 0, causal, window, q.device)
        out[s:e] = attention_lowp(qs, ks, vs, scale, mask).transpose(0, 1)
    return out


@gpu
@needs_cuda
class TestElementwise:
    @pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
    @pytest.mark.parametrize("shape", [(1, 64), (17, 4096), (97, 5120), (3, 5, 8192), (7, 100), (2, 16392)])
    def test_rms_norm(self, dev, dtype, shape):
        x = torch.randn(shape, device=dev, dtype=dtype)
        w = torch.randn(shape[-1], device=dev, dtype=dtype)
        poison_allocator()
        out = ext.rms_norm(x, w, 1e-5)
        assert_close_2x(out, ref.rms_norm(x, w, 1e-5), ref.rms_norm(x.float(), w.float(), 1e-5), dtype, "rms_norm")

    @pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
    @pytest.mark.parametrize("shape", [(1, 64), (97, 4096), (33, 100)])
    def test_fused_add_rms_norm(self, dev, dtype, shape):
        x, r = (torch.randn(shape, device=dev, dtype=dtype) for _ in range(2))
        w = torch.randn(shape[-1], device=dev, dtype=dtype)
        poison_allocator()
        out, res = ext.fused_add_rms_norm(x, r, w, 1e-6)
        lo, lres = ref.fused_add_rms_norm(x, r, w, 1e-6)
        ro, rres = ref.fused_add_rms_norm(x.float(), r.float(), w.float(), 1e-6)
        assert_close_2x(res, lres, rres, dtype, "residual")
        assert_close_2x(out, lo, ro, dtype, "norm")

    @pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
    @pytest.mark.parametrize("shape", [(1, 2 * 64), (17, 2 * 14336), (97, 2 * 11), (2, 3, 2 * 1024)])
    def test_silu_and_mul(self, dev, dtype, shape):
        x = torch.randn(shape, device=dev, dtype=dtype) * 3
        poison_allocator()
        out = ext.silu_and_mul(x)
        assert_close_2x(out, ref.silu_and_mul(x), ref.silu_and_mul(x.float()), dtype, "silu_and_mul")

    @pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
    @pytest.mark.parametrize("t,h,hkv,d", [(1, 8, 8, 64), (17, 32, 8, 128), (97, 4, 1, 128), (1025, 8, 2, 64)])
    @pytest.mark.parametrize("fused_qkv", [False, True])
    def test_rope(self, dev, dtype, t, h, hkv, d, fused_qkv):
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
        cs = ref.rope_cos_sin(inv_freq, 8192)
        pos = torch.randint(0, 8192, (t,), device=dev)
        if fused_qkv:  # strided views of one projection output, as the engine produces them
            qkv = torch.randn(t, (h + 2 * hkv) * d, device=dev, dtype=dtype).view(t, h + 2 * hkv, d)
            q, k = qkv[:, :h], qkv[:, h : h + hkv]
        else:
            q = torch.randn(t, h, d, device=dev, dtype=dtype)
            k = torch.randn(t, hkv, d, device=dev, dtype=dtype)
        lq, lk = ref.rope(q, k, pos, cs)
        rq, rk = ref.rope(q.float(), k.float(), pos, cs)
        oq, ok = ext.rope(q, k, pos, cs)
        assert oq.data_ptr() == q.data_ptr() and ok.data_ptr() == k.data_ptr()  # in place
        assert_close_2x(oq, lq, rq, dtype, "rope q")
        assert_close_2x(ok, lk, rk, dtype, "rope k")

    @pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
    @pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
    def test_write_kv(self, dev, dtype, idx_dtype):
        b, hkv, s_max, d, t = 3, 2, 97, 128, 17
        kc = torch.full((b, hkv, s_max, d), float("nan"), device=dev, dtype=dtype)
        vc = kc.clone()
        k = torch.randn(t, hkv, d, device=dev, dtype=dtype)
        v = torch.randn(t, hkv, d, device=dev, dtype=dtype)
        flat = torch.randperm(b * s_max, device=dev)[:t]
        bi, pos = (flat // s_max).to(idx_dtype), (flat % s_max).to(idx_dtype)
        rkc, rvc = kc.clone(), vc.clone()
        ref.write_kv(rkc, rvc, k, v, bi, pos)
        ext.write_kv(kc, vc, k, v, bi, pos)
        torch.testing.assert_close(kc, rkc, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(vc, rvc, equal_nan=True, rtol=0, atol=0)


def _qkv(t, h, hkv, d, dtype, dev, fused=False):
    if fused:
        qkv = torch.randn(t, h + 2 * hkv, d, device=dev, dtype=dtype)
        return qkv[:, :h], qkv[:, h : h + hkv], qkv[:, h + hkv :]
    return (torch.randn(t, n, d, device=dev, dtype=dtype) for n in (h, hkv, hkv))


def _check_prefill(dev, lens, h, hkv, d, dtype, causal, window, fused=False):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    q, k, v = _qkv(int(cu[-1]), h, hkv, d, dtype, dev, fused)
    scale = 1.0 / math.sqrt(d)
    poison_allocator()
    out = ext.prefill_attention(q, k, v, cu, scale, causal, window)
    lowp = prefill_lowp(q, k, v, cu, scale, causal, window)
    r32 = ref.prefill_attention(q.float(), k.float(), v.float(), cu, scale, causal, window)
    assert_close_2x(out, lowp, r32, dtype, f"prefill lens={lens} h={h}/{hkv} d={d} causal={causal} window={window}")


@gpu
@needs_cuda
class TestPrefill:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("d", [64, 128])
    @pytest.mark.parametrize("ratio", [1, 4])
    @pytest.mark.parametrize("seq", [1, 17, 97, 1025, 4097])
    def test_single(self, dev, seq, ratio, d, dtype):
        _check_prefill(dev, [seq], 8, 8 // ratio, d, dtype, causal=True, window=0)

    @pytest.mark.parametrize("window", [1, 64, 200])
    @pytest.mark.parametrize("seq", [17, 1025])
    def test_window(self, dev, seq, window):
        _check_prefill(dev, [seq], 8, 2, 128, torch.bfloat16, causal=True, window=window)

    @pytest.mark.parametrize("seq,window", [(97, 0), (1025, 0), (300, 100)])
    @pytest.mark.parametrize("d", [64, 128])
    def test_non_causal(self, dev, seq, window, d):
        _check_prefill(dev, [seq], 4, 4, d, torch.float16, causal=False, window=window)

    @pytest.mark.parametrize("lens", [[1, 17, 97], [1025, 3, 64, 129], [4097, 1], [128, 128, 1, 127, 255], [5] * 40])
    @pytest.mark.parametrize("ratio", [1, 4])
    def test_varlen(self, dev, lens, ratio):
        _check_prefill(dev, lens, 8, 8 // ratio, 128, torch.bfloat16, causal=True, window=0)
        _check_prefill(dev, lens, 8, 8 // ratio, 64, torch.float16, causal=True, window=33)

    def test_fused_qkv_views(self, dev):
        _check_prefill(dev, [97, 200], 8, 2, 128, torch.bfloat16, causal=True, window=0, fused=True)


def _check_decode(dev, lens, s_max, h, hkv, d, dtype, window=0):
    b = len(lens)
    q = torch.randn(b, h, d, device=dev, dtype=dtype)
    kc = torch.randn(b, hkv, s_max, d, device=dev, dtype=dtype)
    vc = torch.randn(b, hkv, s_max, d, device=dev, dtype=dtype)
    sl = torch.tensor(lens, device=dev, dtype=torch.int32)
    scale = 1.0 / math.sqrt(d)
    poison_allocator()
    out = ext.decode_attention(q, kc, vc, sl, scale, window)
    r32 = ref.decode_attention(q.float(), kc.float(), vc.float(), sl, scale, window)
    lowp = torch.empty_like(q)
    for i, n in enumerate(lens):
        lo = max(0, n - window) if window > 0 else 0
        ks = kc[i, :, lo:n].repeat_interleave(h // hkv, 0)
        vs = vc[i, :, lo:n].repeat_interleave(h // hkv, 0)
        lowp[i] = attention_lowp(q[i][:, None], ks, vs, scale, None)[:, 0]
    assert_close_2x(out, lowp, r32, dtype, f"decode lens={lens} s_max={s_max} h={h}/{hkv} d={d} window={window}")


@gpu
@needs_cuda
class TestDecode:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("d", [64, 128])
    @pytest.mark.parametrize("ratio", [1, 4, 8])
    @pytest.mark.parametrize("seq", [1, 17, 97, 1025, 4097])
    def test_single_len(self, dev, seq, ratio, d, dtype):
        _check_decode(dev, [seq, max(1, seq // 3)], seq + 5, 8, 8 // ratio, d, dtype)

    @pytest.mark.parametrize("window", [1, 100, 4096])
    def test_window(self, dev, window):
        _check_decode(dev, [1, 500, 2000, 4097], 4100, 32, 8, 128, torch.bfloat16, window)

    def test_mixed_batch(self, dev):
        _check_decode(dev, [1, 33, 7000, 250, 64, 65, 4097, 9], 8192, 32, 8, 128, torch.bfloat16)
        _check_decode(dev, [3, 32768], 32768, 8, 2, 64, torch.float16)

    def test_strided_cache(self, dev):  # a [B, Hkv, S_max, D] view of a larger allocation
        b, hkv, s, d, h = 2, 2, 300, 128, 8
        big_k = torch.randn(b, hkv, s + 11, d, device=dev, dtype=torch.bfloat16)
        big_v = torch.randn(b, hkv, s + 11, d, device=dev, dtype=torch.bfloat16)
        kc, vc = big_k[:, :, 3 : 3 + s], big_v[:, :, 3 : 3 + s]
        q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
        sl = torch.tensor([300, 123], device=dev, dtype=torch.int32)
        out = ext.decode_attention(q, kc, vc, sl, 0.1)
        r32 = ref.decode_attention(q.float(), kc.float(), vc.float(), sl, 0.1)
        assert (out.float() - r32).abs().max().item() < 2e-2


@gpu
@needs_cuda
def test_torch_compile_sees_fake_impls(dev):
    x = torch.randn(8, 256, device=dev, dtype=torch.bfloat16)
    w = torch.randn(256, device=dev, dtype=torch.bfloat16)

    def f(x, w):
        return ext.silu_and_mul(torch.cat([x, x], -1)) + ext.rms_norm(x, w, 1e-5)

    out = torch.compile(f, fullgraph=True)(x, w)
    torch.testing.assert_close(out, f(x, w))


@gpu
@needs_cuda
class TestBadInputs:
    def test_dtype(self, dev):
        x = torch.randn(4, 64, device=dev, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="dtype"):
            ext.rms_norm(x, torch.ones(64, device=dev, dtype=torch.float64), 1e-5)
        q = torch.randn(4, 2, 64, device=dev)
        cu = torch.tensor([0, 4], device=dev, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="float16 or bfloat16"):
            ext.prefill_attention(q, q, q, cu, 0.1)
        qh = q.half()
        with pytest.raises(RuntimeError, match="cu_seqlens"):
            ext.prefill_attention(qh, qh, qh, cu.long(), 0.1)
        with pytest.raises(RuntimeError, match="same dtype"):
            ext.rms_norm(torch.randn(4, 64, device=dev, dtype=torch.bfloat16), torch.ones(64, device=dev), 1e-5)

    def test_device(self, dev):
        x = torch.randn(4, 64, device=dev, dtype=torch.bfloat16)
        with pytest.raises((RuntimeError, NotImplementedError)):
            ext.rms_norm(x.cpu(), torch.ones(64, dtype=torch.bfloat16), 1e-5)
        with pytest.raises(RuntimeError, match="device"):
            ext.rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5)

    def test_shape(self, dev):
        x = torch.randn(4, 64, device=dev, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="weight"):
            ext.rms_norm(x, torch.ones(63, device=dev, dtype=torch.bfloat16), 1e-5)
        q = torch.randn(4, 2, 96, device=dev, dtype=torch.bfloat16)
        cu = torch.tensor([0, 4], device=dev, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="head_dim"):
            ext.prefill_attention(q, q, q, cu, 0.1)
        q = torch.randn(4, 3, 64, device=dev, dtype=torch.bfloat16)
        k = torch.randn(4, 2, 64, device=dev, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="multiple"):
            ext.prefill_attention(q, k, k, cu, 0.1)
        with pytest.raises(RuntimeError, match="even"):
            ext.silu_and_mul(torch.randn(3, 7, device=dev, dtype=torch.bfloat16))
        kc = torch.zeros(2, 2, 16, 64, device=dev, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="write_kv"):
            ext.write_kv(kc, kc.clone(), k, k, torch.zeros(3, device=dev), torch.zeros(4, device=dev))
