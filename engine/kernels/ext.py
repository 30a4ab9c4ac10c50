"""Typed Python wrappers over the anvil CUDA ops (same names and signatures as reference.py), their fake impls for
torch.compile, and loading: an ahead-of-time build (engine/kernels/_C*.so from setup.py) or a cached JIT build."""

from __future__ import annotations

import glob
import os
import threading
from pathlib import Path

import torch

from engine.kernels import reference

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "why": "not loaded yet", "how": None}


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor tracing can see through the ops."""
    lib = "anvil::"

    @torch.library.register_fake(lib + "rms_norm")
    def _(x, weight, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "fused_add_rms_norm")
    def _(x, residual, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake(lib + "silu_and_mul")
    def _(x):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake(lib + "rope_")
    def _(q, k, positions, cos_sin):
        return None

    @torch.library.register_fake(lib + "prefill_attention")
    def _(q, k, v, cu_seqlens, scale, causal, window):
        return q.new_empty(q.shape)

    @torch.library.register_fake(lib + "decode_attention")
    def _(q, k_cache, v_cache, seq_lens, scale, window):
        return q.new_empty(q.shape)

    @torch.library.register_fake(lib + "write_kv")
    def _(k_cache, v_cache, k, v, batch_idx, positions):
        return None

    @torch.library.register_fake(lib + "int4_gemv")
    def _(x, qweight, scales, zeros, group_size, bias, residual=None):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake(lib + "int4_mma")
    def _(x, qweight, scales, zeros, group_size, bias, residual=None):
        return x.new_empty((x.shape[0], qweight.shape[0]))


def _prebuilt() -> list[str]:
    return sorted(glob.glob(str(Path(__file__).resolve().parent / "_C*.so")))


def _load() -> None:
    errors: list[str] = []
    if os.environ.get("ANVIL_EXT", "1") == "0":
        raise RuntimeError("disabled by ANVIL_EXT=0")
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    if not hasattr(torch.ops, "anvil") or not hasattr(torch.ops.anvil, "rms_norm"):
        for so in _prebuilt():
            try:
                torch.ops.load_library(so)
                _state["how"] = f"prebuilt {so}"
                break
            except Exception as e:  # e.g. built against another torch
                errors.append(f"prebuilt {Path(so).name}: {e}")
        else:
            if os.environ.get("ANVIL_JIT", "1") == "0":
                raise RuntimeError("; ".join(errors + ["no prebuilt library and JIT disabled by ANVIL_JIT=0"]))
            from engine.kernels import build

            try:
                build.load(verbose=os.environ.get("ANVIL_BUILD_VERBOSE") == "1")
            except Exception as e:
                raise RuntimeError("; ".join(errors + [f"JIT build failed: {e}"])) from e
            _state["how"] = f"JIT build under {build.build_dir()}"
    try:
        _register_fakes()
    except RuntimeError as e:  # already registered by an earlier load in this process
        if "already" not in str(e):
            raise


def is_available() -> bool:
    """True when the ops are loaded (loading/building on first call); never raises."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _load()
                _state["ok"], _state["why"] = True, f"loaded ({_state['how']})"
            except Exception as e:
                _state["ok"], _state["why"] = False, f"{type(e).__name__}: {e}"
        return bool(_state["ok"])


def why_unavailable() -> str:
    """Why is_available() is False (or how the library was loaded when it is True)."""
    is_available()
    return str(_state["why"])


def _ops():
    if torch.compiler.is_compiling():  # dynamo cannot trace the lock below; the ops are loaded by then
        return torch.ops.anvil
    if not is_available():
        raise RuntimeError(f"anvil CUDA extension unavailable: {why_unavailable()}")
    return torch.ops.anvil


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N], weight [N] (same dtype) -> [..., N]."""
    return _ops().rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual), both new tensors."""
    out, res = _ops().fused_add_rms_norm(x, residual, weight, eps)
    return out, res


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2F] = [gate | up] -> silu(gate) * up [..., F]."""
    return _ops().silu_and_mul(x)


def rope_cos_sin(inv_freq: torch.Tensor, max_pos: int) -> torch.Tensor:
    """The table is built once per model: the reference is the implementation."""
    return reference.rope_cos_sin(inv_freq, max_pos)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, H, D] and k [T, Hkv, D] IN PLACE and returns them (the reference returns copies).

    q/k may be strided views (e.g. of a fused qkv projection) with a contiguous last dim. positions [T] int.
    """
    _ops().rope_(q, k, positions.long(), cos_sin)
    return q, k


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = True,
    window: int = 0,
) -> torch.Tensor:
    """Varlen packed attention: q [T, H, D], k/v [T, Hkv, D] (fp16/bf16, D in {64, 128}), cu_seqlens [B+1] int32."""
    return _ops().prefill_attention(q, k, v, cu_seqlens, float(scale), bool(causal), int(window))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """q [B, H, D] against caches [B, Hkv, S_max, D]; seq_lens [B] int32 (values above S_max are clamped)."""
    return _ops().decode_attention(q, k_cache, v_cache, seq_lens, float(scale), int(window))


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_idx: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Scatter k/v [T, Hkv, D] into the caches at (batch_idx[t], :, positions[t]); out-of-range pairs are skipped."""
    if batch_idx.dtype != positions.dtype:
        batch_idx, positions = batch_idx.long(), positions.long()
    _ops().write_kv(k_cache, v_cache, k, v, batch_idx, positions)


INT4_GEMV_MAX_M = 8  # anvil::kInt4GemvMaxM


def int4_gemv_supported(x: torch.Tensor, group_size: int, g_idx: torch.Tensor | None) -> bool:
    """Whether `int4_gemv` takes this call (else the Triton kernels do): CUDA fp16 / bf16 x with 1..8 rows, no
    act-order, K and G multiples of 32, the extension loaded."""
    m, k = x.shape
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and 1 <= m <= INT4_GEMV_MAX_M and g_idx is None
            and k % 32 == 0 and group_size % 32 == 0 and is_available())  # fmt: skip


def int4_gemv_tensor_cores(k: int, group_size: int) -> bool:
    """Whether `int4_gemv` runs its tensor-core path (int4_tc_gemv.cu) for this K and group size: both multiples of
    128 and ANVIL_INT4_GEMV_TC not 0 (else the FMA kernel, int4_gemv.cu)."""
    return k % 128 == 0 and group_size % 128 == 0 and os.environ.get("ANVIL_INT4_GEMV_TC", "1") != "0"


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y [M, N] = x [M <= 8, K] @ ((q - z) * s)^T (+ bias) for Anvil's packed int4 (engine/quant/int4.py):
    qweight int32 [N, K/8], scales / zeros [N, K/G] in x.dtype (fp16 / bf16); with `residual` [M, N] the rounded
    product plus residual (one rounding more, as `residual + y` in x.dtype). K, G multiples of 128:
    the tensor-core kernel engine/kernels/csrc/int4_tc_gemv.cu (ANVIL_INT4_GEMV_TC=0: the FMA kernel), else the
    FMA kernel engine/kernels/csrc/int4_gemv.cu; on sm_90 a PDL launch (ANVIL_PDL=0: plain)."""
    return _ops().int4_gemv(x, qweight, scales, zeros, int(group_size), bias, residual)


_TAKES_PROLOGUE: dict[tuple, bool] = {}
_TC_ENV = ("ANVIL_INT4_GEMV_TC", "ANVIL_INT4_TC_V", "ANVIL_INT4_TC_R", "ANVIL_INT4_TC_KS", "ANVIL_INT4_TC_P")


def int4_gemv_takes_prologue(m: int, n: int, k: int, group_size: int) -> bool:
    """Whether `int4_gemv_norm` / `int4_gemv_swiglu` take m rows against an [n, k] weight (x [m, k], for SwiGLU
    [m, 2k]) under the current env: the tensor-core GEMV's
    x-in-shared-memory kernel (int4_tc_gemv.cu: K, G multiples of 128, M <= 8, x and its K-split sums in 46 KB,
    ANVIL_INT4_TC_V >= 2, 3 the default). The extension's own rule, asked once per shape and env."""
    key = (m, n, k, group_size, *(os.environ.get(e) for e in _TC_ENV))
    if key not in _TAKES_PROLOGUE:
        _TAKES_PROLOGUE[key] = bool(_ops().int4_gemv_takes_prologue(m, n, k, group_size))
    return _TAKES_PROLOGUE[key]


def int4_gemv_norm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, norm_weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`int4_gemv(rms_norm(x, norm_weight, eps), ...)` in one kernel: the RMSNorm applied as x is staged in shared
    memory (fp32 sums in another order than the Triton kernel's, so within an ulp of the unfused path, not bit for
    bit). Only where `int4_gemv_takes_prologue`; elsewhere a clear error."""
    return _ops().int4_gemv_norm(x, qweight, scales, zeros, int(group_size), norm_weight, float(eps), bias, residual)


def int4_gemv_swiglu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`int4_gemv(silu_and_mul(x), ...)` for x [M, 2K] = [gate | up] in one kernel (the SwiGLU computed as x is
    staged, `__expf` for the Triton kernel's exp, so within an ulp of the unfused path). Only where
    `int4_gemv_takes_prologue`; elsewhere a clear error."""
    return _ops().int4_gemv_swiglu(x, qweight, scales, zeros, int(group_size), bias, residual)


INT4_MMA_MAX_M = 64  # anvil::kInt4MmaMaxM


def int4_mma_supported(x: torch.Tensor, group_size: int, g_idx: torch.Tensor | None) -> bool:
    """Whether `int4_mma` takes this call: CUDA fp16 / bf16 x with 1..64 rows, no act-order, K and G multiples of
    128, a GPU with bf16 MMA (sm_80+), the extension loaded."""
    m, k = x.shape
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and 1 <= m <= INT4_MMA_MAX_M and g_idx is None
            and k % 128 == 0 and group_size % 128 == 0 and torch.cuda.get_device_capability(x.device)[0] >= 8
            and is_available())  # fmt: skip


def int4_mma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
             bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """int4_gemv's contract (residual included) on the tensor cores (mma.sync m16n8k16, fp32 accumulation):
    x [M <= 64, K], K and G multiples of 128. engine/kernels/csrc/int4_mma.cu."""
    return _ops().int4_mma(x, qweight, scales, zeros, int(group_size), bias, residual)
