"""The pure-torch attention backend: the reference every fast backend is tested against, and the CPU path.

Per sequence it gathers the cached keys from the paged cache and applies the causal (and sliding-window) mask of
its queries' absolute positions; math in float32 (engine/kernels/reference.py's _attend).
"""

from __future__ import annotations

import torch

from engine import ops
from engine.attention.base import AttentionBackend, AttentionLayerSpec
from engine.attention.metadata import ForwardBatch
from engine.kernels.reference import _attend, _window_mask
from engine.kernels.reference_paged import gather_paged, paged_slots, write_kv_paged


class TorchBackend(AttentionBackend):
    name = "torch"

    def forward(self, qkv, batch: ForwardBatch, spec: AttentionLayerSpec, cos_sin, k_cache, v_cache, prefetch=None):
        t, h, hkv, d = qkv.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        q, k = ops.rope(q.reshape(t, h, d), k.reshape(t, hkv, d), batch.positions, cos_sin)  # [T, H, D], [T, Hkv, D]
        a = batch.attn
        slots = paged_slots(a.block_tables, batch.seq_idx, batch.positions, k_cache.shape[2])
        write_kv_paged(k_cache, v_cache, k, v.reshape(t, hkv, d), slots)
        out = torch.empty_like(q)
        for b in range(a.num_seqs):
            s, e, n = a.query_start[b], a.query_start[b + 1], a.seq_lens_host[b]
            if e == s:
                continue
            ks = gather_paged(k_cache, a.block_tables[b], n).repeat_interleave(h // hkv, dim=0)  # [H, n, D]
            vs = gather_paged(v_cache, a.block_tables[b], n).repeat_interleave(h // hkv, dim=0)
            mask = _window_mask(e - s, n, n - (e - s), True, spec.window, q.device)
            out[s:e] = _attend(q[s:e].transpose(0, 1), ks, vs, spec.scale, mask).transpose(0, 1)
        return out.view(t, h * d)
