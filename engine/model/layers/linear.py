"""Linear layers with a pluggable LinearMethod (vLLM's LinearMethodBase): the model is written once; int4 and
tensor-parallel linears plug in by giving a layer another method, never by editing the forward.

A Linear computes  y = W @ f(x) (+ bias) (+ residual)  where f is an optional RMSNorm prologue (`norm=`) or the
SwiGLU prologue (`act=True`, x = [gate | up]), and `residual` an optional epilogue add. The forward expresses
every matmul this way so that a method may fuse the prologue/epilogue into its kernel (the batch-1 Triton GEMV
does); the default composes plain ops with the same rounding: norm in x.dtype, matmul rounded to x.dtype, then
the add in x.dtype (HF's order).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops

if TYPE_CHECKING:
    from engine.attention.base import RopeKV
    from engine.model.layers.norm import RMSNorm


class LinearMethod(ABC):
    """How a Linear stores and applies its weight. create_weights registers the parameters (their names are
    the checkpoint's names below the layer's prefix); process_weights_after_loading may repack them; matmul
    computes W @ x (x already through the prologue). apply adds the prologue/epilogue; methods with fused
    kernels override it."""

    @abstractmethod
    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool) -> None: ...

    def process_weights_after_loading(self, layer: Linear) -> None:  # noqa: B027 (optional hook)
        pass

    @abstractmethod
    def matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [M, in_features] -> [M, out_features] in x.dtype (bias included)."""

    def fused_rope(self, layer: Linear, x: torch.Tensor, norm: RMSNorm | None, rope: RopeKV) -> torch.Tensor | None:
        """The qkv projection with RoPE and the paged KV write as its epilogue (rope: AttentionBackend.qkv_rope),
        returning the rotated q [T, H, D]; None (the default) when this method has no such kernel for x."""
        return None

    def prefetch_tensor(self, layer: Linear) -> torch.Tensor | None:
        """The buffer worth asking L2 for ahead of this layer's matmul: its largest parameter or buffer."""
        ts = [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]
        return max(ts, key=lambda t: t.numel() * t.element_size()) if ts else None

    def weight_bytes(self, layer: Linear) -> int:
        """Bytes one forward reads for this layer's weights (for bandwidth figures)."""
        return sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))

    def apply(
        self,
        layer: Linear,
        x: torch.Tensor,
        norm: RMSNorm | None = None,
        act: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if norm is not None:
            x = ops.rms_norm(x, norm.weight, norm.eps)
        if act:
            x = ops.silu_and_mul(x)
        y = self.matmul(layer, x)
        return y if residual is None else residual + y


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight [out, in] in the model dtype; F.linear (cuBLAS / MKL)."""

    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Module):
    """y = W @ f(x) through its LinearMethod. `method` defaults to UnquantizedLinearMethod."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, method: LinearMethod | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, in_features, out_features, bias)

    def forward(
        self,
        x: torch.Tensor,
        norm: RMSNorm | None = None,
        act: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.method.apply(self, x, norm=norm, act=act, residual=residual)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={type(self.method).__name__}"
