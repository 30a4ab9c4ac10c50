"""Skinny GEMM y[M, N] = x[M, K] @ W[N, K]^T (+ bias) (+ residual) for decode batches (2 <= M <= 64) on sm_90+,
with the operands swapped and loaded through TMA (Triton tensor descriptors); the GEMV tuner's "tma" kind, offered
with ANVIL_GEMV_TMA=1 (engine/worker/tuning.py; opt-in until the core's GPU tests pass with it).

Why: at M = 32 the decode step is still bound by reading W once, yet the `dot` GEMV (x as the MMA's M side,
padded to 16/32 rows, W tiles through cp.async) and cuBLAS reach 2.7-3.7 TB/s on the H200 where the batch-1
GEMV reaches 3.4-4.1 (results/gpu/core-h200/core-bench-step-check-6e8027f-1-early0.json, the tuner's table).
Here each program owns BLOCK_N rows of W and computes acc^T [BLOCK_N, BLOCK_M] = W_tile @ x_tile^T: W fills the
wgmma's 64-row M side, the few tokens its N side (8..256, so M needs no padding to 64), and both tiles are TMA
box copies pipelined over K with mbarriers (num_stages deep), costing no registers or issue slots to address.
TMA zero-fills boxes past M, N and K, so ragged shapes need no masks on the loads; the store is masked.

Epilogue as the `dot` GEMV's: the bias added in float32, the result rounded to x.dtype; with a residual, that
rounded product plus the residual in float32, rounded once more (the eager path's linear-then-add).

Requirements (`supported`): a CUDA device of sm_90+ (or the Triton interpreter), x and W row-major with 16-byte
aligned rows and base pointers, M <= MAX_M. No SwiGLU prologue (the caller runs silu_and_mul first) and no RMSNorm
prologue (a norm kernel first), as cuBLAS is called.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.kernels.triton.pdl import launch, pdl_enter

MAX_M = 64


@triton.jit
def _skinny_tma_kernel(
    x_desc, w_desc, b_ptr, y_ptr, r_ptr, M, N, K, stride_ym, stride_rm,
    HAS_BIAS: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # x and the residual belong to earlier kernels
        pdl_enter(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # software-pipelined num_stages deep (a launch option)
        w = w_desc.load([n0, k0])  # [BLOCK_N, BLOCK_K]
        xv = x_desc.load([0, k0])  # [BLOCK_M, BLOCK_K], rows past M zero-filled
        acc = tl.dot(w, tl.trans(xv), acc, input_precision=PREC)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_m < M)[None, :]
    ty = y_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if RES:  # as F.linear then the x.dtype residual add: round, add, round
        r = tl.load(r_ptr + offs_m[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
        acc = acc.to(ty).to(tl.float32) + r
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(ty), mask=mask)


def supported(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """None when skinny_tma runs x [M, K] @ w [N, K]^T, else why not."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if not interp:
        if not x.is_cuda:
            return "not a CUDA tensor"
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return "TMA needs sm_90+"
    if x.shape[0] > MAX_M:
        return f"M = {x.shape[0]} > {MAX_M}"
    for name, t in (("x", x), ("w", w)):
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name} rows are not 16-byte aligned and contiguous"
    return None


def skinny_tma(
    x: torch.Tensor,
    w: torch.Tensor,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]) (+ residual [M, N], added after rounding to x.dtype); out may
    be the residual itself."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from engine.kernels.triton.gemv import epilogue_out

    m, k = x.shape
    n = w.shape[0]
    assert w.shape[1] == k and x.dtype == w.dtype, f"x {tuple(x.shape)} {x.dtype} vs w {tuple(w.shape)} {w.dtype}"
    why = supported(x, w)
    assert why is None, why
    out = epilogue_out(x, n, bias, residual, out)
    block_m = max(16, triton.next_power_of_2(m))
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, block_k])
    w_desc = TensorDescriptor(w, [n, k], [w.stride(0), 1], [block_n, block_k])
    _skinny_tma_kernel[(triton.cdiv(n, block_n),)](
        x_desc, w_desc, bias if bias is not None else w, out, residual if residual is not None else out, m, n, k,
        out.stride(0), residual.stride(0) if residual is not None else 0,
        HAS_BIAS=bias is not None, RES=residual is not None, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, **launch(),
    )  # fmt: skip
    return out
