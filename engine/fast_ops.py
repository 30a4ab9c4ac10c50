"""The op tables of the fast path (Triton kernels, or the same ops in plain torch) and the per-layer weight views
it reads from an engine.model.Transformer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import ops
from engine.kernels import reference_paged as rp
from engine.model import Transformer


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    window: int


def layer_weights(model: Transformer) -> list[LayerWeights]:
    return [
        LayerWeights(
            blk.attention_norm.weight,
            blk.attention.wqkv.weight,
            blk.attention.wqkv.bias,
            blk.attention.wo.weight,
            blk.ffn_norm.weight,
            blk.feed_forward.w13.weight,
            blk.feed_forward.w2.weight,
            blk.attention.window,
        )  # fmt: skip
        for blk in model.layers
    ]


class TorchOps:
    """The same ops in plain torch (CPU, or a GPU without Triton): the paged path without the kernels."""

    name = "torch"

    @staticmethod
    def rms_norm(x, w, eps, residual=None):
        return rp.rms_norm_residual(x, w, eps, residual)

    rope_write_kv = staticmethod(rp.rope_write_kv)

    @staticmethod
    def paged_attention(q, kc, vc, bt, lens, scale, window, num_splits, out=None):
        return rp.paged_decode_attention(q, kc, vc, bt, lens, scale, window)

    @staticmethod
    def linear(x, w, b=None, act=False, cfg=None):
        return F.linear(ops.silu_and_mul(x) if act else x, w, b)

    silu_and_mul = staticmethod(ops.silu_and_mul)

    @staticmethod
    def advance(nxt, ids, pos, lens):
        b = nxt.shape[0]
        ids[:b].copy_(nxt)
        pos[:b] += 1
        lens[:b] += 1


class TritonOps:
    name = "triton"

    def __init__(self) -> None:
        from engine.kernels.triton import fused, gemv, paged_attention

        self.rms_norm = fused.rms_norm
        self.rope_write_kv = fused.rope_write_kv
        self.silu_and_mul = fused.silu_and_mul
        self.advance = fused.advance
        self._attn = paged_attention.paged_decode_attention
        self._linear = gemv.linear
        self._cublas = gemv.CUBLAS

    def paged_attention(self, q, kc, vc, bt, lens, scale, window, num_splits, out=None):
        return self._attn(q, kc, vc, bt, lens, scale, window, num_splits=num_splits, out=out)

    def linear(self, x, w, b=None, act=False, cfg=None):
        return self._linear(x, w, b, act=act, cfg=cfg or self._cublas)
