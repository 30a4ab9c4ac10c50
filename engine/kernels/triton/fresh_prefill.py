"""Causal attention of fresh prompts (every query from position 0: no cached prefix; no sliding window, or one no
shorter than the prompt, which then masks nothing) over the prompts' own K/V rows, loaded through TMA (Triton tensor descriptors, sm_90+), with its launcher; oracle:
engine/attention/torch_ref.py (and SDPA in benchmarks/bench_attention.py).

Why a second prefill kernel: paged_prefill gathers every K/V tile through the block table (a page-id load, then
per-row address arithmetic and cp.async copies); a fresh prompt's K/V are also at hand as contiguous rows of the
step (the rotated k that rope_write_kv stores to k_out, and v inside qkv), so each tile is one TMA box copy that
costs no registers or issue slots to address, and Triton pipelines it with mbarriers.

Layout and work split, as in paged_prefill:
  * GQA packing: one program per (query block, sequence, KV head) computes the GROUP = H / Hkv query heads sharing
    that KV head; its BLOCK_M rows are BLOCK_Q tokens x GROUP heads, row r = token r // GROUP, head r % GROUP. The
    query tile is one 3-d box [BLOCK_Q, GROUP, D] of q [T, H, D], reshaped to [BLOCK_M, D].
  * K / V tiles are 2-d boxes [BLOCK_N, D] of k and v viewed as [T, Hkv * D] (column kvh * D); their row stride is
    free (v is a column slice of qkv), a multiple of 16 bytes.
  * Tiles below the block's first query are seen whole by every row (no mask); the diagonal tiles get the causal
    mask. Boxes that run past a sequence's end read the next sequence's rows (or TMA's zero fill past the tensor):
    causal masking keeps them out of every real row (a fresh prompt's query at position p sees keys <= p < its
    length), and rows past the end are never stored (masked pointer stores).
  * softmax in base 2 with scale * log2(e) applied in float32 after the dot; longest query blocks first.
  * WS: the key loop as tl.range(..., warp_specialize=True) (producer / consumer warps), a launch option to
    measure on the GPU (off by default).

Requirements (checked by `supported`): head_dim a power of two in 16..256, GROUP a power of two, q rows with
stride(1) == D; the engine routes other shapes (and cached prefixes, prompts longer than a window) to paged_prefill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from engine.kernels.triton import paged_prefill
from engine.kernels.triton.paged_prefill import LOG2E


@triton.jit
def _fresh_tile(
    acc, l_i, m_i, q, k_desc, v_desc, row, col, s0, pos, qk_scale,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key tile s0 .. s0 + BLOCK_N - 1 (at global row `row`) into the online softmax; MASKED: causal (key <= pos)."""
    k = k_desc.load([row, col])  # [BLOCK_N, D]
    s = tl.dot(q, tl.trans(k), input_precision=PREC)  # [M, N] fp32
    if MASKED:
        offs_n = s0 + tl.arange(0, BLOCK_N)
        s = tl.where(offs_n[None, :] <= pos[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = v_desc.load([row, col])  # [BLOCK_N, D]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _fresh_tiles(
    acc, l_i, m_i, q, k_desc, v_desc, row0, col, pos, start, end, qk_scale,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """Key tiles start, start + BLOCK_N, .. < end of the sequence whose row 0 is row0. WS: the loop warp-specialized
    (a separate branch, so a Triton without tl.range(warp_specialize=) fails only when asked for it)."""
    if WS:
        for s0 in tl.range(start, end, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fresh_tile(acc, l_i, m_i, q, k_desc, v_desc, row0 + s0, col, s0, pos, qk_scale,
                                        BLOCK_N, PREC, MASKED)  # fmt: skip
    else:
        for s0 in range(start, end, BLOCK_N):
            acc, l_i, m_i = _fresh_tile(acc, l_i, m_i, q, k_desc, v_desc, row0 + s0, col, s0, pos, qk_scale,
                                        BLOCK_N, PREC, MASKED)  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _fresh_prefill_kernel(
    q_desc, k_desc, v_desc, o_ptr, cu_q_ptr, qk_scale, seq_offset, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    mb = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first: the last query block sees the most keys
    b = tl.program_id(1) + seq_offset
    kvh = tl.program_id(2)
    row0 = tl.load(cu_q_ptr + b)
    n = tl.load(cu_q_ptr + b + 1) - row0  # the prompt's length: its queries sit at positions 0 .. n - 1
    if mb * BLOCK_Q >= n:
        return
    q = q_desc.load([row0 + mb * BLOCK_Q, kvh * GROUP, 0])  # [BLOCK_Q, GROUP, D]
    q = tl.reshape(q, [BLOCK_M, HEAD_DIM])
    offs_r = tl.arange(0, BLOCK_M)
    pos = mb * BLOCK_Q + offs_r // GROUP  # [M] positions (= token index within the prompt)
    first = mb * BLOCK_Q
    hi = tl.minimum(first + BLOCK_Q, n)  # one past the block's last real query
    c = ((first + 1) // BLOCK_N) * BLOCK_N  # tiles below c hold keys <= first: seen whole by every row
    col = kvh * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fresh_tiles(acc, l_i, m_i, q, k_desc, v_desc, row0, col, pos, 0, c, qk_scale,
                                 BLOCK_N, PREC, False, WS)  # fmt: skip
    acc, l_i, m_i = _fresh_tiles(acc, l_i, m_i, q, k_desc, v_desc, row0, col, pos, c, hi, qk_scale,
                                 BLOCK_N, PREC, True, WS)  # fmt: skip
    out = acc / l_i[:, None]  # every row sees key 0: l_i > 0
    head = kvh * GROUP + offs_r % GROUP
    row = (row0 + pos).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(o_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(pos < n)[:, None])  # fmt: skip


def default_config(max_q_len: int, group: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """{BLOCK_M (rows = tokens x GROUP heads), BLOCK_N (keys per tile), num_warps, num_stages, WS}. For d <= 128 in
    16-bit: 64 rows on one warpgroup, 64-key tiles, three buffers — the fastest of bench_attention.py's FRESH_SWEEP
    at 2,048 and 4,096 tokens on the H100 (results/gpu/core-h100/ttft-cae533b/: 0.196 / 0.386 ms, 175 / 356 TFLOP/s,
    against 0.233 / 0.466 ms for the first default, 128 rows on 8 warps) and within 0.02 ms of the best at 1,024.
    fp32 / the interpreter: small tiles."""
    if dtype == torch.float32 or device.type != "cuda":
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "WS": False}
    elif head_dim > 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "WS": False}
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "WS": False}
    return clamp_config(cfg, max_q_len, group)


def clamp_config(cfg: dict, max_q_len: int, group: int) -> dict:
    """paged_prefill's rule (BLOCK_M shrunk to the rows the longest prompt needs, warps with it), WS off unless set."""
    return {"WS": False, **paged_prefill.clamp_config(cfg, max_q_len, group)}


def supported(num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device) -> str | None:
    """None when the kernel takes this head layout on this device; else the reason (the engine then uses
    paged_prefill and reports it in info())."""
    g = num_heads // num_kv_heads
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "TMA needs sm_90+"
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        return f"head_dim {head_dim} is not a power of two in 16..256"
    if g & (g - 1):
        return f"GQA group {g} ({num_heads} / {num_kv_heads} heads) is not a power of two"
    return None


def fresh_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    first_seq: int,
    num_seqs: int,
    max_q_len: int,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """q [T, H, D] (stride(1) == D); k / v [T, Hkv, D] (stride(1) == D, any 16-byte row stride); cu_seqlens_q [B+1]
    int32, sequence b's rows cu[b] .. cu[b+1] - 1 a fresh prompt (positions 0 ..). Attends sequences first_seq ..
    first_seq + num_seqs - 1 (max_q_len: their longest) and writes their rows of out [T, H, D].
    config: {BLOCK_M, BLOCK_N, num_warps, num_stages[, WS]} to override default_config (BLOCK_M still clamped)."""
    t, h, d = q.shape
    hkv = k.shape[1]
    why = supported(h, hkv, d, q.device)
    assert why is None, why
    assert k.shape == v.shape == (t, hkv, d) and h % hkv == 0, f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and q.stride(1) == k.stride(1) == v.stride(1) == d
    assert q.dtype == k.dtype == v.dtype, f"dtypes q {q.dtype} k {k.dtype} v {v.dtype}"
    assert cu_seqlens_q.dtype == torch.int32
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_seqs == 0 or max_q_len == 0:
        return out
    group = h // hkv
    cfg = default_config(max_q_len, group, d, q.dtype, q.device) if config is None else clamp_config(config, max_q_len, group)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_q = block_m // group
    q_desc = TensorDescriptor(q, [t, h, d], [q.stride(0), d, 1], [block_q, group, d])
    k_desc = TensorDescriptor(k, [t, hkv * d], [k.stride(0), 1], [block_n, d])
    v_desc = TensorDescriptor(v, [t, hkv * d], [v.stride(0), 1], [block_n, d])
    grid = (triton.cdiv(max_q_len, block_q), num_seqs, hkv)
    _fresh_prefill_kernel[grid](
        q_desc, k_desc, v_desc, out, cu_seqlens_q, float(scale) * LOG2E, int(first_seq), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", WS=bool(cfg["WS"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
