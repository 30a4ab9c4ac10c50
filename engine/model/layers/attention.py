"""The attention layer: fused QKV projection, then RoPE + KV write + attention through the attention backend,
then the output projection (with the residual add as its epilogue)."""

from __future__ import annotations

import os

import torch
from torch import nn

from engine.attention.base import AttentionBackend, AttentionLayerSpec
from engine.attention.metadata import ForwardBatch
from engine.config import ModelConfig
from engine.model.layers.linear import Linear, LinearMethod
from engine.model.layers.norm import RMSNorm
from engine.model.layers.parallel import TPShard, row_linear

# Decode-sized steps (at most this many tokens) ask for wo's weights in L2 before RoPE + KV write + attention,
# whose small kernels leave HBM idle; wo then reads them from L2 (engine/kernels/csrc/l2_prefetch.cu).
PREFETCH_MAX_TOKENS = int(os.environ.get("ANVIL_L2_PREFETCH_TOKENS", "64"))
PREFETCH_BUDGET = int(float(os.environ.get("ANVIL_L2_PREFETCH_MB", "40")) * 2**20)  # bytes; the H200's L2: 60 MB


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
        qkv = self.wqkv(r, norm=norm)  # [T, (H + 2 Hkv) D]
        if r.shape[0] <= PREFETCH_MAX_TOKENS:
            self.wo.prefetch(PREFETCH_BUDGET)
        o = self.backend.forward(qkv, batch, self.spec, cos_sin, self.k_cache, self.v_cache)  # [T, H D]
        return self.wo(o, residual=r)
