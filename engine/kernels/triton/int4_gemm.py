"""Dequant GEMM y[M, N] = x[M, K] @ W^T for prefill / larger batches (M > 8), W in Anvil's packed int4 format
(engine/quant/int4.py). Tiles of W are dequantized in registers (float32 (q - z) * s, then rounded to x.dtype)
and multiplied with tl.dot on the tensor cores, float32 accumulation; the weights are never expanded in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.int4_gemv import _dequant_tile, check_int4_args


@triton.jit
def _int4_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    G: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # grouped launch order (the Triton matmul tutorial): programs that run together share W tiles in L2
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :],
                     other=0.0)  # [BM, BK]
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_n, mask_n, k0, N, K, G, HAS_GIDX, BLOCK_N, BLOCK_K)
        acc += tl.dot(xv, tl.trans(w.to(xv.dtype)), input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm_config(m: int, n: int, k: int, group_size: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by M bucket (untuned defaults; see bench_int4.py)."""
    bk = 64 if group_size % 64 == 0 else 32
    if m <= 16:
        return 16, 64, bk, 4, 3
    if m <= 64:
        return 32, 64, bk, 4, 3
    return 64, 128, bk, 8, 3


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int, bias: torch.Tensor | None = None, config: tuple | None = None,
              g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16; fp32 uses IEEE dots) -> y [M, N] in x.dtype."""
    m, n, k = check_int4_args(x, qweight, scales, zeros, group_size, g_idx)
    bm, bn, bk, warps, stages = config or gemm_config(m, n, k, group_size)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _int4_gemm_kernel[grid](
        x, qweight, scales, zeros, qweight if g_idx is None else g_idx, bias if bias is not None else y, y,
        m, n, k, x.stride(0), y.stride(0),
        G=group_size, HAS_GIDX=g_idx is not None, HAS_BIAS=bias is not None, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return y


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """GEMV for M <= 8, else the GEMM."""
    from engine.kernels.triton.int4_gemv import int4_gemv

    fn = int4_gemv if x.shape[0] <= 8 else int4_gemm
    return fn(x, qweight, scales, zeros, group_size, bias, g_idx=g_idx)
