"""Skinny GEMM / GEMV y[M, N] = act(x)[M, K] @ W[N, K]^T (+ bias) for decode (M <= 32) and short prefills
(M <= 128), in Triton, with launchers.

Decode is bound by reading W once. Two kernels: `fma` (M == 1: [BN, BK] tiles multiplied on the CUDA cores,
one reduction at the end) and `dot` (M padded to 16/32 on the tensor cores, pipelined loads). ACT=1 fuses
SwiGLU into the load of x: x is the [M, 2K] gate|up output and the kernel uses silu(gate) * up, rounded as the
reference silu_and_mul rounds. engine/kernels/triton/tune.py picks, per (M bucket, N, K), the fastest of these
configs and cuBLAS on the device; nothing here assumes Triton wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.triton.pdl import launch, pdl_enter


@triton.jit
def _silu_mul(g, u, OUT_TY: tl.constexpr):
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(OUT_TY)  # F.silu in x.dtype
    return (s.to(tl.float32) * u.to(tl.float32)).to(OUT_TY)  # then the x.dtype multiply


@triton.jit
def _fma_rows(
    x_ptr, w_ptr, b_ptr, offs_n, mask_n, K, stride_wn, g_ptr, eps,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """fp32 W[offs_n] @ f(x) (+ bias) for M == 1, f = the NORM or ACT prologue. NORM: x -> g * rms_norm(x) on the
    fly (every program reads all of x once more for the rms, from L2). The weight tiles are double-buffered in
    registers (tile k+1 is loaded while tile k is multiplied); the first one is loaded before the PDL wait, while
    the previous kernel finishes."""
    ty = w_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    if EVEN_K:
        w_next = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0, eviction_policy="evict_first")
    else:
        w_next = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0,
                         eviction_policy="evict_first")  # fmt: skip
    if PDL:  # x, r and y belong to earlier kernels: wait for them, then let the next kernel start
        pdl_enter(PDL)
    rstd = 1.0
    if NORM:
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xs = tl.load(x_ptr + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0).to(tl.float32)
            ss += xs * xs
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        w = w_next
        w_ptrs += BLOCK_K
        nxt = (kk + BLOCK_K) < K  # the tile after this one (all masked past the end: no traffic)
        w_next = tl.load(w_ptrs, mask=mask_n[:, None] & nxt[None, :], other=0.0, eviction_policy="evict_first")
        if EVEN_K:
            xv = tl.load(x_ptr + kk)
            if ACT:
                xv = _silu_mul(xv, tl.load(x_ptr + K + kk), ty)
            if NORM:
                xv = (tl.load(g_ptr + kk).to(tl.float32) * (xv.to(tl.float32) * rstd).to(ty).to(tl.float32)).to(ty)
        else:
            mk = kk < K
            xv = tl.load(x_ptr + kk, mask=mk, other=0.0)
            if ACT:
                xv = _silu_mul(xv, tl.load(x_ptr + K + kk, mask=mk, other=0.0), ty)
            if NORM:
                g = tl.load(g_ptr + kk, mask=mk, other=0.0).to(tl.float32)
                xv = (g * (xv.to(tl.float32) * rstd).to(ty).to(tl.float32)).to(ty)
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return y


@triton.jit
def _gemv_fma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K,
    stride_wn,
    g_ptr, eps, r_ptr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    NORM: tl.constexpr, RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """M == 1 (see _fma_rows). RES: y -> round(y) + r, written to y (the residual stream, updated in place: r may
    alias y)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = _fma_rows(x_ptr, w_ptr, b_ptr, offs_n, mask_n, K, stride_wn, g_ptr, eps,
                  ACT, HAS_BIAS, EVEN_K, NORM, BLOCK_N, BLOCK_K, PDL)  # fmt: skip
    if RES:  # as F.linear then the x.dtype residual add: round, add, round
        r = tl.load(r_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = y.to(w_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemv_fma_rope_kernel(
    x_ptr, w_ptr, b_ptr, K, stride_wn, g_ptr, eps,
    cs_ptr, pos_ptr, seq_ptr, bt_ptr, kc_ptr, vc_ptr, q_ptr,
    stride_cs, stride_bt, stride_kb, stride_kh, stride_ks, stride_qh,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """The qkv projection of one decode token with what fused.rope_write_kv does after it as the epilogue: each
    program owns BLOCK_N / 2 rotation pairs (d, d + D/2) of one head, so its rows alone give the rotated values.
    q heads -> q [H, D] rotated; k heads -> rotated into the paged cache at positions[0]; v heads -> the cache
    as they are (positions[0] < 0 writes no cache). The packed qkv itself is not stored."""
    P: tl.constexpr = BLOCK_N // 2
    HALF: tl.constexpr = D // 2
    pid = tl.program_id(0)
    head = pid // (HALF // P)
    j = (pid % (HALF // P)) * P + tl.arange(0, P)  # this program's first-half dims
    r = tl.arange(0, BLOCK_N)
    offs_n = head * D + (pid % (HALF // P)) * P + r % P + (r // P) * HALF  # [j | j + HALF] rows of the head
    mask_n = offs_n < (H + 2 * HKV) * D
    y = _fma_rows(x_ptr, w_ptr, b_ptr, offs_n, mask_n, K, stride_wn, g_ptr, eps,
                  False, HAS_BIAS, EVEN_K, NORM, BLOCK_N, BLOCK_K, PDL)  # fmt: skip
    ty = w_ptr.dtype.element_ty
    y = y.to(ty).to(tl.float32)  # F.linear's rounding, as rope_write_kv reads it
    x1, x2 = tl.split(tl.permute(tl.reshape(y, [2, P]), [1, 0]))
    pos = tl.load(pos_ptr)
    pc = tl.maximum(pos, 0)
    cos = tl.load(cs_ptr + pc * stride_cs + j)
    sin = tl.load(cs_ptr + pc * stride_cs + HALF + j)
    o1 = (x1 * cos - x2 * sin).to(ty)
    o2 = (x2 * cos + x1 * sin).to(ty)
    if head < H:
        tl.store(q_ptr + head * stride_qh + j, o1)
        tl.store(q_ptr + head * stride_qh + HALF + j, o2)
    else:
        ok = (j >= 0) & (pos >= 0)
        page = tl.load(bt_ptr + tl.load(seq_ptr) * stride_bt + pc // PAGE)
        off = page.to(tl.int64) * stride_kb + (pc % PAGE) * stride_ks + j
        if head < H + HKV:
            off += (head - H) * stride_kh
            tl.store(kc_ptr + off, o1, mask=ok)
            tl.store(kc_ptr + off + HALF, o2, mask=ok)
        else:
            off += (head - H - HKV) * stride_kh
            tl.store(vc_ptr + off, x1.to(ty), mask=ok)
            tl.store(vc_ptr + off + HALF, x2.to(ty), mask=ok)


@triton.jit
def _gemv_dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym, r_ptr, stride_rm,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr, RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        pdl_enter(PDL)
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                mask=mask_n[:, None],
                other=0.0,
                eviction_policy="evict_first",
            )
            xm = mask_m[:, None]
        else:
            mk = kk < K
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0
            )
            xm = mask_m[:, None] & mk[None, :]
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=xm, other=0.0)
        if ACT:
            u = tl.load(x_ptr + offs_m[:, None] * stride_xm + K + kk[None, :], mask=xm, other=0.0)
            xv = _silu_mul(xv, u, w_ptr.dtype.element_ty)
        acc += tl.dot(xv.to(w.dtype), tl.trans(w), input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if RES:  # as F.linear then the x.dtype residual add: round, add, round
        r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        acc = acc.to(w_ptr.dtype.element_ty).to(tl.float32) + r
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class GemvConfig:
    kind: str  # "fma" (M == 1 only) | "dot" | "tma" (2 <= M <= 64, sm_90+: engine/kernels/triton/skinny_tma.py) | "cublas"
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 1

    def __str__(self) -> str:
        if self.kind == "cublas":
            return "cublas"
        return f"{self.kind}:n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"


CUBLAS = GemvConfig("cublas")
FMA_CONFIGS = [  # (BN, BK): few rows x long K slices (llama.cpp mmvf style) to squarer tiles
    GemvConfig("fma", 1, 4096, 4, 1),
    GemvConfig("fma", 2, 2048, 4, 1),
    GemvConfig("fma", 4, 1024, 4, 1),
    GemvConfig("fma", 4, 2048, 8, 1),
    GemvConfig("fma", 8, 512, 4, 1),
    GemvConfig("fma", 16, 512, 8, 1),
    GemvConfig("fma", 8, 1024, 8, 1),
    # more bytes in flight per SM (the H200 needs ~1.4x the H100's to reach its copy bandwidth)
    GemvConfig("fma", 2, 4096, 8, 1),
    GemvConfig("fma", 4, 4096, 8, 1),
    GemvConfig("fma", 4, 1024, 4, 3),
    GemvConfig("fma", 8, 1024, 8, 2),
]
DOT_CONFIGS = [
    GemvConfig("dot", 16, 256, 4, 4),
    GemvConfig("dot", 32, 256, 4, 4),
    GemvConfig("dot", 64, 128, 4, 4),
    GemvConfig("dot", 64, 256, 8, 3),
    GemvConfig("dot", 16, 512, 4, 3),
    GemvConfig("dot", 32, 512, 8, 3),
    GemvConfig("dot", 64, 128, 8, 4),
    GemvConfig("dot", 32, 128, 4, 5),
]


WIDE_DOT_CONFIGS = [  # 32 < M <= 128 (short prefills): x tiles grow with M, so shorter K slices, more N tiles
    GemvConfig("dot", 16, 128, 4, 4),
    GemvConfig("dot", 32, 128, 4, 4),
    GemvConfig("dot", 32, 64, 4, 4),
    GemvConfig("dot", 64, 64, 4, 4),
    GemvConfig("dot", 64, 128, 8, 3),
]
MAX_DOT_M = 128
TMA_CONFIGS = [  # (BN W rows, BK): W as the wgmma's M side; shared memory <= 192 KB at M = 64
    GemvConfig("tma", 64, 128, 4, 5),
    GemvConfig("tma", 64, 128, 4, 6),
    GemvConfig("tma", 128, 128, 4, 4),
    GemvConfig("tma", 128, 64, 8, 6),
    GemvConfig("tma", 32, 256, 4, 4),
    GemvConfig("tma", 64, 64, 4, 8),
]
MAX_TMA_M = 64


def candidates(m: int, tma: bool = True) -> list[GemvConfig]:
    """The configs the tuner times at M rows (tma: include the sm_90+ TMA kernel's)."""
    t = TMA_CONFIGS if tma and 2 <= m <= MAX_TMA_M else []
    if m > 32:
        return [CUBLAS] + (WIDE_DOT_CONFIGS if m <= MAX_DOT_M else []) + t
    return [CUBLAS] + (FMA_CONFIGS if m == 1 else []) + DOT_CONFIGS + t


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    f = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :f]) * x[..., f:]


def epilogue_out(x: torch.Tensor, n: int, bias: torch.Tensor | None, residual: torch.Tensor | None,
                 out: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """The output [M, N] of a GEMV kernel (out, or a new tensor), with bias [N] and residual [M, N] checked."""
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.stride(-1) == 1
    if bias is not None:
        assert bias.shape == (n,) and bias.stride(0) == 1
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(-1) == 1 and residual.dtype == x.dtype
    return out


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: bool = False,
    cfg: GemvConfig = CUBLAS,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (silu_and_mul(x) if act else x) @ w.T (+ bias) (+ residual [M, N], added after rounding to x.dtype).
    x [M, K] (or [M, 2K] with act), w [N, K] row-major. (linear_fused below adds the RMSNorm prologue for M == 1.)"""
    m = x.shape[0]
    n, k = w.shape
    assert x.dim() == 2 and x.stride(-1) == 1 and w.stride(-1) == 1 and w.stride(0) >= k, "row-major x and w"
    assert x.shape[1] == (2 * k if act else k), f"x {tuple(x.shape)} vs w {tuple(w.shape)} (act={act})"
    assert x.dtype == w.dtype, f"x {x.dtype} vs w {w.dtype}"
    if cfg.kind in ("cublas", "tma") or (cfg.kind == "fma" and m != 1):  # SwiGLU as its own kernel first
        if act:  # one Triton kernel on the GPU rather than torch's silu + mul
            from engine.kernels.triton.fused import silu_and_mul

            xin = silu_and_mul(x) if x.is_cuda else silu_and_mul_torch(x)
        else:
            xin = x
        if cfg.kind == "tma":
            from engine.kernels.triton.skinny_tma import skinny_tma

            return skinny_tma(xin, w, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, bias=bias,
                              residual=residual, out=out)  # fmt: skip
        y = torch.nn.functional.linear(xin, w, bias)
        if residual is not None:
            y = residual + y
        if out is not None:
            out.copy_(y)
            return out
        return y
    out = epilogue_out(x, n, bias, residual, out)
    if residual is not None and cfg.kind == "fma":  # linear_fused carries the fma residual epilogue
        return linear_fused(x, w, cfg, bias=bias, act=act, residual=residual, out=out)
    even_k = k % cfg.block_k == 0
    grid = (triton.cdiv(n, cfg.block_n),)
    b_arg = bias if bias is not None else w
    if cfg.kind == "fma":
        _gemv_fma_kernel[grid](
            x, w, b_arg, out, n, k, w.stride(0), w, 0.0, w,
            ACT=act, HAS_BIAS=bias is not None, EVEN_K=even_k, NORM=False, RES=False,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch(),
        )  # fmt: skip
    else:
        assert m <= MAX_DOT_M, f"dot GEMV handles M <= {MAX_DOT_M}, got {m}"
        _gemv_dot_kernel[grid](
            x, w, b_arg, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
            residual if residual is not None else out, residual.stride(0) if residual is not None else 0,
            ACT=act, HAS_BIAS=bias is not None, EVEN_K=even_k, RES=residual is not None,
            PREC="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch(),
        )  # fmt: skip
    return out


def linear_fused(
    x: torch.Tensor,
    w: torch.Tensor,
    cfg: GemvConfig,
    bias: torch.Tensor | None = None,
    act: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """M == 1 fma GEMV with fusions: y = W @ f(x) (+ bias) (+ residual), f = rms_norm(., norm_weight, eps) when
    norm_weight is given, silu_and_mul with act. residual [1, N] is added after rounding to x.dtype (the eager
    path's linear-then-add); out may be the residual itself (in-place residual stream)."""
    n, k = w.shape
    assert cfg.kind == "fma" and x.shape[0] == 1 and x.stride(-1) == 1 and w.stride(-1) == 1
    assert x.shape[1] == (2 * k if act else k) and x.dtype == w.dtype
    assert not (act and norm_weight is not None), "norm and act prologues do not combine"
    if norm_weight is not None:
        assert norm_weight.shape == (k,) and norm_weight.stride(0) == 1 and norm_weight.dtype == w.dtype
    if residual is not None:
        assert residual.shape == (1, n) and residual.stride(-1) == 1 and residual.dtype == w.dtype
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    assert out.shape == (1, n) and out.stride(-1) == 1
    _gemv_fma_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, w, bias if bias is not None else w, out, n, k, w.stride(0),
        norm_weight if norm_weight is not None else w, float(eps), residual if residual is not None else w,
        ACT=act, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
        NORM=norm_weight is not None, RES=residual is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch(),
    )  # fmt: skip
    return out


def step_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    cfg: GemvConfig,
    bias: torch.Tensor | None = None,
    act: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """A dense projection of the decode step under config cfg, with its prologue (RMSNorm: fused into the batch-1
    fma GEMV, else a norm kernel first; SwiGLU with act) and residual epilogue — the one dispatch that
    GemvLinearMethod.apply runs and the tuner times (engine/kernels/triton/tune.py)."""
    if cfg.kind == "fma" and x.shape[0] == 1 and not (norm_weight is not None and act):
        return linear_fused(x, w, cfg, bias=bias, act=act, norm_weight=norm_weight, eps=eps, residual=residual)
    if norm_weight is not None:
        from engine.kernels.triton.fused import rms_norm

        x = rms_norm(x, norm_weight, eps)[0]
    return linear(x, w, bias, act=act, cfg=cfg, residual=residual)


def rope_supported(cfg: GemvConfig, n: int, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether linear_rope can run config cfg on a [n, K] qkv weight: fma, whole rotation pairs per program."""
    p = cfg.block_n // 2
    return (cfg.kind == "fma" and p > 0 and head_dim % 2 == 0 and (head_dim // 2) % p == 0
            and n == (num_heads + 2 * num_kv_heads) * head_dim)  # fmt: skip


def linear_rope(
    x: torch.Tensor,
    w: torch.Tensor,
    cfg: GemvConfig,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    seq_idx: torch.Tensor,
    block_tables: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """One decode token's qkv projection (x [1, K], w [(H + 2 Hkv) D, K], optional RMSNorm prologue) with RoPE
    and the paged KV write as its epilogue: equal, bit for bit, to linear_fused then fused.rope_write_kv with the
    same config. Returns the rotated q [1, H, D]; k / v go to the caches [NB, Hkv, PAGE, D] at
    (seq_idx[0], positions[0]). cfg must pass rope_supported."""
    n, k = w.shape
    h, hkv, d = num_heads, num_kv_heads, head_dim
    assert rope_supported(cfg, n, h, hkv, d), f"{cfg} cannot rotate {n} rows of {h}/{hkv} heads x {d}"
    assert x.shape == (1, k) and x.stride(-1) == 1 and w.stride(-1) == 1 and x.dtype == w.dtype
    assert cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1 and cos_sin.shape[1] == d
    assert k_cache.shape[1:] == (hkv, k_cache.shape[2], d) and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(-1) == 1 and block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1
    if norm_weight is not None:
        assert norm_weight.shape == (k,) and norm_weight.stride(0) == 1 and norm_weight.dtype == w.dtype
    q = torch.empty(1, h, d, dtype=x.dtype, device=x.device)
    _gemv_fma_rope_kernel[((h + 2 * hkv) * (d // 2) // (cfg.block_n // 2),)](
        x, w, bias if bias is not None else w, k, w.stride(0),
        norm_weight if norm_weight is not None else w, float(eps),
        cos_sin, positions, seq_idx, block_tables, k_cache, v_cache, q,
        cos_sin.stride(0), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), q.stride(1),
        H=h, HKV=hkv, D=d, PAGE=k_cache.shape[2],
        HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0, NORM=norm_weight is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch(),
    )  # fmt: skip
    return q
