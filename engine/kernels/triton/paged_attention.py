"""Split-KV (flash-decoding) paged decode attention in Triton, with its launcher; oracle: reference_paged.py.

One program per (sequence, KV head, split): it loads the GROUP query heads that share the KV head (GQA) once,
walks its share of the sequence's tokens through the block table, and writes a normalised partial output plus
its log-sum-exp. A second kernel merges the splits. The grid is fixed by (B, Hkv, num_splits) and each program
derives its token range from seq_lens on the device, so one CUDA graph serves every sequence length.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from engine.kernels.triton.pdl import launch, pdl_enter
from engine.kernels.triton.prefetch import BLOCK as PF_BLOCK
from engine.kernels.triton.prefetch import num_lines, spread_prefetch


@triton.jit
def _merge_splits(o_base, lse_base, out_base, stride_oh, stride_os, stride_lh, stride_outh, n_heads, n_splits,
                  offs_d, mask_d, HEADS_PAD: tl.constexpr, SPLITS_BLOCK: tl.constexpr):  # fmt: skip
    """out[h, :D] = the first n_splits partials o[h, s, :D] weighted by exp(lse[h, s]) (zeros for a row without
    keys), for the n_heads heads h from the given bases at once, SPLITS_BLOCK splits per load (an online rescale
    across loads): the merge kernel's (one head) and the split kernel's fused merge (the GROUP heads of a KV head).
    Blocks past the last split with keys change nothing (weights 0, rescale 1), bit for bit."""
    offs_h = tl.arange(0, HEADS_PAD)
    mask_h = offs_h < n_heads
    m = tl.full([HEADS_PAD], float("-inf"), tl.float32)
    den = tl.zeros([HEADS_PAD], tl.float32)
    acc = tl.zeros([HEADS_PAD, offs_d.shape[0]], tl.float32)
    for s0 in range(0, n_splits, SPLITS_BLOCK):
        offs_s = s0 + tl.arange(0, SPLITS_BLOCK)
        mask_hs = mask_h[:, None] & (offs_s < n_splits)[None, :]
        lse = tl.load(lse_base + offs_h[:, None] * stride_lh + offs_s[None, :], mask=mask_hs, other=float("-inf"))
        o = tl.load(o_base + offs_h[:, None, None] * stride_oh + offs_s[None, :, None] * stride_os
                    + offs_d[None, None, :], mask=mask_hs[:, :, None] & mask_d[None, None, :], other=0.0)  # fmt: skip
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)  # 0 on the first block
        w = tl.exp(lse - m_safe[:, None])  # [Hp, S]; 0 for empty splits
        den = den * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        m = m_new
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    tl.store(out_base + offs_h[:, None] * stride_outh + offs_d[None, :], out.to(out_base.dtype.element_ty),
             mask=mask_h[:, None] & mask_d[None, :])  # fmt: skip


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
    scale, window,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    out_ptr, cnt_ptr, stride_outb, stride_outh, num_kv_heads, min_chunk,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PREC: tl.constexpr,
    FUSED: tl.constexpr, SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr,
    pf_ptr=None, pf_lines=0, PF: tl.constexpr = False, PF_BLOCK: tl.constexpr = 256,
):  # fmt: skip
    if PDL:
        pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(lens_ptr + b)
    lo = tl.where(window > 0, tl.maximum(n - window, 0), 0)  # sliding window: first visible key
    span = tl.maximum(n - lo, 0)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N, min_chunk)  # min_chunk: fewer splits
    start = lo + split * chunk
    end = tl.minimum(start + chunk, n)
    # splits that hold keys (split 0 also for an empty row): the fused merge waits for and reads these alone
    n_act = tl.where(span > 0, tl.cdiv(span, tl.maximum(chunk, 1)), 1)
    active = split < n_act

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )  # [G, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(bt_ptr + b * stride_btb + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        row = offs_n % PAGE
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_ptr + page[:, None] * stride_kb + kvh * stride_kh + row[:, None] * stride_ks + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [N, D]
        v = tl.load(
            v_ptr + page[:, None] * stride_vb + kvh * stride_vh + row[:, None] * stride_vs + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [G, N] fp32
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the tile's first key is always valid
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    keep = split >= 0  # the merge kernel reads every split's partial
    if FUSED:
        keep = active & (n_act > 1)  # the fused merge reads the n_act splits with keys alone (none when n_act = 1)
    tl.store(
        o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
        out,
        mask=mask_g[:, None] & mask_d[None, :] & keep,
    )
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g & keep)
    if FUSED:
        if n_act == 1:  # one split holds every key (or the row is empty): it writes the output itself
            if split == 0:
                tl.store(out_ptr + b * stride_outb + heads[:, None] * stride_outh + offs_d[None, :],
                         out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])  # fmt: skip
        elif active:
            # The last of this (sequence, KV head)'s n_act splits with keys to finish merges them (a split without
            # keys stores nothing and does not count): the acq_rel counter makes the other splits' partial stores
            # visible to it. It resets the counter for the next call (graph replays). The merge is the merge
            # kernel's (_merge_splits), all GROUP heads and their n_act splits in one load.
            done = tl.atomic_add(cnt_ptr + b * num_kv_heads + kvh, 1, sem="acq_rel")
            if done == n_act - 1:
                h0 = kvh * GROUP
                _merge_splits(o_ptr + b * stride_ob + h0 * stride_oh, lse_ptr + b * stride_lb + h0 * stride_lh,
                              out_ptr + b * stride_outb + h0 * stride_outh, stride_oh, stride_os, stride_lh,
                              stride_outh, GROUP, n_act, offs_d, mask_d, GROUP_P2,
                              min(SPLITS_PAD, 8))  # fmt: skip
                tl.atomic_xchg(cnt_ptr + b * num_kv_heads + kvh, 0)
    if PF:
        # A constant buffer (the next projection's weights) asked of L2 once this program's own K/V reads are
        # done (issued first, they would queue ahead of them in HBM): it streams during the merge and wo's ramp.
        spread_prefetch(pf_ptr, pf_lines, (b * tl.num_programs(1) + kvh) * NUM_SPLITS + split,
                        tl.num_programs(0) * tl.num_programs(1) * NUM_SPLITS, PF_BLOCK)  # fmt: skip


@triton.jit
def _paged_decode_merge_kernel(
    o_ptr, lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    _merge_splits(o_ptr + b * stride_ob + h * stride_oh, lse_ptr + b * stride_lb + h * stride_lh,
                  out_ptr + b * stride_outb + h * stride_outh, stride_oh, stride_os, stride_lh, stride_outh, 1,
                  NUM_SPLITS, offs_d, offs_d < HEAD_DIM, 1, SPLITS_PAD)  # fmt: skip  (one head: every split at once)


BLOCK_N = 64  # keys per tile above SMALL_BATCH sequences (and the unit choose_num_splits counts chunks in)
SMALL_BATCH = 8
BLOCK_NS = (16, 32, 64, 128)  # the keys per tile the launcher takes
WARPS = (1, 2, 4, 8)  # the split kernel's warps it takes


def default_block_n(batch: int) -> int:
    """Keys per tile of the split kernel: 32 up to SMALL_BATCH sequences, else 64. H200, Llama-3-8B heads, µs per call
    of split + merge with L2 flushed (results/gpu/core-h200/decode-attn-7861607/): batch 1 at 256 / 1,024 / 4,096 keys
    5.61 / 6.30 / 11.64 at 32 vs 6.07 / 7.22 / 11.36 at 64, batch 8 8.39 / 15.96 / 44.59 vs 9.86 / 17.34 / 44.34;
    at batch 32, 64 keys win (4,096 keys: 133 vs 144 µs, results/gpu/core-h200/decode-attn-629952e/README.md)."""
    return 32 if batch <= SMALL_BATCH else BLOCK_N


def default_block_ns() -> tuple[int, ...]:
    """Every tile size default_block_n picks (what a warm-up compiles)."""
    return tuple(sorted({default_block_n(1), default_block_n(SMALL_BATCH + 1)}))


MAX_SPLITS = 32  # a power of two


def choose_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132, cap: int = MAX_SPLITS
) -> int:
    """Enough (sequence, KV head, split) programs for ~4 per SM, never more splits than BLOCK_N-token chunks,
    rounded down to a power of two (each value is its own compiled kernel: 6 at most, compiled at warm-up)."""
    want = math.ceil(4 * num_sms / max(1, batch * num_kv_heads))
    s = max(1, min(cap, want, math.ceil(max_seq_len / BLOCK_N)))
    return 1 << (s.bit_length() - 1)  # a power of two: NUM_SPLITS is a compile-time constant, so few variants


def workspace(batch: int, num_heads: int, head_dim: int, num_splits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs [B, H, S, D] and log-sum-exps [B, H, S], float32."""
    o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)
    return o, lse


_COUNTERS: dict[str, torch.Tensor] = {}


def _counters(n: int, device) -> torch.Tensor:
    """Zeroed int32 split counters, one per (sequence, KV head); kept (the kernel resets what it uses), grown on
    demand outside graph capture (every capture is preceded by warm-up calls of the same sizes)."""
    key = str(device)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return c


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    ws: tuple[torch.Tensor, torch.Tensor] | None = None,
    fused: bool = False,
    prefetch: torch.Tensor | None = None,
    min_chunk: int = 0,
    num_warps: int = 4,
    block_n: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """q [B, H, D]; k_cache/v_cache [NB, Hkv, PAGE, D] (last dim contiguous); block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (0 = padding row -> zeros). Returns out [B, H, D] in q.dtype. Graph-safe: no host sync.
    fused: the last of each (sequence, KV head)'s splits that hold keys merges them in the same kernel (one launch
    instead of two; splits without keys store nothing). Off by default: its first version (the last of all splits
    merging all of them, one split after another) made batch-1 decode slower on the H200 (221.6 vs 233 tok/s,
    results/gpu/core-h200/core-bench-01e4e85.json; 218.6 vs 235.4 at 2a97238); this one merges only the splits with
    keys, all of its heads' in one load, and when one split holds every key (n_act = 1) that split writes the output.
    min_chunk: the fewest keys a split takes (a multiple of block_n; 0 = the sequence spread over all num_splits
    splits in BLOCK_N-key chunks): a short sequence then sits in one split or few, so fewer partials to merge.
    num_warps / block_n / num_stages: the split kernel's warps, keys per tile and software-pipeline depth of its key
    loop (tuning knobs: benchmarks/bench_decode_attention.py); block_n None: default_block_n(B).
    prefetch: a contiguous CUDA tensor that the split programs ask L2 for, spread over them (the next projection's
    weights, while batch-1 attention leaves HBM idle; the values are not touched)."""
    b, h, d = q.shape
    nb, hkv, page, dk = k_cache.shape
    assert q.is_cuda or q.device.type == "cpu", "Triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
    assert dk == d and v_cache.shape == k_cache.shape, f"cache {tuple(k_cache.shape)} vs q {tuple(q.shape)}"
    assert h % hkv == 0, f"{h} query heads not a multiple of {hkv} KV heads"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "last dim must be contiguous"
    assert k_cache.dtype == v_cache.dtype == q.dtype, f"dtypes q {q.dtype} k {k_cache.dtype} v {v_cache.dtype}"
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1 and block_tables.shape[0] >= b
    assert seq_lens.dtype == torch.int32 and seq_lens.shape[0] >= b
    assert page & (page - 1) == 0, f"block size {page} must be a power of two"
    block_n = default_block_n(b) if block_n is None else block_n
    assert block_n in BLOCK_NS and num_warps in WARPS, f"block_n {block_n}, num_warps {num_warps}"
    assert 1 <= num_stages <= 6, f"num_stages {num_stages}"
    assert min_chunk >= 0 and min_chunk % block_n == 0, f"min_chunk {min_chunk}: a multiple of block_n {block_n}"
    if num_splits is None:
        num_splits = choose_num_splits(b, hkv, block_tables.shape[1] * page)
    o_part, lse = ws if ws is not None else workspace(b, h, d, num_splits, q.device)
    assert o_part.shape[0] >= b and o_part.shape[2] == num_splits and o_part.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    group = h // hkv
    block_d = triton.next_power_of_2(d)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cnt = _counters(b * hkv, q.device) if fused else lse
    pf = None
    if prefetch is not None and q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        assert prefetch.is_contiguous(), "prefetch: a contiguous tensor"
        pf = prefetch.view(-1).view(torch.uint8)
    _paged_decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o_part, lse,
        float(scale), int(window),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        out, cnt, out.stride(0), out.stride(1), hkv, int(min_chunk),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), GROUP_P2=triton.next_power_of_2(group),
        HEAD_DIM=d, BLOCK_D=block_d, PAGE=page, BLOCK_N=block_n, NUM_SPLITS=num_splits, PREC=prec, FUSED=fused,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        pf_ptr=pf if pf is not None else lse, pf_lines=num_lines(pf) if pf is not None else 0, PF=pf is not None,
        PF_BLOCK=PF_BLOCK, num_warps=num_warps, num_stages=num_stages, **launch(),
    )  # fmt: skip
    if fused:
        return out
    _paged_decode_merge_kernel[(b, h)](
        o_part, lse, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        num_warps=4, **launch(),
    )  # fmt: skip
    return out
