"""Dequant GEMM y[M, N] = x[M, K] @ W^T for prefill / larger batches, W in Anvil's packed int4 format
(engine/quant/int4.py: qweight int32 [N, K/8], nibble j of word w = column 8w + j; scales / zeros [N, K/G]).

It runs the kernel body of int4_gemv.py (`_wq_mm_kernel`) in its tl.dot mode with larger BLOCK_M tiles, the
grouped launch order (programs that run together share W tiles in L2) and software pipelining (num_stages):
each group's [BLOCK_N, G/8] words are loaded once and split into nibble slices that go to the tensor cores as
1 + q/16 (bit tricks, no int->float conversion) against the strided x columns, the group's scale / zero applied
once per output (see int4_gemv.py); with grouped=False, per-word scaled slices instead. float32 accumulation; the
weights are never expanded in memory.

`int4_matmul` is the dispatcher the engine calls: the per-device table (int4_gemv.table_entry) when it has the
shape, else the decode kernel for M <= DECODE_M and this GEMM above.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.kernels.triton.int4_gemv import DECODE_M, GEMV_MAX_M, check_int4_args, int4_gemv, launch, table_entry


class GemmConfig(NamedTuple):
    """Launch config of the GEMM (block_k: a power of two >= 128, as the nibble slices need BLOCK_K/8 >= 16)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    warps: int = 4
    stages: int = 3
    split_k: int = 1
    group_m: int = 8
    grouped: bool = True  # see GemvConfig
    asm: bool = True  # see GemvConfig


def gemm_config(m: int, n: int, k: int, group_size: int) -> GemmConfig:
    """The heuristic GEMM config by M bucket (untuned; the sweep's table overrides it)."""
    del n, k, group_size
    if m <= 32:
        return GemmConfig(32, 64, 256, 4, 3)
    if m <= 64:
        return GemmConfig(64, 64, 128, 8, 3)
    return GemmConfig(128, 128, 128, 8, 3, grouped=False)  # the per-group accumulator would spill at this tile


def as_gemm_config(c) -> GemmConfig:
    """GemmConfig from a GemmConfig, a dict of its fields or a tuple in field order (the old 5-tuple works;
    a block_k below 128 is raised to 128)."""
    if isinstance(c, GemmConfig):
        out = c
    elif isinstance(c, dict):
        out = GemmConfig(**c)
    else:
        out = GemmConfig(*c)
    return out._replace(block_k=max(out.block_k, 128))


def int4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config=None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16; fp32 uses IEEE dots) -> y [M, N] in x.dtype. config: a GemmConfig (dict / tuple)."""
    m, n, k = check_int4_args(x, qweight, scales, zeros, group_size, g_idx)
    if config is None:
        e = table_entry("int4", m, n, k, x.device)
        config = e["config"] if e and e.get("kernel") == "gemm" else gemm_config(m, n, k, group_size)
    c = as_gemm_config(config)
    return launch(x, qweight, scales, zeros, g_idx, bias, m, n, k, group_size, nf4=False, dot=True,
                  block_m=max(c.block_m, 16), block_n=c.block_n, block_k=c.block_k, split_k=c.split_k, warps=c.warps,
                  stages=c.stages, group_m=c.group_m, grouped=c.grouped, asm=c.asm)  # fmt: skip


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The table's kernel and config for (M, N, K) when it has one, else the decode kernel for M <= DECODE_M and
    the GEMM above."""
    m, n, k = x.shape[0], qweight.shape[0], x.shape[-1]
    e = table_entry("int4", m, n, k, x.device)
    if e is not None and e.get("kernel") == "gemm":
        return int4_gemm(x, qweight, scales, zeros, group_size, bias, config=e["config"], g_idx=g_idx)
    if e is not None and m <= GEMV_MAX_M:
        return int4_gemv(x, qweight, scales, zeros, group_size, bias, config=e["config"], g_idx=g_idx)
    fn = int4_gemv if m <= DECODE_M else int4_gemm
    return fn(x, qweight, scales, zeros, group_size, bias, g_idx=g_idx)
