"""The op table: each op runs the CUDA extension for CUDA tensors when it is loadable, else the pure-torch reference.

The names and semantics are those of engine/kernels/reference.py (the contract). The extension
(engine/kernels/ext.py) is imported lazily, on the first CUDA tensor or backend() call, so importing the
engine never triggers a build; an op the extension lacks falls back to the reference.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from engine.kernels import reference

_ext: ModuleType | None = None
_ext_reason: str | None = None  # None = not probed yet


def _probe() -> None:
    global _ext, _ext_reason
    if _ext_reason is not None:
        return
    if not torch.cuda.is_available():
        _ext_reason = "no CUDA device"
        return
    try:
        mod = importlib.import_module("engine.kernels.ext")
    except Exception as e:  # a broken build must not break the reference path
        _ext_reason = f"engine.kernels.ext not importable: {type(e).__name__}: {e}"
        return
    try:
        ok = mod.is_available()
    except Exception as e:
        ok, _ext_reason = False, f"engine.kernels.ext.is_available() failed: {type(e).__name__}: {e}"
        return
    why = getattr(mod, "why_unavailable", lambda: "")()
    if ok:
        _ext, _ext_reason = mod, why or "CUDA extension loaded"
    else:
        _ext_reason = why or "CUDA extension not available"


def backend() -> tuple[str, str]:
    """("cuda-ext" | "reference", reason) for CUDA tensors; CPU tensors always use the reference.

    Even with the extension loaded, inputs outside its limits (e.g. float32 attention, head_dim 16) run the
    reference op."""
    _probe()
    return ("cuda-ext" if _ext is not None else "reference", _ext_reason or "")


_EXT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ATTN_OPS = ("prefill_attention", "decode_attention")


def _ext_takes(name: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    """The extension's documented limits: attention in fp16/bf16 with head_dim 64 or 128, operands 16-byte
    aligned with strides in multiples of 8 elements; everything else fp32/fp16/bf16."""
    x = tensors[0]
    if x.dtype not in _EXT_DTYPES:
        return False
    if name in _ATTN_OPS:
        if x.dtype == torch.float32 or x.shape[-1] not in (64, 128):
            return False
        return all(t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1]) for t in tensors)
    return True


def _impl(name: str, *tensors: torch.Tensor):
    """The extension's op for CUDA tensors it can take, else the reference."""
    if tensors[0].is_cuda:
        _probe()
        if _ext is not None:
            fn = getattr(_ext, name, None)
            if fn is not None and _ext_takes(name, tensors):
                return fn
    return getattr(reference, name)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _impl("rms_norm", x)(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl("fused_add_rms_norm", x)(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _impl("silu_and_mul", x)(x)


def rope_cos_sin(inv_freq: torch.Tensor, max_pos: int) -> torch.Tensor:
    return _impl("rope_cos_sin", inv_freq)(inv_freq, max_pos)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl("rope", q)(q, k, positions, cos_sin)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = True,
    window: int = 0,
) -> torch.Tensor:
    return _impl("prefill_attention", q, k, v)(q, k, v, cu_seqlens, scale, causal, window)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    return _impl("decode_attention", q, k_cache, v_cache)(q, k_cache, v_cache, seq_lens, scale, window)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_idx: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    _impl("write_kv", k)(k_cache, v_cache, k, v, batch_idx, positions)
