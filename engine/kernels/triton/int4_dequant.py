"""Dequantize Anvil's packed int4 (engine/quant/int4.py) into a dense [N, K] weight, W = (q - z) * s computed in
float32 and rounded once to the output dtype (the torch reference's rounding), for the prefill path: above the
tensor-core kernel's 64 rows a call is compute bound, and dequantize + cuBLAS beats a fused dequant GEMM that
re-expands every weight tile for every M tile (H200, w13 at M = 64: the Triton GEMM 0.93 ms).

One program per [BLOCK_N, BLOCK_W] tile of words; nibble j of word w is column 8w + j: the eight nibble planes are
joined (tl.join) into [BLOCK_N, 8 * BLOCK_W] natural-order columns and stored contiguously. act-order (g_idx)
reads each column's group and stores each plane with stride 8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, gi_ptr, w_ptr, N, K, KW, NG, G: tl.constexpr, HAS_GIDX: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (offs_n < N)[:, None] & (offs_w < KW)[None, :]
    qw = tl.load(qw_ptr + offs_n[:, None] * KW + offs_w[None, :], mask=mask, other=0)
    if not HAS_GIDX:  # one group per word (8 divides G)
        sz = offs_n[:, None] * NG + ((offs_w * 8) // G)[None, :]
        s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    if HAS_GIDX:  # per column: the group of column 8w + j, stored with stride 8
        for j in tl.static_range(8):
            col = offs_w * 8 + j
            g = tl.load(gi_ptr + col, mask=offs_w < KW, other=0)
            sz = offs_n[:, None] * NG + g[None, :]
            s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
            w = _deq(qw, j, s, z)
            tl.store(w_ptr + offs_n[:, None] * K + col[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)
    else:  # the eight nibbles joined into [BLOCK_N, BLOCK_W, 8] = [BLOCK_N, 8 * BLOCK_W] columns: contiguous stores
        v0 = _deq(qw, 0, s, z)
        v1 = _deq(qw, 1, s, z)
        v2 = _deq(qw, 2, s, z)
        v3 = _deq(qw, 3, s, z)
        v4 = _deq(qw, 4, s, z)
        v5 = _deq(qw, 5, s, z)
        v6 = _deq(qw, 6, s, z)
        v7 = _deq(qw, 7, s, z)
        # tl.join appends the new axis last, so a tree's leaf order is the bit-reverse of the flat index
        w = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        w = tl.reshape(w, [BLOCK_N, BLOCK_W * 8])
        col = tl.program_id(1) * BLOCK_W * 8 + tl.arange(0, BLOCK_W * 8)
        cmask = (offs_n < N)[:, None] & (col < K)[None, :]
        tl.store(w_ptr + offs_n[:, None] * K + col[None, :], w.to(w_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _deq(qw, j: tl.constexpr, s, z):
    return (((qw >> (4 * j)) & 0xF).to(tl.float32) - z) * s


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    g_idx: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """qweight int32 [N, K/8], scales / zeros [N, K/G] (optional g_idx int32 [K]) -> W [N, K] in dtype (default:
    the scales' dtype)."""
    assert qweight.dtype == torch.int32 and qweight.dim() == 2 and qweight.is_contiguous(), "qweight: int32 [N, K/8]"
    n, kw = qweight.shape
    k = kw * 8
    assert k % group_size == 0 and group_size % 8 == 0, f"K {k} must be a multiple of the group size {group_size}"
    for t in (scales, zeros):
        assert t.shape == (n, k // group_size) and t.is_contiguous(), "scales / zeros must be contiguous [N, K/G]"
    if g_idx is not None:
        assert g_idx.dtype == torch.int32 and g_idx.shape == (k,) and g_idx.is_contiguous(), "g_idx: int32 [K]"
    w = torch.empty(n, k, device=qweight.device, dtype=dtype or scales.dtype)
    bn, bw = 16, 64
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(kw, bw))](
        qweight, scales, zeros, qweight if g_idx is None else g_idx, w, n, k, kw, k // group_size, G=group_size,
        HAS_GIDX=g_idx is not None, BLOCK_N=bn, BLOCK_W=bw, num_warps=4,
    )  # fmt: skip
    return w
