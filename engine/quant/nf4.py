"""NF4 (QLoRA's 4-bit NormalFloat, bitsandbytes' code book): blocks of 64 consecutive weights of a row, each
scaled by its absmax, every value the nearest of 16 levels. Optional double quantization of the absmax.

Layout for W [N, K] (64 divides K):

    qweight  uint8   [N, K/2]    two codes per byte, bitsandbytes' order: element 2i in the HIGH nibble, 2i+1 low
    absmax   float32 [N, K/64]   per-block absmax
    W[n, k] = NF4_CODE[code[n, k]] * absmax[n, k // 64]

Double quant (`double_quant=True`, QLoRA's idea, not bitsandbytes' exact 8-bit dynamic code): the absmax minus
its mean is stored as int8 with one float32 scale per 256 absmax values (absmax_q, absmax_scale, absmax_offset);
`absmax_of` expands it back to float32 once, when the layer is loaded (the kernels read float32 absmax), so it
saves space on disk, not in GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 64
NESTED_BLOCK = 256
# bitsandbytes functional.py get_4bit_type("nf4") (QLoRA appendix E), index = code
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def code_table(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@dataclass
class NF4Weight:
    qweight: torch.Tensor  # uint8 [N, K/2]
    absmax: torch.Tensor | None  # float32 [N, K/64] (None when double-quantized)
    absmax_q: torch.Tensor | None = None  # int8 [N * K/64] (double quant)
    absmax_scale: torch.Tensor | None = None  # float32 [ceil(N*K/64 / 256)]
    absmax_offset: torch.Tensor | None = None  # float32 [1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("qweight", "absmax", "absmax_q", "absmax_scale", "absmax_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15) -> uint8 [N, K/2], element 2i high nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] << 4) | c[:, 1::2]


def unpack_nf4(qweight: torch.Tensor) -> torch.Tensor:
    n, h = qweight.shape
    return torch.stack([qweight >> 4, qweight & 0xF], dim=-1).view(n, 2 * h)


def _double_quant(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = absmax.reshape(-1).float()
    offset = flat.mean()
    pad = (-flat.numel()) % NESTED_BLOCK
    blocks = F.pad(flat - offset, (0, pad)).view(-1, NESTED_BLOCK)
    scale = blocks.abs().amax(-1).clamp(min=1e-12) / 127
    q = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)[: flat.numel()]
    return q, scale, offset.view(1)


def absmax_of(w: NF4Weight) -> torch.Tensor:
    """float32 [N, K/64] absmax (expanding double quant)."""
    if w.absmax is not None:
        return w.absmax.float()
    n, k = w.shape
    q = w.absmax_q.float()
    scale = w.absmax_scale.float().repeat_interleave(NESTED_BLOCK)[: q.numel()]
    return (q * scale + w.absmax_offset.float()).view(n, k // BLOCK)


def quantize_nf4(w: torch.Tensor, double_quant: bool = False) -> NF4Weight:
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"nf4: in_features {k} must be a multiple of the block size {BLOCK}")
    wb = w.float().view(n, k // BLOCK, BLOCK)
    absmax = wb.abs().amax(-1).clamp(min=1e-12)
    if double_quant:  # quantize against the absmax the kernels will see
        aq, ascale, aoff = _double_quant(absmax)
        stored = NF4Weight(torch.empty(n, k // 2, dtype=torch.uint8), None, aq, ascale, aoff)
        absmax = absmax_of(stored).clamp(min=1e-12)
    normed = (wb / absmax[:, :, None]).clamp(-1, 1)
    table = code_table(w.device)
    mids = (table[1:] + table[:-1]) / 2  # nearest level = number of midpoints below the value
    codes = torch.bucketize(normed.contiguous(), mids).view(n, k)
    packed = pack_nf4(codes)
    if double_quant:
        return NF4Weight(packed, None, aq, ascale, aoff)
    return NF4Weight(packed, absmax)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = w.shape
    vals = code_table(w.qweight.device)[unpack_nf4(w.qweight).long()].view(n, k // BLOCK, BLOCK)
    return (vals * absmax_of(w)[:, :, None]).view(n, k).to(dtype)


def matmul_reference_nf4(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dequantize_nf4(w, x.dtype), bias)
