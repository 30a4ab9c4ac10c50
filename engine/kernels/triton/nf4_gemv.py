"""Fused NF4 dequant GEMV y[M, N] = x[M, K] @ W^T for decode (M <= 8), W in engine/quant/nf4.py's layout:
qweight uint8 [N, K/2] (element 2i in the high nibble), absmax float32 [N, K/64], a 16-entry float32 code book.

Each program owns BLOCK_N rows; per K step it loads [BLOCK_N, BLOCK_K/2] bytes, splits the nibbles in registers,
looks the codes up in the code book (a 64-byte table, L1-resident), multiplies by the block's absmax and
accumulates x * w in float32 on the CUDA cores. Larger M: NF4LinearMethod dequantizes and calls F.linear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NF4_BLOCK = 64


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, qw_ptr, a_ptr, code_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    shifts = 4 - tl.arange(0, 2) * 4  # [4, 0]: the high nibble is the even element
    NB = K // 64
    if BLOCK_M == 1:
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        bb = k0 // 2 + offs_b
        byte = tl.load(qw_ptr + offs_n[:, None] * (K // 2) + bb[None, :],
                       mask=mask_n[:, None] & (bb < K // 2)[None, :], other=0,
                       eviction_policy="evict_first").to(tl.int32)  # [BN, BK/2]
        codes = tl.reshape((byte[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K))
        vals = tl.load(code_ptr + codes)  # [BN, BK] float32
        if BLOCK_K == 64:
            am = tl.load(a_ptr + offs_n * NB + k0 // 64, mask=mask_n, other=0.0)
            w = vals * am[:, None]
        else:
            am = tl.load(a_ptr + offs_n[:, None] * NB + (kk // 64)[None, :], mask=mask_n[:, None] & mk[None, :],
                         other=0.0)
            w = vals * am
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mk[None, :],
                     other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc1 += w * xv
        else:
            acc += tl.sum(xv[:, None, :] * w[None, :, :], axis=2)
    if BLOCK_M == 1:
        acc = tl.sum(acc1, axis=1)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def nf4_gemv(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
             config: tuple | None = None) -> torch.Tensor:
    """x [M <= 8, K] -> y [M, N] in x.dtype. absmax float32 [N, K/64], code float32 [16]."""
    assert x.dim() == 2 and x.is_contiguous(), "x must be a contiguous [M, K] tensor"
    assert x.is_cuda or x.device.type == "cpu", "Triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
    m, k = x.shape
    n = qweight.shape[0]
    assert 1 <= m <= 8, f"nf4_gemv takes M <= 8 rows (got {m})"
    assert k % NF4_BLOCK == 0, f"K {k} must be a multiple of {NF4_BLOCK}"
    assert qweight.dtype == torch.uint8 and qweight.shape == (n, k // 2) and qweight.is_contiguous()
    assert absmax.dtype == torch.float32 and absmax.shape == (n, k // NF4_BLOCK) and absmax.is_contiguous()
    assert code.dtype == torch.float32 and code.numel() == 16
    assert qweight.device == x.device == absmax.device == code.device, "all tensors on one device"
    bm = triton.next_power_of_2(m)
    bn, bk, warps = config or ({1: 16, 2: 16, 4: 8, 8: 4}[bm], 128, 4)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _nf4_gemv_kernel[(triton.cdiv(n, bn),)](
        x, qweight, absmax, code, y, m, n, k, x.stride(0), y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    return y
