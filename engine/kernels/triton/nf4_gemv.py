"""Fused NF4 dequant GEMV y[M, N] = x[M, K] @ W^T (+ bias) for decode (M <= 32), W in engine/quant/nf4.py's layout:
qweight uint8 [N, K/2] (element 2i in the high nibble), absmax float32 [N, K/64], a 16-entry float32 code book.

The kernel body is int4_gemv.py's `_wq_mm_kernel` with NF4=True: qweight is reinterpreted (no copy) as int32
[N, K/8] little-endian words, so nibble j (bits 4j..4j+3) of word w is element 8w + (j ^ 1); each nibble is
looked up in the code book (64 bytes, L1-resident) and scaled by its block's absmax once per word (FMA path,
M == 1) or per slice (tl.dot path, x padded to BLOCK_M >= 16 rows). Same tiling, split-K and config table
("nf4" rows of int4_configs.json) as the int4 kernel. Larger M: NF4LinearMethod dequantizes and calls F.linear.
"""

from __future__ import annotations

import torch
import triton

from engine.kernels.triton.int4_gemv import GEMV_MAX_M, as_gemv_config, gemv_config, launch, table_entry

NF4_BLOCK = 64


def nf4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    config=None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M <= 32, K] -> y [M, N] in x.dtype. absmax float32 [N, K/64], code float32 [16]. config: a GemvConfig
    (or its dict / tuple); default: the device table's "nf4" entry, else int4_gemv's heuristic."""
    assert x.dim() == 2 and x.is_contiguous(), "x must be a contiguous [M, K] tensor"
    assert x.is_cuda or x.device.type == "cpu", "Triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
    m, k = x.shape
    n = qweight.shape[0]
    assert 1 <= m <= GEMV_MAX_M, f"nf4_gemv takes M <= {GEMV_MAX_M} rows (got {m})"
    assert k % NF4_BLOCK == 0, f"K {k} must be a multiple of {NF4_BLOCK}"
    assert qweight.dtype == torch.uint8 and qweight.shape == (n, k // 2) and qweight.is_contiguous()
    assert absmax.dtype == torch.float32 and absmax.shape == (n, k // NF4_BLOCK) and absmax.is_contiguous()
    assert code.dtype == torch.float32 and code.numel() == 16
    assert qweight.device == x.device == absmax.device == code.device, "all tensors on one device"
    if config is None:
        e = table_entry("nf4", m, n, k, x.device)
        config = e["config"] if e else gemv_config(m, n, k, NF4_BLOCK)
    c = as_gemv_config(config)
    words = qweight.view(torch.int32)  # [N, K/8], little-endian bytes
    return launch(x, words, absmax, code, None, bias, m, n, k, NF4_BLOCK, nf4=True, dot=c.dot or m > 1,
                  block_m=max(c.block_m, triton.next_power_of_2(m), 16), block_n=c.block_n, block_k=c.block_k,
                  split_k=c.split_k, warps=c.warps, stages=c.stages, grouped=c.grouped, asm=c.asm)  # fmt: skip
