"""The attention layer: fused QKV projection, then RoPE + KV write + attention through the attention backend,
then the output projection (with the residual add as its epilogue)."""

from __future__ import annotations

import torch
from torch import nn

from engine.attention.base import AttentionBackend, AttentionLayerSpec
from engine.attention.metadata import ForwardBatch
from engine.config import ModelConfig
from engine.model.layers.linear import Linear, LinearMethod
from engine.model.layers.norm import RMSNorm
from engine.model.layers.parallel import TPShard, row_linear


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, method: LinearMethod | None = None,
                 tp: TPShard | None = None) -> None:  # fmt: skip
        """Under tensor parallelism config is the rank's local view: its query / KV heads only."""
        super().__init__()
        c = config
        self.layer = layer
        self.window = c.window(layer)
        self.spec = AttentionLayerSpec(c.n_heads, c.n_kv_heads, c.head_dim, c.attn_scale, self.window)
        self.wqkv = Linear(c.dim, c.qkv_size, bias=c.qkv_bias, method=method)  # [q; k; v] rows
        self.wo = row_linear(tp, c.q_size, c.dim, method=method)  # row-parallel under TP: all-reduce
        # bound by the model runner (engine/worker/kv_pool.py): this layer's paged cache and the backend
        self.backend: AttentionBackend | None = None
        self.k_cache: torch.Tensor | None = None  # [num_blocks, Hkv, block_size, D]
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, r: torch.Tensor, norm: RMSNorm, batch: ForwardBatch, cos_sin: torch.Tensor
    ) -> torch.Tensor:
        """r: the residual stream [T, dim]. Returns r + wo(attention(wqkv(norm(r))))."""
        rope = self.backend.qkv_rope(batch, self.spec, cos_sin, self.k_cache, self.v_cache)
        q = self.wqkv.method.fused_rope(self.wqkv, r, norm, rope) if rope is not None else None
        # a hint for backends that take one: wo's weights, asked of L2 while attention runs
        pf = self.wo.method.prefetch_tensor(self.wo) if self.backend.takes_prefetch else None
        if q is not None:  # the projection rotated q / k and wrote the cache itself
            o = self.backend.forward_rotated(q, batch, self.spec, self.k_cache, self.v_cache, prefetch=pf)
        else:
            qkv = self.wqkv(r, norm=norm)  # [T, (H + 2 Hkv) D]
            o = self.backend.forward(qkv, batch, self.spec, cos_sin, self.k_cache, self.v_cache, prefetch=pf)
        return self.wo(o, residual=r)
