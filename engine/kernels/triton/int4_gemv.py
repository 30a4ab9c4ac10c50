"""Fused dequant GEMV y[M, N] = x[M, K] @ W^T for decode (M <= 8), W in Anvil's packed int4 g128 format
(engine/quant/int4.py): qweight int32 [N, K/8] (low nibble first), scales / zeros [N, K/G] in the model dtype.

Each program owns BLOCK_N output rows and walks K in BLOCK_K steps: it loads [BLOCK_N, BLOCK_K/8] words once,
splits them into nibbles in registers, dequantizes (q - z) * s in float32 and multiplies on the CUDA cores
(float32 accumulation, one reduction at the end for M == 1; a [M, N, K] broadcast-reduce per step for M > 1).
The weights are never expanded in memory. `_dequant_tile` is shared with the GEMM (int4_gemm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_n, mask_n, k0, N, K, G: tl.constexpr, HAS_GIDX: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """float32 [BLOCK_N, BLOCK_K] = dequantized W[offs_n, k0 : k0 + BLOCK_K] (0 outside N / K). HAS_GIDX: the
    group of column k is g_idx[k] (act-order), else k // G."""
    BKW: tl.constexpr = BLOCK_K // 8
    offs_w = k0 // 8 + tl.arange(0, BKW)
    mask = mask_n[:, None] & (offs_w < K // 8)[None, :]
    qw = tl.load(qw_ptr + offs_n[:, None] * (K // 8) + offs_w[None, :], mask=mask, other=0,
                 eviction_policy="evict_first")  # [BN, BKW] int32
    shifts = tl.arange(0, 8) * 4
    q = (qw[:, :, None] >> shifts[None, None, :]) & 0xF  # [BN, BKW, 8]
    q = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(tl.float32)  # column 8w + j = nibble j of word w
    NG = K // G
    if G % BLOCK_K == 0 and not HAS_GIDX:  # the whole tile is in one group: one scale / zero per row
        g = k0 // G
        s = tl.load(s_ptr + offs_n * NG + g, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * NG + g, mask=mask_n, other=0.0).to(tl.float32)
        w = (q - z[:, None]) * s[:, None]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if HAS_GIDX:
            gk = tl.load(gi_ptr + offs_k, mask=offs_k < K, other=0)
        else:
            gk = offs_k // G
        mk = mask_n[:, None] & (offs_k < K)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * NG + gk[None, :], mask=mk, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * NG + gk[None, :], mask=mk, other=0.0).to(tl.float32)
        w = (q - z) * s
    return w


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    G: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    if BLOCK_M == 1:
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_n, mask_n, k0, N, K, G, HAS_GIDX, BLOCK_N, BLOCK_K)
        kk = k0 + offs_k
        xm = mask_m[:, None] & (kk < K)[None, :]
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=xm, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc1 += w * xv  # [BN, BK] * [1, BK]
        else:
            acc += tl.sum(xv[:, None, :] * w[None, :, :], axis=2)  # [BM, BN]
    if BLOCK_M == 1:
        acc = tl.sum(acc1, axis=1)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def check_int4_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, g_idx: torch.Tensor | None = None) -> tuple[int, int, int]:
    """(M, N, K) after checking devices, dtypes, contiguity and shapes."""
    assert x.dim() == 2 and x.is_contiguous(), "x must be a contiguous [M, K] tensor"
    assert x.is_cuda or x.device.type == "cpu", "Triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
    assert qweight.dtype == torch.int32 and qweight.is_contiguous(), "qweight must be contiguous int32 [N, K/8]"
    m, k = x.shape
    n = qweight.shape[0]
    assert qweight.shape == (n, k // 8) and k % 8 == 0, f"qweight {tuple(qweight.shape)} vs x {tuple(x.shape)}"
    assert k % group_size == 0 and group_size % 8 == 0, f"K {k} must be a multiple of the group size {group_size}"
    for name, t in (("scales", scales), ("zeros", zeros)):
        assert t.shape == (n, k // group_size) and t.is_contiguous(), f"{name} must be contiguous [N, K/G]"
        assert t.device == x.device and qweight.device == x.device, "all tensors on one device"
    if g_idx is not None:
        assert g_idx.dtype == torch.int32 and g_idx.shape == (k,) and g_idx.is_contiguous(), "g_idx: int32 [K]"
        assert g_idx.device == x.device, "all tensors on one device"
    return m, n, k


def gemv_config(m: int, n: int, k: int, group_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): BLOCK_K = the group (one scale per row and step) up to 256;
    fewer rows per program as M grows, to keep the [M, N, K] product in registers."""
    bm = triton.next_power_of_2(m)
    bk = min(group_size, 256) if group_size >= 32 else 32
    bn = {1: 16, 2: 16, 4: 8, 8: 4}[bm]
    return bm, bn, bk, 4


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int, bias: torch.Tensor | None = None, config: tuple | None = None,
              g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x [M <= 8, K] (bf16/fp16/fp32) -> y [M, N] in x.dtype. Float32 dequant and accumulation."""
    m, n, k = check_int4_args(x, qweight, scales, zeros, group_size, g_idx)
    assert 1 <= m <= 8, f"int4_gemv takes M <= 8 rows (got {m}); use int4_gemm"
    bm, bn, bk, warps = config or gemv_config(m, n, k, group_size)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, bn),)
    _int4_gemv_kernel[grid](
        x, qweight, scales, zeros, qweight if g_idx is None else g_idx, bias if bias is not None else y, y,
        m, n, k, x.stride(0), y.stride(0),
        G=group_size, HAS_GIDX=g_idx is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    return y
