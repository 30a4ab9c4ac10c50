"""Contiguous KV cache: per layer, k and v of shape [max_batch, Hkv, max_seq, D] (the ops' cache layout)."""

from __future__ import annotations

import torch

from engine.config import ModelConfig


class KVCache:
    """One row per sequence of a static batch; row b holds positions 0 .. max_seq-1 of sequence b.

    A paged cache (block tables) can sit beside this class; the model only asks for `layer(i)`.
    """

    def __init__(
        self,
        n_layers: int,
        max_batch: int,
        n_kv_heads: int,
        max_seq: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.max_batch, self.max_seq = max_batch, max_seq
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    @classmethod
    def for_model(
        cls, config: ModelConfig, max_batch: int, max_seq: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        return cls(config.n_layers, max_batch, config.n_kv_heads, max_seq, config.head_dim, dtype, device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each [max_batch, Hkv, max_seq, D]."""
        return self.k[i], self.v[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Cache bytes one token takes across all layers (k and v)."""
        return 2 * config.n_layers * config.kv_size * torch.empty((), dtype=dtype).element_size()
