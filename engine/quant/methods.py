"""LinearMethods for quantized weights (vLLM's LinearMethodBase pattern): `Int4LinearMethod` (int4 g128, the
format of engine/quant/int4.py) and `NF4LinearMethod` (engine/quant/nf4.py). A Linear with one of these holds
buffers instead of a `weight` parameter; their names are the checkpoint names below the layer's prefix
(`layers.0.attention.wqkv.qweight`, ...).

matmul on CUDA, int4 (env ANVIL_INT4_KERNEL picks: auto | mma | gemv | triton): fp16 / bf16 calls run the CUDA
GEMV (`ext.int4_gemv`) for one row, and for up to ANVIL_INT4_CUDA_MAX_M = 8 rows where it takes its tensor-core
path (int4_tc_gemv.cu: K, G multiples of 128; else its FMA kernel int4_gemv.cu, slow above one row); other calls with
M <= 64 rows, K and G multiples of 128 and no act-order the tensor-core kernel (int4_mma.cu); calls above
ANVIL_INT4_DEQUANT_M = 64 rows (prefill) dequantize into x.dtype (Triton) and run cuBLAS; other calls the
Triton kernels (the decode kernel for M <= 16, GEMM above, or what the config table names). The CUDA kernels add
a Linear's residual in their epilogue (Int4LinearMethod.apply); on sm_90 its norm / SwiGLU prologues run on the Triton
PDL kernels, so the GEMV (a PDL launch) loads its first weights while they run; with ANVIL_INT4_FUSED_NORM=1 the norm
runs inside the tensor-core GEMV where it takes the shape (ext.int4_gemv_norm), with ANVIL_INT4_FUSED_ACT=1 the
SwiGLU (ext.int4_gemv_swiglu). NF4: Triton,
fused for M <= 32, else dequantize + F.linear. Elsewhere the torch reference (dequantize into x.dtype, F.linear).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from engine import ops
from engine.quant.int4 import Int4Weight, matmul_reference, prepare_input
from engine.quant.nf4 import NF4Weight, code_table, dequantize_nf4

try:  # the pluggable Linear (engine/model/layers/linear.py); absent in trees that predate it
    from engine.model.layers.linear import Linear, LinearMethod
except ImportError:  # pragma: no cover - only before the restructure lands
    Linear, LinearMethod = None, object


INT4_KERNEL = os.environ.get("ANVIL_INT4_KERNEL", "auto")  # auto (by rows, see above) | mma | gemv | triton
INT4_CUDA_MAX_M = int(os.environ.get("ANVIL_INT4_CUDA_MAX_M", "8"))  # rows up to which the CUDA GEMV runs (<= 8)
INT4_DEQUANT_M = int(os.environ.get("ANVIL_INT4_DEQUANT_M", "64"))  # above this many rows: dequantize + F.linear
# the RMSNorm / SwiGLU prologues inside the tensor-core GEMV (ext.int4_gemv_norm / _swiglu) where it takes the
# shape; off until timed on a GPU
INT4_FUSED_NORM = os.environ.get("ANVIL_INT4_FUSED_NORM", "0") == "1"
INT4_FUSED_ACT = os.environ.get("ANVIL_INT4_FUSED_ACT", "0") == "1"


def _pdl_prologues() -> bool:
    """Whether the Triton PDL kernels are on (sm_90+, ANVIL_PDL not 0): engine/kernels/triton/pdl.py."""
    from engine.kernels.triton import pdl

    return pdl.ENABLED


def _buffer_bytes(layer) -> int:
    tensors = list(layer.buffers(recurse=False)) + list(layer.parameters(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def _bias(layer, out_features: int, bias: bool) -> None:
    layer.bias = torch.nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None


class Int4LinearMethod(LinearMethod):
    """Buffers qweight int32 [N, K/8], scales / zeros [N, K/G] (model dtype), and optionally g_idx int32 [K]
    (act-order) and in_scale [K] (our AWQ)."""

    def __init__(self, group_size: int = 128, has_g_idx: bool = False, has_in_scale: bool = False):
        self.group_size, self.has_g_idx, self.has_in_scale = group_size, has_g_idx, has_in_scale

    @classmethod
    def for_weight(cls, w: Int4Weight) -> Int4LinearMethod:
        return cls(w.group_size, w.g_idx is not None, w.in_scale is not None)

    def create_weights(self, layer, in_features: int, out_features: int, bias: bool) -> None:
        g = self.group_size
        if in_features % g or in_features % 8:
            raise ValueError(f"int4 g{g}: in_features {in_features} is not a multiple of the group size")
        layer.register_buffer("qweight", torch.empty(out_features, in_features // 8, dtype=torch.int32))
        layer.register_buffer("scales", torch.empty(out_features, in_features // g))
        layer.register_buffer("zeros", torch.empty(out_features, in_features // g))
        if self.has_g_idx:
            layer.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        if self.has_in_scale:
            layer.register_buffer("in_scale", torch.empty(in_features))
        _bias(layer, out_features, bias)

    def weight(self, layer) -> Int4Weight:
        return Int4Weight(layer.qweight, layer.scales, layer.zeros, self.group_size,
                          layer.g_idx if self.has_g_idx else None,
                          layer.in_scale if self.has_in_scale else None)

    def apply(self, layer, x, norm=None, act=False, residual=None):
        """The base class's composition, with the residual add fused into the CUDA kernels' epilogue. On sm_90
        the prologues run the Triton PDL kernels (engine/kernels/triton/fused.py: they let the int4 GEMV start,
        and load its first weights, while they run); elsewhere engine.ops. With ANVIL_INT4_FUSED_NORM=1 /
        ANVIL_INT4_FUSED_ACT=1 the prologue runs inside the tensor-core GEMV where it takes the call (`_fused`)."""
        if (norm is not None) != bool(act) and (y := self._fused(layer, x, norm, act, residual)) is not None:
            return y
        if (norm is not None or act) and x.is_cuda and _pdl_prologues():
            from engine.kernels.triton import fused

            x2 = x.reshape(-1, x.shape[-1])
            if norm is not None:
                x2 = fused.rms_norm(x2, norm.weight, norm.eps)[0]
            if act:
                x2 = fused.silu_and_mul(x2)
            x = x2.view(*x.shape[:-1], x2.shape[-1])
        else:
            if norm is not None:
                x = ops.rms_norm(x, norm.weight, norm.eps)
            if act:
                x = ops.silu_and_mul(x)
        return self.matmul(layer, x, residual)

    def _fused(self, layer, x, norm, act, residual) -> torch.Tensor | None:
        """W @ rms_norm(x) or W @ silu_and_mul(x) (+ bias) (+ residual) in one CUDA kernel (ext.int4_gemv_norm /
        _swiglu), or None where that is off, matmul would not pick the CUDA GEMV's tensor-core path for these rows,
        or the kernel does not take the shape."""
        on = INT4_FUSED_ACT if act else (INT4_FUSED_NORM and norm.weight.dtype == x.dtype)
        if not (on and x.is_cuda and INT4_KERNEL in ("auto", "gemv") and not self.has_g_idx and not self.has_in_scale):
            return None
        from engine.kernels import ext

        x2 = x.reshape(-1, x.shape[-1])
        m, k, n = x2.shape[0], layer.qweight.shape[1] * 8, layer.qweight.shape[0]
        if not (m <= INT4_CUDA_MAX_M and x2.is_contiguous() and x2.dtype in (torch.float16, torch.bfloat16)
                and x2.shape[1] == (2 * k if act else k) and ext.is_available()
                and ext.int4_gemv_takes_prologue(m, n, k, self.group_size)):  # fmt: skip
            return None
        r2 = None if residual is None else residual.reshape(m, n)
        fused = r2 if r2 is not None and r2.dtype == x2.dtype and r2.is_contiguous() else None
        args = (x2, layer.qweight, layer.scales, layer.zeros, self.group_size)
        if act:
            y = ext.int4_gemv_swiglu(*args, layer.bias, fused)
        else:
            y = ext.int4_gemv_norm(*args, norm.weight, norm.eps, layer.bias, fused)
        if r2 is not None and fused is None:
            y = r2 + y
        return y.view(*x.shape[:-1], n)

    def matmul(self, layer, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """W @ x (+ bias) (+ residual, added to the product rounded to x.dtype)."""
        w = self.weight(layer)
        if not x.is_cuda:
            y = matmul_reference(x, w, layer.bias)
            return y if residual is None else residual + y
        from engine.kernels import ext
        from engine.kernels.triton.int4_gemm import int4_matmul  # decode kernel for small M, GEMM above

        shape = x.shape
        x2 = prepare_input(w, x.reshape(-1, shape[-1])).contiguous()
        m = x2.shape[0]
        r2 = None if residual is None else residual.reshape(m, -1)
        fused = r2 if r2 is not None and r2.dtype == x2.dtype and r2.is_contiguous() else None  # for the CUDA kernels
        if (INT4_KERNEL in ("auto", "gemv") and m <= INT4_CUDA_MAX_M
                and (m == 1 or INT4_KERNEL == "gemv" or ext.int4_gemv_tensor_cores(x2.shape[1], self.group_size))
                and ext.int4_gemv_supported(x2, self.group_size, w.g_idx)):  # fmt: skip
            # the CUDA GEMV: one row, or up to 8 on its tensor-core path (the FMA kernel is slow above one row)
            y = ext.int4_gemv(x2, w.qweight, w.scales, w.zeros, self.group_size, layer.bias, fused)
        elif INT4_KERNEL in ("auto", "mma") and ext.int4_mma_supported(x2, self.group_size, w.g_idx):
            y = ext.int4_mma(x2, w.qweight, w.scales, w.zeros, self.group_size, layer.bias, fused)
        elif INT4_KERNEL != "triton" and m > INT4_DEQUANT_M:  # prefill: compute bound, cuBLAS on the dense weight
            from engine.kernels.triton.int4_dequant import int4_dequantize

            dense = int4_dequantize(w.qweight, w.scales, w.zeros, self.group_size, w.g_idx, x2.dtype)
            y, fused = F.linear(x2, dense, layer.bias), None
        else:
            y, fused = int4_matmul(x2, w.qweight, w.scales, w.zeros, self.group_size, layer.bias, g_idx=w.g_idx), None
        if r2 is not None and fused is None:  # the kernel did not add it
            y = r2 + y
        return y.view(*shape[:-1], y.shape[-1])

    def weight_bytes(self, layer) -> int:
        return _buffer_bytes(layer)


class NF4LinearMethod(LinearMethod):
    """Buffers qweight uint8 [N, K/2] and absmax [N, K/64] (double-quantized absmax is expanded at load)."""

    def __init__(self):
        self._codes: dict[torch.device, torch.Tensor] = {}

    def create_weights(self, layer, in_features: int, out_features: int, bias: bool) -> None:
        if in_features % 64:
            raise ValueError(f"nf4: in_features {in_features} is not a multiple of 64")
        layer.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        layer.register_buffer("absmax", torch.empty(out_features, in_features // 64, dtype=torch.float32))
        _bias(layer, out_features, bias)

    def process_weights_after_loading(self, layer) -> None:
        layer.absmax = layer.absmax.float()  # a model-wide .to(bf16) would otherwise have rounded it

    def weight(self, layer) -> NF4Weight:
        return NF4Weight(layer.qweight, layer.absmax.float())

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda and x2.shape[0] <= 32:  # the fused decode kernel (tl.dot path above M = 1); bias in-kernel
            from engine.kernels.triton.nf4_gemv import nf4_gemv

            code = self._codes.get(x.device)
            if code is None:
                code = self._codes[x.device] = code_table(x.device)
            y = nf4_gemv(x2.contiguous(), layer.qweight, layer.absmax.float(), code, bias=layer.bias)
        else:
            y = F.linear(x2, dequantize_nf4(self.weight(layer), x.dtype), layer.bias)
        return y.view(*shape[:-1], y.shape[-1])

    def weight_bytes(self, layer) -> int:
        return _buffer_bytes(layer)


def method_for(w: Int4Weight | NF4Weight):
    return Int4LinearMethod.for_weight(w) if isinstance(w, Int4Weight) else NF4LinearMethod()
