"""Pure-torch reference for the paged-KV ops: the oracle for the Triton paged kernels (runs on CPU and GPU).

Paged layout (one layer): k_cache, v_cache [num_blocks, Hkv, block_size, D]. Sequence b's token at position p
lives in block block_tables[b, p // block_size] at row p % block_size. A slot is block * block_size + row;
slot < 0 means "do not write" (padding rows of a CUDA-graph bucket).
"""

from __future__ import annotations

import torch

from engine.kernels.reference import _attend, fused_add_rms_norm, rms_norm, rope


def write_kv_paged(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k/v [T, Hkv, D] into the paged cache at slot_mapping [T] (int); rows with slot < 0 are skipped."""
    bs = k_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, rows = slots // bs, slots % bs
    k_cache[blocks, :, rows] = k[keep].to(k_cache.dtype)
    v_cache[blocks, :, rows] = v[keep].to(v_cache.dtype)


def paged_slots(
    block_tables: torch.Tensor, seq_idx: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Slots [T] (int64) of (sequence seq_idx[t], position positions[t]); positions < 0 give -1."""
    pos = positions.long()
    valid = pos >= 0
    p = pos.clamp(min=0)
    blocks = block_tables[seq_idx.long(), p // block_size].long()
    return torch.where(valid, blocks * block_size + p % block_size, torch.full_like(p, -1))


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """One sequence's first n cached tokens as a contiguous [Hkv, n, D] tensor."""
    bs = cache.shape[2]
    nb = (n + bs - 1) // bs
    blocks = cache[block_table[:nb].long()]  # [nb, Hkv, bs, D]
    return blocks.permute(1, 0, 2, 3).reshape(cache.shape[1], nb * bs, cache.shape[3])[:, :n]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """One query per sequence against the paged cache. q [B, H, D]; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (current token already written at seq_lens[b] - 1; 0 = padding row, output zeros).
    Returns [B, H, D] in q.dtype. Math in float32, same as reference.decode_attention."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.zeros_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        if n <= 0:
            continue
        lo = max(0, n - window) if window > 0 else 0
        ks = gather_paged(k_cache, block_tables[i], n)[:, lo:].repeat_interleave(h // hkv, dim=0)  # [H, n-lo, D]
        vs = gather_paged(v_cache, block_tables[i], n)[:, lo:].repeat_interleave(h // hkv, dim=0)
        out[i] = _attend(q[i][:, None, :], ks, vs, scale, None)[:, 0, :]
    return out


def rms_norm_residual(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton fused.rms_norm's contract: (rms_norm(x), None), or with a residual (rms_norm(x + r), x + r)."""
    if residual is None:
        return rms_norm(x, weight, eps), None
    return fused_add_rms_norm(x, residual, weight, eps)


def rope_write_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seq_idx: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton fused.rope_write_kv's contract: qkv [T, (H + 2 Hkv) D] -> rotated q [T, H, D]; rotated k and v
    written to the paged cache at (seq_idx, positions) (positions < 0 skipped); rotated k to k_out if given."""
    t, d = qkv.shape[0], head_dim
    q = qkv[:, : num_heads * d].reshape(t, num_heads, d)
    k = qkv[:, num_heads * d : (num_heads + num_kv_heads) * d].reshape(t, num_kv_heads, d)
    v = qkv[:, (num_heads + num_kv_heads) * d :].reshape(t, num_kv_heads, d)
    qr, kr = rope(q, k, positions.long().clamp(min=0), cos_sin)
    if k_cache is not None:
        slots = paged_slots(block_tables, seq_idx, positions, k_cache.shape[2])
        write_kv_paged(k_cache, v_cache, kr, v, slots)
    if k_out is not None:
        k_out.copy_(kr)
    if q_out is not None:
        q_out.copy_(qr)
        return q_out
    return qr
