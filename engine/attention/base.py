"""The attention backend interface: RoPE, the KV write and attention of one layer over a ForwardBatch.

A backend gets the layer's fused qkv projection [T, (H + 2 Hkv) D] and returns the attention output [T, H D];
it owns the layout of the paged cache it reads (k/v caches [num_blocks, Hkv, block_size, D] per layer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.attention.metadata import ForwardBatch


@dataclass(frozen=True)
class AttentionLayerSpec:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    window: int  # 0 = full causal attention


class AttentionBackend(ABC):
    name: str = "?"

    @abstractmethod
    def forward(
        self,
        qkv: torch.Tensor,
        batch: ForwardBatch,
        spec: AttentionLayerSpec,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Rotate q and k by batch.positions, write k/v into the paged cache, attend; returns [T, H * D]."""

    def num_splits(self, batch_size: int, n_kv_heads: int, max_seq_len: int) -> int:
        """Split-KV programs the decode kernel uses at this batch size (1 where there is no split)."""
        return 1

    def warmup(self, spec: AttentionLayerSpec, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:  # noqa: B027
        """Compile, before serving, the kernel variants steps may need (block 0 of the caches is scratch)."""

    def info(self) -> dict:
        return {"attention_backend": self.name}
