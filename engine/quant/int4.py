"""Anvil's one packed format for group-wise asymmetric int4 weights (RTN, AWQ, GPTQ and imported checkpoints),
with round-to-nearest quantization, packing, and the torch reference (dequantize, then matmul).

The format, for a weight W [N, K] (out, in; nn.Linear's layout) and a group size G (128; G divides K, 8 divides K):

    qweight  int32 [N, K/8]   nibble j (bits 4j..4j+3, low nibble first) of qweight[n, w] is q[n, 8w + j], 0..15
    scales   dtype [N, K/G]   the model dtype (bf16 / fp16 / fp32)
    zeros    dtype [N, K/G]   the integer zero point of each group, stored in the model dtype (exact: 0..16)
    g_idx    int32 [K]        optional (act-order GPTQ): the group of input channel k (default k // G)
    in_scale dtype [K]        optional (our AWQ): x is multiplied by in_scale (= 1/s) before the matmul

    W[n, k] = (q[n, k] - zeros[n, g(k)]) * scales[n, g(k)]   with g(k) = g_idx[k] or k // G   (in float32)
    y = (x * in_scale) @ W^T

Row-major in N, so the rows of a fused [q; k; v] or [gate; up] weight split and concatenate like dense rows, and
a GEMV program reads a contiguous run of K/8 words per row. Act-order keeps the columns in input order and
indexes the groups through g_idx (as GPTQ checkpoints do), so fused projections with different orders still
concatenate and x is never permuted. Zeros are kept as floats (not packed nibbles) so the
GPTQ v1 convention (stored zero + 1, which reaches 16) needs no special case; they cost 2 bytes per 128 weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

BITS = 4
PACK = 32 // BITS  # int4 values per int32 word
MAXQ = (1 << BITS) - 1
SHIFTS = tuple(range(0, 32, BITS))


@dataclass
class Int4Weight:
    """One layer's packed int4 weight (see the module docstring for the layout)."""

    qweight: torch.Tensor  # int32 [N, K/8]
    scales: torch.Tensor  # [N, K/G] model dtype
    zeros: torch.Tensor  # [N, K/G] model dtype
    group_size: int
    g_idx: torch.Tensor | None = None  # int32 [K]
    in_scale: torch.Tensor | None = None  # [K] model dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * PACK

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layer's buffers by name (optional ones only when present)."""
        out = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        if self.in_scale is not None:
            out["in_scale"] = self.in_scale
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> Int4Weight:
        """Move to a device; cast the float tensors (scales, zeros, in_scale) to dtype."""

        def mv(t, is_float):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (is_float and dtype is not None) else t.dtype)

        return replace(self, qweight=mv(self.qweight, False), scales=mv(self.scales, True),
                       zeros=mv(self.zeros, True), g_idx=mv(self.g_idx, False), in_scale=mv(self.in_scale, True))


def check_shapes(n: int, k: int, group_size: int) -> None:
    if k % PACK or k % group_size or group_size % PACK:
        raise ValueError(f"int4 g{group_size}: in_features {k} must be a multiple of {PACK} and of the group size")
    del n


# ----------------------------------------------------------------------------------------------- bit packing
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] (0..15) -> int32 [N, K/8], value k in nibble k % 8 (low nibble first)."""
    n, k = q.shape
    q = q.to(torch.int64).view(n, k // PACK, PACK)
    words = torch.zeros(n, k // PACK, dtype=torch.int64, device=q.device)
    for j, s in enumerate(SHIFTS):
        words |= (q[:, :, j] & MAXQ) << s
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement: bit 31 set -> negative int32


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] -> uint8 [N, K] (0..15)."""
    n, w = qweight.shape
    shifts = torch.tensor(SHIFTS, dtype=torch.int32, device=qweight.device)
    return ((qweight[:, :, None] >> shifts) & MAXQ).to(torch.uint8).view(n, w * PACK)


# ------------------------------------------------------------------------------------------------- reference
def group_index(w: Int4Weight) -> torch.Tensor:
    """int64 [K]: the group of every input channel."""
    k = w.shape[1]
    if w.g_idx is not None:
        return w.g_idx.long()
    return torch.arange(k, device=w.qweight.device) // w.group_size


def dequantize(w: Int4Weight, dtype: torch.dtype = torch.float32, fold_in_scale: bool = False) -> torch.Tensor:
    """[N, K] weights in dtype (computed in float32); fold_in_scale multiplies column k by in_scale[k], giving
    the dense W with y = x @ W^T."""
    n, k = w.shape
    g = group_index(w)
    q = unpack_int4(w.qweight).float()
    deq = (q - w.zeros.float()[:, g]) * w.scales.float()[:, g]
    if fold_in_scale and w.in_scale is not None:
        deq = deq * w.in_scale.float()[None, :]
    return deq.to(dtype)


def prepare_input(w: Int4Weight, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> x * in_scale in x.dtype (a no-op without in_scale)."""
    return x if w.in_scale is None else x * w.in_scale.to(x.dtype)


def matmul_reference(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x' @ dequantize(w)^T + bias, the weights dequantized into x.dtype (the CPU path)."""
    return F.linear(prepare_input(w, x), dequantize(w, x.dtype), bias)


# ------------------------------------------------------------------------------------------------------- RTN
def group_params(w: torch.Tensor, group_size: int, dtype: torch.dtype,
                 clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max parameters per group (AutoAWQ's pseudo_quantize_tensor): w [N, K] ->
    (scales [N, K/G] rounded to dtype, zeros [N, K/G] integer-valued). clip [N, K/G] (optional) bounds |w|
    (AWQ's clip search)."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    if clip is not None:
        c = clip.float()[:, :, None]
        wg = wg.clamp(-c, c)
    wmax, wmin = wg.amax(-1), wg.amin(-1)
    scales = ((wmax - wmin).clamp(min=1e-5) / MAXQ).to(dtype)
    zeros = (-torch.round(wmin / scales.float())).clamp(0, MAXQ)
    return scales, zeros.to(dtype)


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] -> int codes [N, K] in 0..15 for the given group parameters."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    q = torch.round(wg / scales.float()[:, :, None]) + zeros.float()[:, :, None]
    return q.clamp(0, MAXQ).to(torch.uint8).view(n, k)


def fake_quantize(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None,
                  clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (float32 [N, K]): the search loops of AWQ use this."""
    n, k = w.shape
    scales, zeros = group_params(w, group_size, dtype or w.dtype, clip)
    q = quantize_codes(w, scales, zeros, group_size).float().view(n, k // group_size, group_size)
    return ((q - zeros.float()[:, :, None]) * scales.float()[:, :, None]).view(n, k)


def quantize_rtn(w: torch.Tensor, group_size: int = 128, dtype: torch.dtype | None = None,
                 clip: torch.Tensor | None = None) -> Int4Weight:
    """Round-to-nearest, asymmetric, per group of group_size input channels. dtype: of scales/zeros (w's)."""
    n, k = w.shape
    check_shapes(n, k, group_size)
    dt = dtype or w.dtype
    scales, zeros = group_params(w, group_size, dt, clip)
    q = quantize_codes(w, scales, zeros, group_size)
    return Int4Weight(pack_int4(q), scales, zeros, group_size)
