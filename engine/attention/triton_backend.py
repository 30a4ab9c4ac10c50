"""The CUDA attention backend: Triton RoPE + paged KV write, split-KV decode, and for the prompt rows of a step
either one batched SDPA call (fresh prompts of one length: flash / cuDNN), one launch of the TMA fresh-prompt kernel
(fresh prompts of any lengths) or one launch of the Triton paged prefill kernel for all of them (chunks over a
cached prefix, sliding windows, speculative verification, mixed lengths). Decode rows come first in every batch.
EngineConfig.fresh_attention picks the fresh prompts' path: sdpa (torch's choice of kernel), flash (SDPA limited to
FlashAttention-2), tma (engine/kernels/triton/fresh_prefill.py, sm_90+), triton (the paged kernel for them too);
EngineConfig.fresh_pad > 0 pads the SDPA call's length up to a multiple of it (zero rows after the prompt, which
causal masking keeps out of the real rows) so cuDNN builds one plan per bucket, warmed at start-up, not one per
new prompt length.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.attention.base import AttentionBackend, AttentionLayerSpec, RopeKV
from engine.attention.metadata import ForwardBatch
from engine.kernels.triton.paged_attention import BLOCK_N, BLOCK_NS, MAX_SPLITS, WARPS, default_block_ns


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, fresh_attention: str = "tma", fresh_pad: int = 0, warm_fresh_upto: int = 0) -> None:
        from engine.kernels.triton import fresh_prefill, fused, paged_attention, paged_prefill

        if fresh_attention not in ("sdpa", "flash", "triton", "tma"):
            raise ValueError(f"fresh_attention: expected sdpa, flash, triton or tma, got {fresh_attention!r}")
        if isinstance(fresh_pad, bool) or not isinstance(fresh_pad, int) or fresh_pad < 0:
            raise ValueError(f"fresh_pad: expected an int >= 0, got {fresh_pad!r}")
        self.fresh_attention, self.fresh_pad, self.warm_fresh_upto = fresh_attention, fresh_pad, warm_fresh_upto
        self._rope_kv = fused.rope_write_kv
        self._decode = paged_attention.paged_decode_attention
        self._choose_splits = paged_attention.choose_num_splits
        self._prefill = paged_prefill.paged_prefill_attention
        self._fresh_tma = fresh_prefill.fresh_prefill_attention
        self._tma_supported = fresh_prefill.supported
        self.tma_fallback: dict[str, str] = {}  # fresh_attention = tma: head layouts it cannot take -> why
        self.num_sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
        # ANVIL_QKV_ROPE=1 (an experiment, off): a one-token decode step rotates and writes the cache inside the
        # batch-1 qkv GEMV (engine/kernels/triton/gemv.py linear_rope) instead of a RoPE + KV write kernel after it
        self.qkv_rope_on = os.environ.get("ANVIL_QKV_ROPE", "0") == "1"
        # ANVIL_DECODE_FUSED_MERGE=1 (off): the last split of each (sequence, KV head) merges the partials in the
        # split kernel (paged_decode_attention(fused=True)) instead of a merge kernel after it. It lost at 01e4e85
        # (221.6 vs 233 tok/s) and at 2a97238 (218.6 vs 235.4); since 9359d51+ it merges only the splits with keys
        self.fused_merge = os.environ.get("ANVIL_DECODE_FUSED_MERGE", "0") == "1"
        # ANVIL_DECODE_MIN_CHUNK=<keys> (0: off): the fewest keys a decode split takes, so a short sequence sits in
        # one split (which then writes the output itself when fused) or few; ANVIL_DECODE_WARPS / _BLOCK_N: the
        # split kernel's warps (4) and keys per tile (32 up to 8 sequences, else 64). Tuning knobs, timed by
        # benchmarks/bench_decode_attention.py; measured on the H200 in results/gpu/core-h200/decode-attn-*
        self.decode_cfg = _decode_knobs()
        # ANVIL_PREFETCH_WO=<B> (off: 0): in all-decode steps of <= B sequences the split-KV programs ask L2 for the
        # output projection's weights (paged_decode_attention(prefetch=)): HBM is idle during batch-1 attention
        self.prefetch_max_b = int(os.environ.get("ANVIL_PREFETCH_WO", "0") or 0)
        self.takes_prefetch = self.prefetch_max_b > 0

    def qkv_rope(self, batch: ForwardBatch, spec: AttentionLayerSpec, cos_sin, k_cache, v_cache) -> RopeKV | None:
        if not (self.qkv_rope_on and batch.attn.all_decode and batch.input_ids.shape[0] == 1):
            return None
        return RopeKV(cos_sin, batch.positions, batch.seq_idx, batch.attn.block_tables, k_cache, v_cache, spec)

    def forward_rotated(self, q, batch: ForwardBatch, spec: AttentionLayerSpec, k_cache, v_cache,
                        prefetch=None) -> torch.Tensor:  # fmt: skip
        return self._decode_all(q, batch.attn, spec, k_cache, v_cache, prefetch)

    def _decode_all(self, q, a, spec: AttentionLayerSpec, k_cache, v_cache, prefetch) -> torch.Tensor:
        """An all-decode step: split-KV attention of q [T, H, D] -> [T, H * D], with the switches above."""
        pf = prefetch if a.num_seqs <= self.prefetch_max_b else None
        o = self._decode(q, k_cache, v_cache, a.block_tables, a.seq_lens, spec.scale, spec.window,
                         num_splits=a.num_splits, fused=self.fused_merge, prefetch=pf, **self.decode_cfg)  # fmt: skip
        return o.view(q.shape[0], spec.n_heads * spec.head_dim)

    def info(self) -> dict:
        extra = {}
        if self.fresh_attention == "tma":  # head layouts that fell back to the paged kernel, and why
            extra["fresh_tma_fallback"] = {k: why for k, why in self.tma_fallback.items() if why}
        return {**super().info(), "qkv_rope": self.qkv_rope_on, "decode_fused_merge": self.fused_merge,
                "prefetch_wo_max_batch": self.prefetch_max_b, "decode": dict(self.decode_cfg), **extra}

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
        cfg = self.decode_cfg
        tiles = [cfg["block_n"]] if cfg["block_n"] else default_block_ns()
        for s in (1 << i for i in range(MAX_SPLITS.bit_length())):  # every power of two up to MAX_SPLITS
            for bn in tiles:  # both tile sizes the launcher picks by batch size
                self._decode(q[:1], k_cache, v_cache, bt[:1], lens[:1], spec.scale, spec.window, num_splits=s,
                             fused=self.fused_merge, **{**cfg, "block_n": bn})  # fmt: skip
        for q_len in (1, 3, 8, 12, 24, 100, 300):  # every BLOCK_M the launcher picks (16..256 rows at GQA 4:1)
            qq = torch.zeros(3 * q_len, h, d, dtype=dt, device=dev)
            cu = torch.arange(0, 4 * q_len, q_len, dtype=torch.int32, device=dev)
            ln = torch.full((3,), q_len + 3, dtype=torch.int32, device=dev)
            for first in (0, 1, 2):
                self._prefill(qq, k_cache, v_cache, bt, cu, ln, spec.scale, spec.window, first, 3 - first, q_len)
        if self._tma(spec):  # the fresh kernel's BLOCK_M variants, first sequence 0, 1 and other, as above
            for q_len in (1, 3, 8, 12, 24, 100, 300):
                qq = torch.zeros(3 * q_len, h, d, dtype=dt, device=dev)
                kv = torch.zeros(3 * q_len, spec.n_kv_heads, d, dtype=dt, device=dev)
                cu = torch.arange(0, 4 * q_len, q_len, dtype=torch.int32, device=dev)
                for first in (0, 1, 2):
                    self._fresh_tma(qq, kv, kv, cu, spec.scale, first, 3 - first, q_len)
        if self.fresh_pad and self.fresh_attention in ("sdpa", "flash") and not spec.window:  # one plan per bucket
            for n in range(self.fresh_pad, self.warm_fresh_upto + 1, self.fresh_pad):
                x = torch.zeros(n, h, d, dtype=dt, device=dev)
                kv = torch.zeros(n, spec.n_kv_heads, d, dtype=dt, device=dev)
                self._sdpa_call(x, kv, kv, 1, spec)

    def forward(self, qkv, batch: ForwardBatch, spec: AttentionLayerSpec, cos_sin, k_cache, v_cache, prefetch=None):
        a = batch.attn
        t, h, hkv, d = qkv.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        nd = a.num_decodes
        fresh = None if a.all_decode else self._fresh_kind(a, spec)  # "sdpa" | "tma" | None (the paged kernel)
        sdpa = fresh == "sdpa"
        k_out = torch.empty(t, hkv, d, dtype=qkv.dtype, device=qkv.device) if fresh else None
        q = self._rope_kv(qkv, cos_sin, batch.positions, h, hkv, d, batch.seq_idx, a.block_tables,
                          k_cache, v_cache, k_out=k_out)  # fmt: skip  [T, H, D]
        if a.all_decode:
            return self._decode_all(q, a, spec, k_cache, v_cache, prefetch)
        v_rows = qkv[:, (h + hkv) * d :].view(t, hkv, d)
        if sdpa and not nd:  # the step is fresh prompts only: SDPA's output is the layer's, no copy into `out`
            return self._sdpa_call(q, k_out, v_rows, a.num_seqs, spec).reshape(t, h * d)
        out = torch.empty_like(q)
        if nd:
            self._decode(q[:nd], k_cache, v_cache, a.block_tables[:nd], a.seq_lens[:nd], spec.scale, spec.window,
                         num_splits=self.num_splits(nd, hkv, a.max_seq_len), out=out[:nd], fused=self.fused_merge,
                         **self.decode_cfg)  # fmt: skip
        if sdpa:
            self._fresh(q, k_out, v_rows, a, spec, out, nd, a.num_seqs)
        elif fresh == "tma":  # every prompt row of the step: fresh prompts, over their own rows' K/V
            self._fresh_tma(q, k_out, v_rows, a.cu_seqlens_q, spec.scale, nd, a.num_seqs - nd, a.max_q_len, out=out)
        else:  # every prompt row of the step in one launch, over the cache rope_kv has just written
            self._prefill(q, k_cache, v_cache, a.block_tables, a.cu_seqlens_q, a.seq_lens, spec.scale, spec.window,
                          nd, a.num_seqs - nd, a.max_q_len, out=out)  # fmt: skip
        return out.view(t, h * d)

    def _fresh_kind(self, a, spec: AttentionLayerSpec) -> str | None:
        """How this step's prompt rows attend: "sdpa" (fresh_attention sdpa / flash and _sdpa admits the step), "tma"
        (fresh_attention tma: every prompt row belongs to a fresh prompt no longer than the sliding window, if any,
        which then masks nothing; a head layout the kernel takes), None: the paged kernel."""
        if self.fresh_attention == "triton":
            return None
        if self.fresh_attention != "tma":
            return "sdpa" if not spec.window and self._sdpa(a, spec) else None
        qs, lens = a.query_start, a.seq_lens_host
        prompts = range(a.num_decodes, a.num_seqs)
        if not self._tma(spec) or any(qs[b + 1] - qs[b] != lens[b] for b in prompts):
            return None
        if spec.window and max(lens[b] for b in prompts) > spec.window:
            return None
        return "tma"

    def _tma(self, spec: AttentionLayerSpec) -> bool:
        """fresh_attention = tma and the kernel takes this layer's heads here (else the reason is kept for info())."""
        if self.fresh_attention != "tma":
            return False
        key = f"{spec.n_heads}/{spec.n_kv_heads}x{spec.head_dim}"
        if key not in self.tma_fallback:
            dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            why = self._tma_supported(spec.n_heads, spec.n_kv_heads, spec.head_dim, dev)
            self.tma_fallback[key] = why or ""
        return not self.tma_fallback[key]

    @staticmethod
    def _sdpa(a, spec: AttentionLayerSpec) -> bool:
        """SDPA (flash / cuDNN) on the prompts' own K/V when every prompt row of the step belongs to fresh prompts
        (from position 0, no window) of one length: one batched call. Anything else (chunks over a cached prefix,
        windows, verification, fresh prompts of mixed lengths) goes through one paged Triton launch: a Python loop
        of SDPA calls per prompt and layer would cost the host more than the GPU saves."""
        if spec.window:
            return False
        qs, lens = a.query_start, a.seq_lens_host
        n = qs[a.num_decodes + 1] - qs[a.num_decodes]
        return all(qs[b + 1] - qs[b] == n == lens[b] for b in range(a.num_decodes, a.num_seqs))

    def _fresh(self, q, k, v, a, spec: AttentionLayerSpec, out, first: int, end: int) -> None:
        """One causal SDPA call over sequences first..end-1, fresh prompts of one length (what _sdpa admits);
        q [T, H, D], k/v [T, Hkv, D]."""
        s0, s1 = a.query_start[first], a.query_start[end]
        o = self._sdpa_call(q[s0:s1], k[s0:s1], v[s0:s1], end - first, spec)
        out[s0:s1] = o.reshape(s1 - s0, spec.n_heads, spec.head_dim)

    def _sdpa_call(self, q, k, v, m: int, spec: AttentionLayerSpec) -> torch.Tensor:
        """Causal SDPA over m prompts of one length packed in q [m*n, H, D], k/v [m*n, Hkv, D] (any row stride), their
        length padded to a multiple of fresh_pad (when > 0); returns [m, n, H, D]. Unpadded, the inputs go in as
        strided [m, heads, n, D] views of the step's own rows and GQA as SDPA's enable_gqa (no K/V repeated or
        copied); flash and cuDNN then write the output token-major, so the returned transpose is a plain view."""
        h, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        n = q.shape[0] // m
        p = -(-n // self.fresh_pad) * self.fresh_pad if self.fresh_pad else n

        def heads(t, nh):  # [m*n, nh, D] -> [m, nh, p, D]: zero rows after the prompt when padded
            t = t.view(m, n, nh, d)
            if p != n:
                t = F.pad(t, (0, 0, 0, 0, 0, p - n))
            return t.transpose(1, 2)

        x, kk, vv = heads(q, h), heads(k, hkv), heads(v, hkv)
        gqa = hkv != h
        if self.fresh_attention == "flash":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(x, kk, vv, is_causal=True, scale=spec.scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(x, kk, vv, is_causal=True, scale=spec.scale, enable_gqa=gqa)
        return o[:, :, :n].transpose(1, 2)  # [m, H, p, D] -> [m, n, H, D]


def _decode_knobs() -> dict:
    """The split kernel's knobs from ANVIL_DECODE_MIN_CHUNK / _WARPS / _BLOCK_N, checked here (a bad value is an error
    at start-up that names the variable, not an assertion at the first decode step); block_n None: the launcher's
    default_block_n (32 keys per tile up to 8 sequences, else 64)."""
    cfg = {}
    for key, name, default, ok in (("min_chunk", "ANVIL_DECODE_MIN_CHUNK", 0, lambda v: v >= 0),
                                   ("num_warps", "ANVIL_DECODE_WARPS", 4, lambda v: v in WARPS),
                                   ("block_n", "ANVIL_DECODE_BLOCK_N", None, lambda v: v is None or v in BLOCK_NS)):
        raw = os.environ.get(name, "")
        try:
            cfg[key] = int(raw) if raw else default
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected an integer") from None
        if not ok(cfg[key]):
            raise ValueError(f"{name}={raw!r}: out of range (min_chunk >= 0, warps {'/'.join(map(str, WARPS))}, "
                             f"block_n {'/'.join(map(str, BLOCK_NS))})")
    tile = cfg["block_n"] or BLOCK_N  # the largest default_block_n picks
    if cfg["min_chunk"] % tile:
        raise ValueError(f"ANVIL_DECODE_MIN_CHUNK={cfg['min_chunk']}: a multiple of the block_n {tile}")
    return cfg
