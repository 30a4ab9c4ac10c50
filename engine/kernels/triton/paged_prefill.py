"""Varlen causal attention of new query tokens over a paged KV cache (prompt chunks over a cached prefix,
speculative verification), in Triton, with its launcher; oracle: engine/attention/torch_ref.py.

One program per (sequence, BLOCK_M query rows, query head). Sequence b's q_len queries sit at positions
seq_len - q_len .. seq_len - 1; the program walks the keys 0 .. (its last query's position) through the block
table (from the window's first visible key with a sliding window), online softmax in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_q_ptr, lens_ptr,
    scale, window, seq_offset,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kh, stride_ks, stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0) + seq_offset
    mb = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q0
    if mb * BLOCK_M >= q_len:
        return
    n = tl.load(lens_ptr + b)
    start_pos = n - q_len
    kvh = h // GROUP
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    pos = start_pos + offs_m  # [M] absolute positions of the queries
    q = tl.load(q_ptr + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # fmt: skip

    hi = tl.minimum(n, start_pos + (mb + 1) * BLOCK_M)  # keys past the block's last query are masked anyway
    lo = 0
    if window > 0:
        lo = tl.maximum(start_pos + mb * BLOCK_M - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s0 in range(lo, hi, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        page = tl.load(bt_ptr + b * stride_btb + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        row = offs_n % PAGE
        kv_off = page[:, None] * stride_kb + kvh * stride_kh + row[:, None] * stride_ks + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [N, D]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [M, N] fp32
        keep = mask_n[None, :] & (offs_n[None, :] <= pos[:, None])
        if window > 0:
            keep = keep & (pos[:, None] - offs_n[None, :] < window)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int,
    first_seq: int,
    num_seqs: int,
    max_q_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D] (rows of every sequence, in cu_seqlens_q order); k/v_cache [NB, Hkv, PAGE, D]; block_tables
    [B, max_blocks] int32; cu_seqlens_q [B+1] int32; seq_lens [B] int32. Attends sequences first_seq ..
    first_seq + num_seqs - 1 (max_q_len: their longest q_len) and writes their rows of out [T, H, D]."""
    t, h, d = q.shape
    nb, hkv, page, dk = k_cache.shape
    assert dk == d and v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert h % hkv == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"dtypes q {q.dtype} k {k_cache.dtype} v {v_cache.dtype}"
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1
    assert cu_seqlens_q.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert page & (page - 1) == 0, f"block size {page} must be a power of two"
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or max_q_len == 0:
        return out
    block_m = 64 if max_q_len > 32 else (32 if max_q_len > 16 else 16)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (num_seqs, triton.cdiv(max_q_len, block_m), h)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens,
        float(scale), int(window), int(first_seq),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=h // hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), PAGE=page,
        BLOCK_M=block_m, BLOCK_N=64 if d <= 64 else 32 if q.dtype == torch.float32 else 64, PREC=prec,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
