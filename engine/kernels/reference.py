"""Pure-torch reference for every op: runs on CPU and GPU, and is the oracle for every fast path.

Layouts (the contract the CUDA/Triton kernels implement too):
  tokens are packed, no padding: a batch of prompts is one [T, ...] tensor plus cu_seqlens [B+1] (int32),
  the cumulative prompt lengths (cu_seqlens[0] = 0, cu_seqlens[B] = T).
  q: [T, H, D]   k, v: [T, Hkv, D]   with H % Hkv == 0 (grouped-query attention)
  contiguous KV cache, one layer: k_cache, v_cache [B, Hkv, S_max, D]
  cos_sin: [max_pos, D] float32, columns [0, D/2) = cos(pos * inv_freq), [D/2, D) = sin(pos * inv_freq)
  RoPE is the rotate-half (GPT-NeoX / HF Llama) form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)), computed in float32, rounded to x.dtype before the weight (as HF does)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual (in x.dtype); returns (rms_norm(residual'), residual')."""
    r = x + residual
    return rms_norm(r, weight, eps), r


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2F] packed as [gate | up] -> silu(gate) * up: [..., F]."""
    f = x.shape[-1] // 2
    return F.silu(x[..., :f]) * x[..., f:]


def rope_cos_sin(inv_freq: torch.Tensor, max_pos: int) -> torch.Tensor:
    """[max_pos, D] float32 table: cos in the first half, sin in the second."""
    t = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())  # [max_pos, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, Hkv, D] by positions [T] (int64). Returns new tensors.

    Math in float32, result rounded to the input dtype, as HF's apply_rotary_pos_emb does in bf16
    (HF multiplies in the input dtype; the difference is below bf16 resolution).
    """
    d = q.shape[-1]
    cs = cos_sin[positions.long()]  # [T, D]
    cos = torch.cat([cs[:, : d // 2]] * 2, dim=-1)[:, None, :]  # [T, 1, D]
    sin = torch.cat([cs[:, d // 2 :]] * 2, dim=-1)[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    return rot(q), rot(k)


def _attend(q, k, v, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """q [H, Tq, D], k/v [H, Tk, D] (already expanded for GQA), mask [Tq, Tk] bool (True = keep)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.float()).to(q.dtype)


def _window_mask(tq: int, tk: int, q_offset: int, causal: bool, window: int, device) -> torch.Tensor | None:
    """Keep key j for query i (absolute position q_offset + i) when j <= pos (causal) and pos - j < window."""
    if not causal and window <= 0:
        return None
    qpos = torch.arange(tq, device=device)[:, None] + q_offset
    kpos = torch.arange(tk, device=device)[None, :]
    keep = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        keep &= kpos <= qpos
    if window > 0:
        keep &= (qpos - kpos) < window
    return keep


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = True,
    window: int = 0,
) -> torch.Tensor:
    """Variable-length attention over packed sequences. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D].

    window > 0 is a sliding window (Mistral): query at position p sees keys p-window+1 .. p.
    """
    h, hkv = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e == s:
            continue
        qs = q[s:e].transpose(0, 1)  # [H, L, D]
        ks = k[s:e].transpose(0, 1).repeat_interleave(h // hkv, dim=0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(h // hkv, dim=0)
        mask = _window_mask(e - s, e - s, 0, causal, window, q.device)
        out[s:e] = _attend(qs, ks, vs, scale, mask).transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """One query per sequence against the contiguous cache.

    q [B, H, D]; k_cache/v_cache [B, Hkv, S_max, D]; seq_lens [B] int32 = valid cached tokens per sequence,
    the current token's K/V already written at index seq_lens[b] - 1. Returns [B, H, D].
    """
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.empty_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        lo = max(0, n - window) if window > 0 else 0
        ks = k_cache[i, :, lo:n].repeat_interleave(h // hkv, dim=0)  # [H, n-lo, D]
        vs = v_cache[i, :, lo:n].repeat_interleave(h // hkv, dim=0)
        out[i] = _attend(q[i][:, None, :], ks, vs, scale, None)[:, 0, :]
    return out


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_idx: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Scatter k/v [T, Hkv, D] into the cache [B, Hkv, S_max, D] at (batch_idx[t], :, positions[t]). In place."""
    k_cache[batch_idx.long(), :, positions.long()] = k
    v_cache[batch_idx.long(), :, positions.long()] = v
