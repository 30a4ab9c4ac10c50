"""The Llama-family forward (llama, mistral, qwen2): packed prefill and batched decode over a KV cache.

Tokens are packed without padding (see engine/kernels/reference.py for the layouts); every op goes through
engine.ops so the CUDA extension replaces the reference where it is built. Shapes: T tokens, B sequences,
H query heads, Hkv KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import nvtx, ops
from engine.config import ModelConfig
from engine.kv_cache import KVCache


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """[D/2] float32 inverse frequencies, computed exactly as transformers does (default and "llama3" types)."""
    d = config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between interpolated smoothly
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq_llama / s.factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


@dataclass
class Batch:
    """Where each token of one forward sits. Prefill sets cu_seqlens; decode sets seq_lens."""

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    batch_idx: torch.Tensor  # [T] int64, cache row of each token
    cu_seqlens: torch.Tensor | None = None  # [B+1] int32 (prefill: packed prompt boundaries)
    seq_lens: torch.Tensor | None = None  # [B] int32 (decode: cached tokens incl. this one; row b = sequence b)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.window = config.window(layer)
        self.wqkv = nn.Linear(config.dim, config.qkv_size, bias=config.qkv_bias)  # [q; k; v] rows
        self.wo = nn.Linear(config.q_size, config.dim, bias=False)

    def forward(
        self, x: torch.Tensor, batch: Batch, cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        t = x.shape[0]
        qkv = self.wqkv(x)  # [T, (H + 2 Hkv) D]
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(t, c.n_heads, c.head_dim)  # [T, H, D]
        k = k.view(t, c.n_kv_heads, c.head_dim)  # [T, Hkv, D]
        v = v.contiguous().view(t, c.n_kv_heads, c.head_dim)  # [T, Hkv, D]
        q, k = ops.rope(q, k, batch.positions, cos_sin)
        ops.write_kv(k_cache, v_cache, k, v, batch.batch_idx, batch.positions)
        if batch.cu_seqlens is not None:
            o = ops.prefill_attention(q, k, v, batch.cu_seqlens, c.attn_scale, True, self.window)  # [T, H, D]
        else:
            b = t  # decode: one token per sequence, sequence b in cache row b
            o = ops.decode_attention(q, k_cache[:b], v_cache[:b], batch.seq_lens, c.attn_scale, self.window)
        return self.wo(o.view(t, c.q_size))  # [T, dim]


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)  # [gate; up] rows
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.silu_and_mul(self.w13(x)))  # [T, 2F] -> [T, F] -> [T, dim]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        batch: Batch,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous block's output (or the embeddings when residual is None). Returns (out, residual):
        the residual add is fused into the next norm, as HF's x + f(norm(x)) in the same rounding order."""
        n = self.attention_norm
        if residual is None:
            residual, x = h, ops.rms_norm(h, n.weight, n.eps)
        else:
            x, residual = ops.fused_add_rms_norm(h, residual, n.weight, n.eps)
        h = self.attention(x, batch, cos_sin, k_cache, v_cache)
        n = self.ffn_norm
        x, residual = ops.fused_add_rms_norm(h, residual, n.weight, n.eps)
        return self.feed_forward(x), residual


class Transformer(nn.Module):
    """Build on the meta device and load with `from_state_dict` (weights.py / presets.py do this)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.output = None if config.tie_word_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self._cos_sin: torch.Tensor | None = None  # [max_pos, D] float32; not a buffer so .to(dtype) keeps it fp32

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
        """Engine-named tensors (already on their device and dtype) -> model, without copying them."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.requires_grad_(False).eval()
        model.ensure_rope(min(config.max_position_embeddings, 32768))
        return model

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def ensure_rope(self, max_pos: int) -> None:
        """Make the cos/sin table cover positions 0 .. max_pos-1 on the model's device."""
        t = self._cos_sin
        if t is None or t.shape[0] < max_pos or t.device != self.device:
            n = max(max_pos, 0 if t is None else t.shape[0])
            self._cos_sin = ops.rope_cos_sin(rope_inv_freq(self.config, self.device), n)

    def _lm_head(self, h: torch.Tensor) -> torch.Tensor:
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, w).float()  # [N, V] float32

    def _trunk(self, tokens: torch.Tensor, batch: Batch, cache: KVCache) -> torch.Tensor:
        """tokens [T] -> final normed hidden states [T, dim]; writes every layer's K/V into the cache."""
        self.ensure_rope(1)
        cos_sin = self._cos_sin
        h = self.tok_embeddings(tokens)  # [T, dim]
        residual = None
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = cache.layer(i)  # [B_max, Hkv, S_max, D]
            with nvtx.range(f"layer{i}"):
                h, residual = layer(h, residual, batch, cos_sin, k_cache, v_cache)
        h, _ = ops.fused_add_rms_norm(h, residual, self.norm.weight, self.norm.eps)
        return h

    def prefill(
        self,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor,
        positions: torch.Tensor,
        batch_idx: torch.Tensor,
        cache: KVCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Packed prompts. tokens/positions/batch_idx [T], cu_seqlens [B+1] int32.

        Returns float32 logits [T, V] when all_logits, else [B, V] for each sequence's last token.
        """
        batch = Batch(positions=positions, batch_idx=batch_idx, cu_seqlens=cu_seqlens)
        with nvtx.range("prefill"):
            h = self._trunk(tokens, batch, cache)  # [T, dim]
            if not all_logits:
                h = h[cu_seqlens[1:].long() - 1]  # [B, dim]
            return self._lm_head(h)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """One new token per sequence; sequence b lives in cache row b. tokens/positions [B] (int64),
        seq_lens [B] int32 (= positions + 1). Returns float32 logits [B, V]."""
        batch_idx = torch.arange(tokens.shape[0], device=tokens.device)
        batch = Batch(positions=positions, batch_idx=batch_idx, seq_lens=seq_lens)
        with nvtx.range("decode_step"):
            return self._lm_head(self._trunk(tokens, batch, cache))


@dataclass
class LoadedModel:
    """What engine.load and engine.presets.synthetic return."""

    model: Transformer
    config: ModelConfig
    tokenizer: Any | None = None  # engine.tokenizer.Tokenizer, or None when the folder has no tokenizer files
