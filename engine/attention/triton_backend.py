"""The CUDA attention backend: Triton RoPE + paged KV write, split-KV decode, and per prompt chunk either SDPA on the
chunk's own K/V (a fresh prompt: flash / cuDNN) or the Triton paged prefill kernel (a chunk over a cached prefix,
sliding windows, speculative verification). Decode rows come first in every batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionLayerSpec
from engine.attention.metadata import ForwardBatch


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        from engine.kernels.triton import fused, paged_attention, paged_prefill

        self._rope_kv = fused.rope_write_kv
        self._decode = paged_attention.paged_decode_attention
        self._choose_splits = paged_attention.choose_num_splits
        self._prefill = paged_prefill.paged_prefill_attention
        self.num_sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132

    def num_splits(self, batch_size: int, n_kv_heads: int, max_seq_len: int) -> int:
        return self._choose_splits(batch_size, n_kv_heads, max_seq_len, self.num_sms)

    def warmup(self, spec: AttentionLayerSpec, k_cache, v_cache) -> None:
        """Compile every decode split count (powers of two up to 32: a compile-time constant each) and the paged
        prefill kernel's query-block variants with the first sequence 0, 1 and other (Triton specializes integer
        arguments equal to 1), over block 0 — mixed steps otherwise compile them, ~1 s each, while serving."""
        dev, dt = k_cache.device, k_cache.dtype
        h, d = spec.n_heads, spec.head_dim
        bt = torch.zeros(4, 32, dtype=torch.int32, device=dev)
        lens = torch.ones(4, dtype=torch.int32, device=dev)
        q = torch.zeros(4, h, d, dtype=dt, device=dev)
        for s in (1, 2, 4, 8, 16, 32):
            self._decode(q[:1], k_cache, v_cache, bt[:1], lens[:1], spec.scale, spec.window, num_splits=s)
        for q_len in (1, 8, 24, 40, 100, 300):
            qq = torch.zeros(3 * q_len, h, d, dtype=dt, device=dev)
            cu = torch.arange(0, 4 * q_len, q_len, dtype=torch.int32, device=dev)
            ln = torch.full((3,), q_len + 3, dtype=torch.int32, device=dev)
            for first in (0, 1, 2):
                self._prefill(qq, k_cache, v_cache, bt, cu, ln, spec.scale, spec.window, first, 3 - first, q_len)

    def forward(self, qkv, batch: ForwardBatch, spec: AttentionLayerSpec, cos_sin, k_cache, v_cache):
        a = batch.attn
        t, h, hkv, d = qkv.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        nd = a.num_decodes
        kinds = [] if a.all_decode else [self._kind(a, b, spec) for b in range(nd, a.num_seqs)]
        k_out = torch.empty(t, hkv, d, dtype=qkv.dtype, device=qkv.device) if "fresh" in kinds else None
        q = self._rope_kv(qkv, cos_sin, batch.positions, h, hkv, d, batch.seq_idx, a.block_tables,
                          k_cache, v_cache, k_out=k_out)  # fmt: skip  [T, H, D]
        if a.all_decode:
            return self._decode(q, k_cache, v_cache, a.block_tables, a.seq_lens, spec.scale, spec.window,
                                num_splits=a.num_splits).view(t, h * d)  # fmt: skip
        out = torch.empty_like(q)
        if nd:
            self._decode(q[:nd], k_cache, v_cache, a.block_tables[:nd], a.seq_lens[:nd], spec.scale, spec.window,
                         num_splits=self.num_splits(nd, hkv, a.max_seq_len), out=out[:nd])  # fmt: skip
        v = qkv[:, (h + hkv) * d :].view(t, hkv, d)
        b = nd
        while b < a.num_seqs:  # runs of sequences of one kind, each through its kernel
            kind = kinds[b - nd]
            e = b + 1
            while e < a.num_seqs and kinds[e - nd] == kind:
                e += 1
            if kind == "fresh":
                self._fresh(q, k_out, v, a, spec, out, b, e)
            else:
                qs = a.query_start
                self._prefill(q, k_cache, v_cache, a.block_tables, a.cu_seqlens_q, a.seq_lens, spec.scale,
                              spec.window, b, e - b, max(qs[i + 1] - qs[i] for i in range(b, e)), out=out)  # fmt: skip
            b = e
        return out.view(t, h * d)

    @staticmethod
    def _kind(a, b: int, spec: AttentionLayerSpec) -> str:
        """fresh: a prompt from position 0 without a window (causal SDPA on its own K/V); paged: the Triton kernel
        (a chunk over a cached prefix, sliding windows, speculative verification)."""
        q_len = a.query_start[b + 1] - a.query_start[b]
        return "fresh" if spec.window == 0 and q_len == a.seq_lens_host[b] else "paged"

    @staticmethod
    def _fresh(q, k, v, a, spec: AttentionLayerSpec, out, first: int, end: int) -> None:
        """Causal SDPA per run of equal-length fresh prompts (q [T, H, D], k/v [T, Hkv, D]), sequences first..end-1."""
        rep = spec.n_heads // spec.n_kv_heads
        qs = a.query_start
        b = first
        while b < end:
            n = qs[b + 1] - qs[b]
            e = b
            while e < end and qs[e + 1] - qs[e] == n:
                e += 1
            s0, s1, m = qs[b], qs[e], e - b
            x = q[s0:s1].view(m, n, spec.n_heads, spec.head_dim).transpose(1, 2)  # [m, H, n, D]
            kk = k[s0:s1].view(m, n, spec.n_kv_heads, spec.head_dim).transpose(1, 2).repeat_interleave(rep, dim=1)
            vv = v[s0:s1].view(m, n, spec.n_kv_heads, spec.head_dim).transpose(1, 2).repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(x, kk, vv, is_causal=True, scale=spec.scale)  # [m, H, n, D]
            out[s0:s1] = o.transpose(1, 2).reshape(m * n, spec.n_heads, spec.head_dim)
            b = e
