"""Small fused Triton kernels of the decode step, each beside its launcher: RMSNorm (+ residual add), RoPE fused
with the paged KV write, SwiGLU, and the in-graph step advance. Each matches engine/kernels/reference.py's rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.pdl import launch, pdl_enter


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, N, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(
            x_ptr.dtype.element_ty
        )
        tl.store(r_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, N]. Without residual: (rms_norm(x), None). With: r = x + residual; (rms_norm(r), r) as new tensors."""
    t, n = x.shape
    assert x.stride(-1) == 1 and weight.shape == (n,) and weight.stride(0) == 1 and weight.dtype == x.dtype
    out = torch.empty_like(x)
    r_out = torch.empty_like(x) if residual is not None else out
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1 and residual.dtype == x.dtype
    r = residual if residual is not None else x
    _rms_norm_kernel[(t,)](
        x, r, weight, out, r_out, n, float(eps),
        x.stride(0), r.stride(0), out.stride(0), r_out.stride(0),
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 2048 else 4, **launch(),
    )  # fmt: skip
    return out, (r_out if residual is not None else None)


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, cs_ptr, pos_ptr, seq_ptr, bt_ptr, kc_ptr, vc_ptr, q_out_ptr, k_out_ptr,
    stride_qkv, stride_cs, stride_bt,
    stride_kb, stride_kh, stride_ks,
    stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    PAGE: tl.constexpr, WRITE_KV: tl.constexpr, K_OUT: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        pdl_enter(PDL)
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    pc = tl.maximum(pos, 0)
    offs_j = tl.arange(0, BLOCK_HALF)
    mj = offs_j < HALF
    cos = tl.load(cs_ptr + pc * stride_cs + offs_j, mask=mj, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pc * stride_cs + HALF + offs_j, mask=mj, other=0.0)[None, :]
    base = qkv_ptr + t * stride_qkv
    ty = qkv_ptr.dtype.element_ty

    offs_h = tl.arange(0, BLOCK_H)
    mq = (offs_h[:, None] < H) & mj[None, :]
    qp = base + offs_h[:, None] * D + offs_j[None, :]
    q1 = tl.load(qp, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=mq, other=0.0).to(tl.float32)
    qo = q_out_ptr + t * stride_qo_t + offs_h[:, None] * stride_qo_h + offs_j[None, :]
    tl.store(qo, (q1 * cos - q2 * sin).to(ty), mask=mq)
    tl.store(qo + HALF, (q2 * cos + q1 * sin).to(ty), mask=mq)

    offs_g = tl.arange(0, BLOCK_HKV)
    mk = (offs_g[:, None] < HKV) & mj[None, :]
    kp = base + H * D + offs_g[:, None] * D + offs_j[None, :]
    k1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=mk, other=0.0).to(tl.float32)
    ka = (k1 * cos - k2 * sin).to(ty)
    kb = (k2 * cos + k1 * sin).to(ty)
    if K_OUT:
        ko = k_out_ptr + t * stride_ko_t + offs_g[:, None] * stride_ko_h + offs_j[None, :]
        tl.store(ko, ka, mask=mk)
        tl.store(ko + HALF, kb, mask=mk)
    if WRITE_KV:
        seq = tl.load(seq_ptr + t)
        ok = pos >= 0
        page = tl.load(bt_ptr + seq * stride_bt + pos // PAGE, mask=ok, other=0)
        off = page.to(tl.int64) * stride_kb + (pos % PAGE) * stride_ks + offs_g[:, None] * stride_kh + offs_j[None, :]
        mw = mk & ok
        tl.store(kc_ptr + off, ka, mask=mw)
        tl.store(kc_ptr + off + HALF, kb, mask=mw)
        vp = base + (H + HKV) * D + offs_g[:, None] * D + offs_j[None, :]
        tl.store(vc_ptr + off, tl.load(vp, mask=mk, other=0.0), mask=mw)
        tl.store(vc_ptr + off + HALF, tl.load(vp + HALF, mask=mk, other=0.0), mask=mw)


def rope_write_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seq_idx: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) * D] packed [q | k | v]; positions [T] int32/int64. Returns rotated q [T, H, D].
    With block_tables/k_cache/v_cache: rotated k and v go to the paged cache at (seq_idx[t], positions[t])
    (positions < 0 skip the write). With k_out [T, Hkv, D]: the rotated k is stored there too."""
    t = qkv.shape[0]
    d, half = head_dim, head_dim // 2
    assert qkv.stride(-1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * d, f"qkv {tuple(qkv.shape)}"
    assert cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1 and cos_sin.shape[1] == d
    if q_out is None:
        q_out = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    assert q_out.stride(-1) == 1
    write = k_cache is not None
    if write:
        assert block_tables is not None and seq_idx is not None and v_cache is not None
        assert k_cache.shape[1:] == (num_kv_heads, k_cache.shape[2], d) and k_cache.stride() == v_cache.stride()
        assert k_cache.stride(-1) == 1 and block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1
    if k_out is not None:
        assert k_out.shape == (t, num_kv_heads, d) and k_out.stride(-1) == 1
    kc = k_cache if write else qkv
    _rope_kv_kernel[(t,)](
        qkv, cos_sin, positions, seq_idx if write else positions, block_tables if write else positions,
        kc, v_cache if write else qkv, q_out, k_out if k_out is not None else q_out,
        qkv.stride(0), cos_sin.stride(0), block_tables.stride(0) if write else 0,
        kc.stride(0) if write else 0, kc.stride(1) if write else 0, kc.stride(2) if write else 0,
        q_out.stride(0), q_out.stride(1),
        k_out.stride(0) if k_out is not None else 0, k_out.stride(1) if k_out is not None else 0,
        H=num_heads, HKV=num_kv_heads, D=d, HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), PAGE=k_cache.shape[2] if write else 1,
        WRITE_KV=write, K_OUT=k_out is not None, num_warps=4, **launch(),
    )  # fmt: skip
    return q_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, F, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + F + offs, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    s = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (s * u).to(ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2F] = [gate | up] -> silu(gate) * up [T, F]."""
    t, f2 = x.shape
    f = f2 // 2
    assert x.stride(-1) == 1
    out = torch.empty(t, f, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(f, block))](x, out, f, x.stride(0), out.stride(0), BLOCK=block, **launch())
    return out


@triton.jit
def _advance_kernel(next_ptr, ids_ptr, pos_ptr, lens_ptr, B, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        pdl_enter(PDL)
    offs = tl.arange(0, BLOCK)
    m = offs < B
    tl.store(ids_ptr + offs, tl.load(next_ptr + offs, mask=m).to(ids_ptr.dtype.element_ty), mask=m)
    tl.store(pos_ptr + offs, tl.load(pos_ptr + offs, mask=m) + 1, mask=m)
    tl.store(lens_ptr + offs, tl.load(lens_ptr + offs, mask=m) + 1, mask=m)


def advance(next_tokens: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor):
    """In place, for the next decode step: input_ids = next_tokens; positions += 1; seq_lens += 1."""
    b = next_tokens.shape[0]
    assert input_ids.shape[0] >= b and positions.shape[0] >= b and seq_lens.shape[0] >= b
    _advance_kernel[(1,)](next_tokens, input_ids, positions, seq_lens, b, BLOCK=triton.next_power_of_2(b), **launch())


ARGMAX_BLOCK = 4096


@triton.jit
def _argmax_partial_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, NB, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        pdl_enter(PDL)
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m, i = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * NB + blk, m)
    tl.store(idx_ptr + row * NB + blk, blk * BLOCK + i)


@triton.jit
def _argmax_final_kernel(val_ptr, idx_ptr, out_ptr, NB, NB_PAD: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, NB_PAD)
    v = tl.load(val_ptr + row * NB + offs, mask=offs < NB, other=float("-inf"))
    _, j = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * NB + j).to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [M, V] -> int64 [M], the first index of each row's maximum (torch.argmax's choice for finite rows;
    a NaN is not treated as the maximum). Two launches: per-4096-column block maxima, then their argmax."""
    m, v = logits.shape
    assert logits.stride(-1) == 1
    nb = triton.cdiv(v, ARGMAX_BLOCK)
    vals = torch.empty(m, nb, dtype=torch.float32, device=logits.device)
    idx = torch.empty(m, nb, dtype=torch.int32, device=logits.device)
    out = torch.empty(m, dtype=torch.int64, device=logits.device)
    _argmax_partial_kernel[(m, nb)](logits, vals, idx, v, logits.stride(0), nb, BLOCK=ARGMAX_BLOCK, num_warps=8,
                                    **launch())  # fmt: skip
    _argmax_final_kernel[(m,)](vals, idx, out, nb, NB_PAD=triton.next_power_of_2(nb), **launch())
    return out
