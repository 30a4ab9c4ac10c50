"""Kernel cases for Triton's CPU interpreter. TRITON_INTERPRET must be set before triton is first imported, so the
CPU kernel tests run these in one child process (`python -m tests.engine.quant.interp_cases < cases.json`), or in
the test process itself when it was started with TRITON_INTERPRET=1."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

FLOOR = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 4e-3}


def error_and_bound(out: torch.Tensor, x: torch.Tensor, w_deq: torch.Tensor, b=None) -> tuple[float, float]:
    """|kernel - ref64| and its bound 2 * |torch same precision - ref64| + floor (w_deq: float32 [N, K]; b: the
    bias the kernel added, so the bound includes its rounding)."""
    ref = x.double() @ w_deq.double().T + (0 if b is None else b.double())
    same = F.linear(x, w_deq.to(x.dtype), b).double()
    if not torch.isfinite(out).all():
        return float("inf"), 0.0
    err = (out.double() - ref).abs().max().item()
    floor = FLOOR[str(x.dtype).removeprefix("torch.")] * ref.abs().max().item()
    return err, 2 * (same - ref).abs().max().item() + floor


def run_case(
    kind: str,
    n: int,
    k: int,
    m: int,
    dtype: str,
    group: int = 128,
    bias: bool = False,
    device: str = "cpu",
    seed: int = 0,
    act_order: bool = False,
    config: list | dict | None = None,
) -> tuple[float, float]:
    """(error, bound) of one kernel call on fresh random inputs. kind: int4_gemv | int4_gemm | int4_matmul |
    int4_cuda | int4_mma | int4_dequant | nf4_gemv; config: the launcher's config (GemvConfig / GemmConfig fields as a list or dict; None: default)."""
    from engine.kernels.triton.int4_gemm import int4_gemm, int4_matmul
    from engine.kernels.triton.int4_gemv import int4_gemv
    from engine.kernels.triton.nf4_gemv import nf4_gemv
    from engine.quant.int4 import dequantize, quantize_rtn
    from engine.quant.nf4 import code_table, dequantize_nf4, quantize_nf4

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(device, dt)
    b = torch.randn(n, generator=g).to(device, dt) if bias else None
    if kind == "nf4_gemv":
        p = quantize_nf4(w)
        out = nf4_gemv(x, p.qweight.to(device), p.absmax.to(device), code_table(device), config=config, bias=b)
        if b is not None:
            out = out - b
        return error_and_bound(out, x, dequantize_nf4(p).to(device))
    p = quantize_rtn(w, group).to(device, dt)
    if act_order:  # a random act-order grouping: G channels per group, scattered over K
        perm = torch.randperm(k, generator=g)
        p.g_idx = (torch.arange(k) // group)[torch.argsort(perm)].to(device, torch.int32)
    if kind == "int4_matmul":
        out = int4_matmul(x, p.qweight, p.scales, p.zeros, group, bias=b, g_idx=p.g_idx)
    elif kind == "int4_dequant":  # engine/kernels/triton/int4_dequant.py, then F.linear (the prefill path)
        from engine.kernels.triton.int4_dequant import int4_dequantize

        out = F.linear(x, int4_dequantize(p.qweight, p.scales, p.zeros, group, p.g_idx, x.dtype), b)
    elif kind in ("int4_cuda", "int4_mma"):  # engine/kernels/csrc/int4_gemv.cu / int4_mma.cu (CUDA only)
        from engine.kernels import ext

        fn = ext.int4_gemv if kind == "int4_cuda" else ext.int4_mma
        out = fn(x, p.qweight, p.scales, p.zeros, group, bias=b)
    else:
        fn = {"int4_gemv": int4_gemv, "int4_gemm": int4_gemm}[kind]
        out = fn(x, p.qweight, p.scales, p.zeros, group, bias=b, config=config, g_idx=p.g_idx)
    return error_and_bound(out, x, dequantize(p), b)


def main() -> None:
    cases = json.load(sys.stdin)
    print(json.dumps([run_case(**c) for c in cases]))


if __name__ == "__main__":
    main()
