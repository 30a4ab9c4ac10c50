"""Varlen causal attention of new query tokens over a paged KV cache (prompt chunks over a cached prefix, sliding
windows, speculative verification), in Triton, with its launcher; oracle: engine/attention/torch_ref.py.

Sequence b's q_len queries sit at positions seq_len - q_len .. seq_len - 1 (bottom-right causal); query at
position p sees keys j <= p, and with a sliding window only p - j < window.

Design (FlashAttention-2 style forward, one pass, online softmax in float32):
  * GQA packing: one program per (query block, sequence, KV head) computes all GROUP = H / Hkv query heads that
    share that KV head: its BLOCK_M rows are BLOCK_Q = BLOCK_M // GROUP tokens x GROUP heads, row r = token
    r // GROUP, head r % GROUP (the heads of one token are adjacent in q and out, so the row loads stay contiguous).
    Every K/V tile gathered from the cache feeds GROUP times more rows than one program per query head would.
  * The key range of a program is split into up to three runs of BLOCK_N tiles: window-edge tiles (only with a
    sliding window: window mask), the tiles every row of the block sees fully (no mask, no -inf guard), and the
    diagonal tiles (causal mask, the sequence end, the window). With packing the diagonal spans only BLOCK_Q
    positions, so nearly all tiles take the unmasked path.
  * K/V tiles are gathered through the block table per tile (the page id of each key: offs // PAGE, the row:
    offs % PAGE; head_dim contiguous), loaded [BLOCK_N, BLOCK_D], and fed to tl.dot (wgmma on sm_90, mma on sm_80).
  * softmax in base 2: scores are scaled by scale * log2(e) in float32 after the dot, exp2 throughout.
  * longest first: program_id(0) walks the query blocks from the last (the most keys under a causal mask) down.
  * launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages) come from default_config by (max q_len, GROUP,
    head_dim, dtype, device capability), or are passed explicitly (benchmarks/bench_attention.py --sweep).
    float32 inputs use tl.dot's "ieee" precision (the CPU tests under the Triton interpreter, exact fp32 paths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tiles(
    acc, l_i, m_i, q, k_ptr, v_ptr, bt_row, kv_off0, stride_kb, stride_ks, pos, start, end, qk_scale, window,
    offs_d, mask_d,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key tiles start, start + BLOCK_N, .. < end. MASKED: apply the sequence end (keys <
    end), CAUSAL (key <= pos) and WINDOW (pos - key < window) masks and guard rows with no visible key yet."""
    for s0 in range(start, end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        if MASKED:
            mask_n = offs_n < end
            page = tl.load(bt_row + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
        kv_off = kv_off0 + page[:, None] * stride_kb + (offs_n % PAGE)[:, None] * stride_ks + offs_d[None, :]
        if MASKED:
            if EVEN_D:
                k = tl.load(k_ptr + kv_off, mask=mask_n[:, None], other=0.0)
                v = tl.load(v_ptr + kv_off, mask=mask_n[:, None], other=0.0)
            else:
                k = tl.load(k_ptr + kv_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                v = tl.load(v_ptr + kv_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptr + kv_off)
                v = tl.load(v_ptr + kv_off)
            else:
                k = tl.load(k_ptr + kv_off, mask=mask_d[None, :], other=0.0)
                v = tl.load(v_ptr + kv_off, mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # [M, N] fp32
        if MASKED:
            s = s * qk_scale
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= pos[:, None])
            if WINDOW:
                keep = keep & (pos[:, None] - offs_n[None, :] < window)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
            p = tl.exp2(s - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)  # accumulates in place
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_q_ptr, lens_ptr,
    qk_scale, window, seq_offset,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kh, stride_ks, stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    WINDOW: tl.constexpr,
):  # fmt: skip
    mb = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first: the last query block sees the most keys
    b = tl.program_id(1) + seq_offset
    kvh = tl.program_id(2)
    q0 = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q0
    if mb * BLOCK_Q >= q_len:
        return
    n = tl.load(lens_ptr + b)
    start_pos = n - q_len
    offs_r = tl.arange(0, BLOCK_M)
    tok = mb * BLOCK_Q + offs_r // GROUP  # [M] query index within the sequence
    head = kvh * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_r = (offs_r < BLOCK_Q * GROUP) & (tok < q_len)
    pos = start_pos + tok  # [M] absolute positions
    row_q = (q0 + tok).to(tl.int64)
    q = tl.load(q_ptr + row_q[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)  # fmt: skip

    first = start_pos + mb * BLOCK_Q  # position of the block's first query
    hi = start_pos + tl.minimum((mb + 1) * BLOCK_Q, q_len)  # one past its last query's position
    lo = 0
    a = 0
    if WINDOW:
        lo = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N  # first tile any row sees
        a = tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N  # first tile every row sees whole
    c = tl.maximum(((first + 1) // BLOCK_N) * BLOCK_N, lo)  # tiles below c: keys <= first, causal for all rows
    a = tl.minimum(tl.maximum(a, lo), c)

    bt_row = bt_ptr + b * stride_btb
    kv_off0 = kvh * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    even_d: tl.constexpr = BLOCK_D == HEAD_DIM
    if WINDOW:  # [lo, a): window edge (keys < a <= first + 1: causal holds)
        acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_ptr, v_ptr, bt_row, kv_off0, stride_kb, stride_ks, pos, lo, a,
                               qk_scale, window, offs_d, mask_d, PAGE, BLOCK_N, even_d, PREC,
                               True, False, True)  # fmt: skip
    # [a, c): seen whole by every row
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_ptr, v_ptr, bt_row, kv_off0, stride_kb, stride_ks, pos, a, c,
                           qk_scale, window, offs_d, mask_d, PAGE, BLOCK_N, even_d, PREC,
                           False, False, False)  # fmt: skip
    # [c, hi): the diagonal
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_ptr, v_ptr, bt_row, kv_off0, stride_kb, stride_ks, pos, c, hi,
                           qk_scale, window, offs_d, mask_d, PAGE, BLOCK_N, even_d, PREC,
                           True, True, WINDOW)  # fmt: skip
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + row_q[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])  # fmt: skip


def default_config(max_q_len: int, group: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch config {BLOCK_M (rows = tokens x GROUP heads), BLOCK_N (keys per tile), num_warps, num_stages}.
    Hopper's is the best of benchmarks/bench_attention.py --sweep on the H200; the others start from the
    FlashAttention-2 tile shapes per architecture (not measured: sweep on the target GPU); clamp_config fits it to
    the problem.

    num_stages: the K/V loads hang off the page-id load, which takes a pipeline stage of its own, so (Triton 3.8,
    read off the sm_90 TTGIR) stages 2-4 give two K/V buffers with the next tile's copy waited on at once (no
    overlap), 5-6 three buffers with the tile after next in flight, 7 four. Optional maxnreg: the sm_90 build of
    (128, 32, 8 warps) fits 128 registers without spilling, so two programs share an SM (one's softmax under the
    other's wgmma); (128, 64) uses ~180."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if dtype == torch.float32 or cap[0] < 8:  # fp32 / the interpreter / older GPUs: small tiles
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    elif head_dim > 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    elif cap[0] >= 9:  # Hopper: measured on the H200 (results/gpu/kernels-h200/attention.json), 256 rows over four
        # warpgroups beat 128 over two by 16-19 % at 16k and on 2k-query extends, and tie (-1.5 %) at a fresh 4k
        cfg = {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 16, "num_stages": 5}
    elif cap in ((8, 0), (8, 7)):  # A100 / Orin: 164 KiB of shared memory
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 5}
    else:  # sm_86 / sm_89 (~100 KiB of shared memory)
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 5}
    return clamp_config(cfg, max_q_len, group)


def clamp_config(cfg: dict, max_q_len: int, group: int) -> dict:
    """Shrink BLOCK_M to the rows the longest query run needs (>= 16 for tl.dot, >= GROUP: one token at least);
    a shrunk block keeps at most one warp per 16 rows (4 at least: one warpgroup)."""
    need = max(16, triton.next_power_of_2(max(1, max_q_len) * group))
    bm = max(min(cfg["BLOCK_M"], need), triton.next_power_of_2(group))
    warps = cfg["num_warps"] if bm >= cfg["BLOCK_M"] else min(cfg["num_warps"], max(4, bm // 16))
    return {**cfg, "BLOCK_M": bm, "num_warps": warps}


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int,
    first_seq: int,
    num_seqs: int,
    max_q_len: int,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """q [T, H, D] (rows of every sequence, in cu_seqlens_q order); k/v_cache [NB, Hkv, PAGE, D]; block_tables
    [B, max_blocks] int32; cu_seqlens_q [B+1] int32; seq_lens [B] int32. Attends sequences first_seq ..
    first_seq + num_seqs - 1 (max_q_len: their longest q_len) and writes their rows of out [T, H, D].
    config: {BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]} to override default_config (BLOCK_M is still
    clamped; maxnreg caps the registers per thread, e.g. 128 for two 8-warp programs per SM)."""
    t, h, d = q.shape
    nb, hkv, page, dk = k_cache.shape
    assert dk == d and v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert h % hkv == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"dtypes q {q.dtype} k {k_cache.dtype} v {v_cache.dtype}"
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1
    assert cu_seqlens_q.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert page & (page - 1) == 0, f"block size {page} must be a power of two"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_seqs == 0 or max_q_len == 0:
        return out
    group = h // hkv
    if config is None:
        cfg = default_config(max_q_len, group, d, q.dtype, q.device)
    else:
        cfg = clamp_config(config, max_q_len, group)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_q = block_m // group
    grid = (triton.cdiv(max_q_len, block_q), num_seqs, hkv)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens,
        float(scale) * LOG2E, int(window), int(first_seq),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), PAGE=page,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        WINDOW=window > 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
    )  # fmt: skip
    return out
