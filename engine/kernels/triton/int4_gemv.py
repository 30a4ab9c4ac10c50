"""Fused dequant matmul y[M, N] = x[M, K] @ W^T for decode (small M), W in Anvil's packed int4 format
(engine/quant/int4.py): qweight int32 [N, K/8] (nibble j = bits 4j..4j+3 of word w is column 8w + j), scales /
zeros [N, K/G] in the model dtype, optional g_idx int32 [K] (act-order), optional bias [N]. The same kernel body
serves the prefill GEMM (int4_gemm.py, larger BLOCK_M) and the NF4 GEMV (nf4_gemv.py, NF4=True).

Design (decode is memory bound: the goal is many weight bytes in flight and few instructions per nibble):
- Program (pid_mn, pid_s) owns BLOCK_N output rows (and BLOCK_M rows of x) and the K tiles
  [pid_s * TILES, (pid_s + 1) * TILES) of BLOCK_K columns each (BLOCK_K up to 1024: several groups per tile).
- Split-K (SPLIT > 1, a runtime argument): small-N shapes get SPLIT programs along K; each writes an fp32
  partial [SPLIT, M, N] and `_splitk_reduce` sums them (+ bias, cast). Deterministic; no atomics, no memset.
- No int->float conversions and no [BN, BK/8, 8] -> [BN, BK] reshape: nibble j of all words of a tile is its own
  slice, matched with the strided x columns x[m, 8w + j] (x is tiny and stays in L1 / L2). A nibble becomes a
  float by bit tricks: (q << 19) | 0x3F800000 is the float32 1 + q/16 (`_unit_nibble`: a shift and one lop3),
  and one lop3 builds the bf16 / fp16 pair (1 + q_j/16, 1 + q_j+4/16) in one register (`_unit_pair`). With
  u = 1 + q/16, sum_k (q_k - z) x_k = 16 * sum_k u_k x_k - (16 + z) * sum_k x_k, so the zero and the scale are
  applied once per word (FMA path) or once per group and output (dot path), never per weight.
- grouped=True (default; G a power of two <= BLOCK_K, no g_idx):
  FMA path (M == 1, `_tile_groups`): ONE [BLOCK_N, BLOCK_K/G, G/8] int32 load per tile, the [BLOCK_N, groups]
  scales / zeros broadcast over a group's words; per nibble: shift, lop3, FMA.
  Dot path (`_tile_groups_dot`, G >= 128): per group a [BLOCK_N, G/8] load, 8 tl.dot's of x (padded to
  BLOCK_M >= 16 rows: tensor cores, so M = 1..BLOCK_M cost about the same) against the unscaled u slices,
  fp32 accumulation, then acc += s * (16 * dot - (16 + z) * sum_k x).
- grouped=False (`_tile_words`, also the g_idx and odd-G path): [BLOCK_N, BLOCK_K/8] word tiles with per-word
  scale / zero gathers (L1-resident), or per-nibble gathers through g_idx (act-order, slower); the dot path
  scales each slice and rounds it to x.dtype.
- NF4 (NF4=True): the nibble indexes the 16-entry code book (L1) and the absmax is applied per word / group.
- asm=True: the lop3's are inline PTX (the compiler otherwise emits an and plus an or); off under the
  interpreter, where the same values come from plain integer ops.

Launch configs (GemvConfig) come from an optional per-device table (int4_configs.json next to this file, written
from `benchmarks/bench_int4.py --sweep`; env ANVIL_INT4_CONFIGS names another file), else from `gemv_config`'s
heuristic. This file states the design; measured speeds live in results/ and the sweep's JSON.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 32  # int4_gemv takes M <= this many rows
DECODE_M = 16  # int4_matmul's default switch to the GEMM above this M (the config table may say otherwise)
CONFIG_FILE = Path(__file__).with_name("int4_configs.json")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # no inline PTX under the interpreter


class GemvConfig(NamedTuple):
    """Launch config of the decode kernel. split_k: 0 = pick from the grid size, 1 = off, s = s K-splits.
    dot: tl.dot on x padded to block_m rows (any M <= block_m); False: FMA reduction (M == 1 only).
    grouped: [BLOCK_N, groups, G/8] word tiles with broadcast scales (else per-word scale gathers; g_idx and
    non-power-of-two G always use the latter). asm: the inline-PTX lop3 of the FMA path's nibble unpack (CUDA)."""

    block_n: int = 32
    block_k: int = 512
    split_k: int = 0
    warps: int = 4
    stages: int = 1
    dot: bool = False
    block_m: int = 16
    grouped: bool = True
    asm: bool = True


@triton.jit
def _nibbles(qw, j: tl.constexpr, NF4: tl.constexpr, code_ptr):
    """Nibble j of every word: float32 2^23 + q (int4: the magic-number trick, exact) or code[q] (NF4)."""
    nib = (qw >> (4 * j)) & 0xF
    if NF4:
        v = tl.load(code_ptr + nib)  # the 16-entry code book (64 bytes, L1)
    else:
        v = (nib | 0x4B000000).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _unit_nibble(qw, j: tl.constexpr, ASM: tl.constexpr):
    """Nibble j of every word as float32 1 + q/16: q shifted into mantissa bits 19..22 under 1.0's exponent (exact;
    bf16 / fp16 hold it exactly too). ASM: the mask-and-or as one lop3 ((a & b) | c, LUT 0xEA), so a nibble costs
    a shift and one logic op (the compiler otherwise emits two)."""
    if 4 * j >= 19:
        sh = qw >> (4 * j - 19)
    else:
        sh = qw << (19 - 4 * j)
    if ASM:
        u = tl.inline_asm_elementwise("lop3.b32 $0, $1, 7864320, 1065353216, 0xEA;", "=r,r", [sh], dtype=tl.int32,
                                      is_pure=True, pack=1)  # fmt: skip
    else:
        u = (sh & 0x780000) | 0x3F800000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _unit_pair(qw, j: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr):
    """Nibbles j and j + 4 (j < 4) of every word as DT values 1 + q/16 (exact in bf16 / fp16 / fp32). ASM (bf16 /
    fp16): one shift and one lop3 build both 16-bit values in one register (nibble j in the low half, j + 4 in
    the high half, each under the exponent of 1.0), split by a mov."""
    if ASM and DT == tl.bfloat16:  # q to bits 3..6 of each half (bf16 mantissa: 7 bits)
        if 4 * j >= 3:
            sh = qw >> (4 * j - 3)
        else:
            sh = qw << 3
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, 7864440, 1065369472, 0xEA; mov.b32 {$0, $1}, t; }", "=h,=h,r", [sh],
            dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)  # fmt: skip
    elif ASM and DT == tl.float16:  # q to bits 6..9 of each half (fp16 mantissa: 10 bits)
        if 4 * j >= 6:
            sh = qw >> (4 * j - 6)
        else:
            sh = qw << (6 - 4 * j)
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, 62915520, 1006648320, 0xEA; mov.b32 {$0, $1}, t; }", "=h,=h,r", [sh],
            dtype=(tl.float16, tl.float16), is_pure=True, pack=1)  # fmt: skip
    else:
        lo = _unit_nibble(qw, j, ASM).to(DT)
        hi = _unit_nibble(qw, j + 4, ASM).to(DT)
    return lo, hi


@triton.jit
def _tile_groups_dot(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n, mask_n, K, KW, NG,
                     G: tl.constexpr, NF4: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """One K tile, one group at a time (G >= 128: a group's G/8 words are the dots' K): int4 nibbles go to the
    tensor cores as unscaled 1 + q/16 (no per-element scale / zero math), and the group's result is fixed once:
    acc += s * (16 * dot - (16 + z) * sum_k x). NF4: code values, scaled by the absmax after the dot."""
    GW: tl.constexpr = G // 8
    NGT: tl.constexpr = BLOCK_K // G
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_gw = tl.arange(0, GW)
    for g in tl.static_range(NGT):
        gi = t * NGT + g
        w = gi * GW + offs_gw  # word index [GW]
        mask_w = w < KW
        qw = tl.load(qw_ptr + offs_n[:, None] * KW + w[None, :], mask=mask_n[:, None] & mask_w[None, :], other=0,
                     eviction_policy="evict_first")  # fmt: skip
        mask_sg = mask_n & (gi < NG)
        sg = tl.load(s_ptr + offs_n * NG + gi, mask=mask_sg, other=0.0).to(tl.float32)
        mask_x = mask_m[:, None] & mask_w[None, :]
        x_rows = x_ptr + offs_m[:, None] * K + (w * 8)[None, :]
        d = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if NF4:
            for j in tl.static_range(8):
                v = _nibbles(qw, j, NF4, z_ptr).to(DT)
                xj = tl.load(x_rows + (j + 1 - 2 * (j % 2)), mask=mask_x, other=0.0)
                d = tl.dot(xj, tl.trans(v), d, input_precision=PREC)
            acc += d * sg[None, :]
        else:
            zg = tl.load(z_ptr + offs_n * NG + gi, mask=mask_sg, other=0.0).to(tl.float32)
            kx = gi * G + tl.arange(0, G)
            xg = tl.load(x_ptr + offs_m[:, None] * K + kx[None, :], mask=mask_m[:, None] & (kx < K)[None, :], other=0.0)
            xs = tl.sum(xg.to(tl.float32), axis=1)  # [BM]: sum_k x over the group
            for j in tl.static_range(4):
                lo, hi = _unit_pair(qw, j, ASM, DT)
                x_lo = tl.load(x_rows + j, mask=mask_x, other=0.0)
                x_hi = tl.load(x_rows + (j + 4), mask=mask_x, other=0.0)
                d = tl.dot(x_lo, tl.trans(lo), d, input_precision=PREC)
                d = tl.dot(x_hi, tl.trans(hi), d, input_precision=PREC)
            acc += (d * 16.0 - xs[:, None] * (zg + 16.0)[None, :]) * sg[None, :]
    return acc


@triton.jit
def _tile_groups(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, K, KW, NG, G: tl.constexpr, NF4: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """FMA path (M == 1), one K tile as [BLOCK_N, groups, G/8] words: the [BLOCK_N, groups] scales / zeros
    broadcast over a group's words (no per-word gathers). Needs G a power of two <= BLOCK_K and no g_idx."""
    GW: tl.constexpr = G // 8
    NGT: tl.constexpr = BLOCK_K // G
    gi = t * NGT + tl.arange(0, NGT)  # group index [NGT]
    w3 = gi[:, None] * GW + tl.arange(0, GW)[None, :]  # word index [NGT, GW]
    mask_w3 = w3 < KW
    qw = tl.load(qw_ptr + offs_n[:, None, None] * KW + w3[None, :, :], mask=mask_n[:, None, None] & mask_w3[None, :, :],
                 other=0, eviction_policy="evict_first")  # fmt: skip
    mask_g = mask_n[:, None] & (gi < NG)[None, :]
    s = tl.load(s_ptr + offs_n[:, None] * NG + gi[None, :], mask=mask_g, other=0.0).to(tl.float32)[:, :, None]
    if not NF4:
        z = tl.load(z_ptr + offs_n[:, None] * NG + gi[None, :], mask=mask_g, other=0.0).to(tl.float32)[:, :, None]
    part = tl.zeros([BLOCK_N, NGT, GW], tl.float32)
    xs = tl.zeros([NGT, GW], tl.float32)
    for j in tl.static_range(8):
        if NF4:  # the high nibble of a byte is the even element (j ^ 1)
            xj = tl.load(x_ptr + w3 * 8 + (j + 1 - 2 * (j % 2)), mask=mask_w3, other=0.0).to(tl.float32)
            part += _nibbles(qw, j, NF4, z_ptr) * xj[None, :, :]
        else:  # sum_j (1 + q_j/16) x_j: one FMA per nibble, the zero folded in per word below
            xj = tl.load(x_ptr + w3 * 8 + j, mask=mask_w3, other=0.0).to(tl.float32)
            part += _unit_nibble(qw, j, ASM) * xj[None, :, :]
            xs += xj
    if NF4:
        acc += part * s  # the scale once per word
    else:  # sum_j (q_j - z) x_j = 16 * part - (16 + z) * sum_j x_j, then the scale, once per word
        acc += (part * 16.0 - (z + 16.0) * xs[None, :, :]) * s
    return acc


@triton.jit
def _tile_words(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, offs_m, mask_m, offs_n, mask_n, K, KW, NG,
                G: tl.constexpr, NF4: tl.constexpr, HAS_GIDX: tl.constexpr, USE_DOT: tl.constexpr,
                PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """One K tile as [BLOCK_N, BLOCK_K/8] words; scales / zeros gathered per word (any G), or per nibble from
    g_idx (act-order)."""
    BKW: tl.constexpr = BLOCK_K // 8
    w = t * BKW + tl.arange(0, BKW)  # word index [BKW]
    mask_w = w < KW
    mask = mask_n[:, None] & mask_w[None, :]
    qw = tl.load(qw_ptr + offs_n[:, None] * KW + w[None, :], mask=mask, other=0, eviction_policy="evict_first")
    if not HAS_GIDX:
        sz = offs_n[:, None] * NG + ((w * 8) // G)[None, :]  # one group per word (8 divides G)
        s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        if not NF4:
            z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    FOLD: tl.constexpr = not USE_DOT and not NF4 and not HAS_GIDX  # the folded-zero FMA form of _tile_groups
    if not USE_DOT:
        part = tl.zeros([BLOCK_N, BKW], tl.float32)
        xs = tl.zeros([BKW], tl.float32)
    for j in tl.static_range(8):
        if FOLD:
            v = _unit_nibble(qw, j, ASM)
        else:
            v = _nibbles(qw, j, NF4, z_ptr)
        if NF4:
            jj = j + 1 - 2 * (j % 2)
        else:
            jj = j
        kj = w * 8 + jj
        if HAS_GIDX:
            gk = tl.load(gi_ptr + kj, mask=mask_w, other=0)
            sz_j = offs_n[:, None] * NG + gk[None, :]
            s_j = tl.load(s_ptr + sz_j, mask=mask, other=0.0).to(tl.float32)
            if NF4:
                v = v * s_j
            else:
                z_j = tl.load(z_ptr + sz_j, mask=mask, other=0.0).to(tl.float32) + 8388608.0
                v = (v - z_j) * s_j
        elif not NF4 and not FOLD:
            v = v - (z + 8388608.0)  # q - zero, exact
        if USE_DOT:
            if not HAS_GIDX:
                v = v * s
            xj = tl.load(x_ptr + offs_m[:, None] * K + kj[None, :], mask=mask_m[:, None] & mask_w[None, :],
                         other=0.0)  # fmt: skip
            acc = tl.dot(xj, tl.trans(v.to(xj.dtype)), acc, input_precision=PREC)
        else:
            xj = tl.load(x_ptr + kj, mask=mask_w, other=0.0).to(tl.float32)  # M == 1
            part += v * xj[None, :]
            if FOLD:
                xs += xj
    if not USE_DOT:
        if HAS_GIDX:
            acc += part
        elif FOLD:
            acc += (part * 16.0 - (z + 16.0) * xs[None, :]) * s
        else:
            acc += part * s  # the scale once per word
    return acc


@triton.jit(do_not_specialize=["M", "SPLIT", "TILES"])  # KW / NG specialize: K % 128 == 0 -> 16 | KW
def _wq_mm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, b_ptr, y_ptr, p_ptr, M, N, K, KW, NG, SPLIT, TILES,
    G: tl.constexpr, NF4: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    GROUPED: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """y[M, N] (or fp32 partial p[SPLIT, M, N]) for int4 (z_ptr: zeros) or NF4 (z_ptr: the 16-entry code book,
    s_ptr: absmax, G = 64, nibble j of a little-endian word is element 8w + (j ^ 1))."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n  # grouped order (Triton's matmul tutorial): neighbours share W tiles in L2
    first_m = (pid // width) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    t0 = pid_s * TILES
    t1 = min(t0 + TILES, tl.cdiv(K, BLOCK_K))
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    elif GROUPED:
        acc = tl.zeros([BLOCK_N, BLOCK_K // G, G // 8], tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
    for t in range(t0, t1):
        if GROUPED and USE_DOT:
            acc = _tile_groups_dot(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n, mask_n, K, KW, NG,
                                   G, NF4, PREC, BLOCK_M, BLOCK_N, BLOCK_K, ASM)  # fmt: skip
        elif GROUPED:
            acc = _tile_groups(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, K, KW, NG, G, NF4, BLOCK_N, BLOCK_K,
                               ASM)  # fmt: skip
        else:
            acc = _tile_words(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, offs_m, mask_m, offs_n, mask_n, K, KW, NG,
                              G, NF4, HAS_GIDX, USE_DOT, PREC, BLOCK_N, BLOCK_K, ASM)  # fmt: skip
    if not USE_DOT and GROUPED:
        acc = tl.sum(acc, axis=2)
    if USE_DOT:
        out = acc
        omask = mask_m[:, None] & mask_n[None, :]
        ooff = offs_m[:, None] * N + offs_n[None, :]
    else:
        out = tl.sum(acc, axis=1)
        omask = mask_n
        ooff = offs_n
    if SPLIT > 1:
        tl.store(p_ptr + pid_s * M * N + ooff, out, mask=omask)
    else:
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if USE_DOT:
                out += bias[None, :]
            else:
                out += bias
        tl.store(y_ptr + ooff, out.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["MN", "SPLIT"])
def _splitk_reduce(p_ptr, b_ptr, y_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_split(split_k: int, programs: int, n_tiles: int, device: torch.device) -> int:
    """The K split: split_k if given (capped at the tile count), else enough to give ~4 programs per SM."""
    if split_k <= 0:
        split_k = max(1, (4 * _num_sms(device)) // max(programs, 1))
    return max(1, min(split_k, n_tiles))


def launch(x, qweight, scales, zeros_or_code, g_idx, bias, m, n, k, group_size, *, nf4: bool, dot: bool,
           block_m: int, block_n: int, block_k: int, split_k: int, warps: int, stages: int,
           group_m: int = 8, grouped: bool = True, asm: bool = True) -> torch.Tensor:  # fmt: skip
    """Run `_wq_mm_kernel` (+ the split-K reduction); returns y [M, N] in x.dtype."""
    assert dot or m == 1, "the FMA (dot=False) config takes M == 1 only"
    assert block_k >= 128 and block_k & (block_k - 1) == 0, "block_k: a power of two >= 128"
    grouped = grouped and g_idx is None and group_size & (group_size - 1) == 0 and group_size <= block_k
    grouped = grouped and (not dot or group_size >= 128)  # a group's words are the dots' K (>= 16)
    bm = max(block_m, 16)  # the FMA path ignores it (M == 1: one M tile either way)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    n_tiles = triton.cdiv(k, block_k)
    programs = triton.cdiv(m, bm) * triton.cdiv(n, block_n)
    split = pick_split(split_k, programs, n_tiles, x.device)
    tiles = triton.cdiv(n_tiles, split)
    split = triton.cdiv(n_tiles, tiles)  # no empty splits
    part = torch.empty(
        split if split > 1 else 1, m if split > 1 else 1, n if split > 1 else 1, device=x.device, dtype=torch.float32
    )  # fp32 either way: one compiled kernel for split and no split
    _wq_mm_kernel[(programs, split)](
        x, qweight, scales, zeros_or_code, qweight if g_idx is None else g_idx, y if bias is None else bias, y, part,
        m, n, k, k // 8, k // group_size, split, tiles,  # KW, NG as arguments: their divisibility is known
        G=group_size, NF4=nf4, HAS_GIDX=g_idx is not None, HAS_BIAS=bias is not None, USE_DOT=dot,
        GROUPED=grouped, PREC="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=group_m, ASM=asm and x.is_cuda and not INTERPRET, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _splitk_reduce[(triton.cdiv(m * n, block),)](
            part, y if bias is None else bias, y, m * n, n, split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4
        )
    return y


# ------------------------------------------------------------------------------------------- config table
@functools.lru_cache(maxsize=4)
def _load_table(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text()).get("devices", {})
    except (OSError, ValueError):
        return {}


def lookup_entry(devices: dict, device_name: str, kind: str, m: int, n: int, k: int) -> dict | None:
    """The entry of `devices` (the table's "devices" object) for this device name, kind ("int4" | "nf4") and
    (N, K) with the smallest M >= m, or None. Entry: {"M", "N", "K", "kernel": "gemv" | "gemm", "config":
    {GemvConfig or GemmConfig fields}} (benchmarks/bench_int4.py --sweep writes them)."""
    rows = devices.get(device_name, {}).get(kind, [])
    fits = [r for r in rows if r.get("N") == n and r.get("K") == k and r.get("M", 0) >= m and "config" in r]
    return min(fits, key=lambda r: r["M"]) if fits else None


@functools.lru_cache(maxsize=4096)
def _cached_entry(path: str, device: torch.device, kind: str, m: int, n: int, k: int) -> dict | None:
    devices = _load_table(path)
    return lookup_entry(devices, torch.cuda.get_device_name(device), kind, m, n, k) if devices else None


def table_entry(kind: str, m: int, n: int, k: int, device: torch.device) -> dict | None:
    """The config table's entry for this call (see lookup_entry); None off CUDA or without a table."""
    if device.type != "cuda":
        return None
    return _cached_entry(os.environ.get("ANVIL_INT4_CONFIGS", str(CONFIG_FILE)), device, kind, m, n, k)


# ------------------------------------------------------------------------------------------------ int4 API
def check_int4_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> tuple[int, int, int]:
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


def gemv_config(m: int, n: int, k: int, group_size: int) -> GemvConfig:
    """The heuristic decode config (untuned; the sweep's table overrides it): FMA for M == 1, tl.dot with x padded
    to 16 (32) rows above; split_k=0 lets `pick_split` fill the SMs."""
    del n, group_size
    bk = 512 if k >= 512 else 256 if k >= 256 else 128
    if m == 1:
        return GemvConfig(block_n=32, block_k=bk, split_k=0, warps=4, stages=1, dot=False)
    return GemvConfig(block_n=64, block_k=min(bk, 256), split_k=0, warps=4, stages=1, dot=True,
                      block_m=16 if m <= 16 else 32)  # fmt: skip


def as_gemv_config(c) -> GemvConfig:
    """GemvConfig from a GemvConfig, a dict of its fields or a tuple in field order."""
    if isinstance(c, GemvConfig):
        return c
    if isinstance(c, dict):
        return GemvConfig(**c)
    return GemvConfig(*c)


def int4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config=None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M <= 32, K] (bf16/fp16/fp32) -> y [M, N] in x.dtype. config: a GemvConfig (or its dict / tuple);
    default: the device table's entry, else `gemv_config`."""
    m, n, k = check_int4_args(x, qweight, scales, zeros, group_size, g_idx)
    assert 1 <= m <= GEMV_MAX_M, f"int4_gemv takes M <= {GEMV_MAX_M} rows (got {m}); use int4_gemm"
    if config is None:
        e = table_entry("int4", m, n, k, x.device)
        config = e["config"] if e and e.get("kernel", "gemv") == "gemv" else gemv_config(m, n, k, group_size)
    c = as_gemv_config(config)
    dot = c.dot or m > 1
    return launch(x, qweight, scales, zeros, g_idx, bias, m, n, k, group_size, nf4=False, dot=dot,
                  block_m=max(c.block_m, triton.next_power_of_2(m), 16), block_n=c.block_n, block_k=c.block_k,
                  split_k=c.split_k, warps=c.warps, stages=c.stages, grouped=c.grouped, asm=c.asm)  # fmt: skip
