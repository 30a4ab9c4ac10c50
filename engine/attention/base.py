"""The attention backend interface: RoPE, the KV write and attention of one layer over a ForwardBatch.

A backend gets the layer's fused qkv projection [T, (H + 2 Hkv) D] and returns the attention output [T, H D];
it owns the layout of the paged cache it reads (k/v caches [num_blocks, Hkv, block_size, D] per layer). A backend
may also let the projection rotate q / k and write the cache itself (qkv_rope -> forward_rotated).
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


@dataclass(frozen=True)
class RopeKV:
    """What a qkv projection needs to do RoPE and the paged KV write as its epilogue (AttentionBackend.qkv_rope):
    the token's position and cache slot (seq_idx into block_tables), the layer's caches and head layout."""

    cos_sin: torch.Tensor
    positions: torch.Tensor
    seq_idx: torch.Tensor
    block_tables: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    spec: AttentionLayerSpec


class AttentionBackend(ABC):
    name: str = "?"
    takes_prefetch: bool = False  # forward(prefetch=) is used (the layer only looks its tensor up then)

    @abstractmethod
    def forward(
        self,
        qkv: torch.Tensor,
        batch: ForwardBatch,
        spec: AttentionLayerSpec,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        prefetch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotate q and k by batch.positions, write k/v into the paged cache, attend; returns [T, H * D].
        prefetch: the next projection's weights, which a backend may ask L2 for while it attends (a hint)."""

    def qkv_rope(self, batch: ForwardBatch, spec: AttentionLayerSpec, cos_sin, k_cache, v_cache) -> RopeKV | None:
        """A RopeKV when this step's RoPE + KV write may run inside the qkv projection (its LinearMethod decides
        whether it can: LinearMethod.fused_rope); then forward_rotated attends. None (the default): forward."""
        return None

    def forward_rotated(self, q, batch: ForwardBatch, spec: AttentionLayerSpec, k_cache, v_cache,
                        prefetch: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Attention of rotated q [T, H, D] over the cache the projection has written; returns [T, H * D]."""
        raise NotImplementedError(f"{self.name} backend has no fused qkv epilogue")

    def num_splits(self, batch_size: int, n_kv_heads: int, max_seq_len: int) -> int:
        """Split-KV programs the decode kernel uses at this batch size (1 where there is no split)."""
        return 1

    def warmup(self, spec: AttentionLayerSpec, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:  # noqa: B027
        """Compile, before serving, the kernel variants steps may need (block 0 of the caches is scratch)."""

    def info(self) -> dict:
        return {"attention_backend": self.name}
