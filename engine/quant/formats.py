"""Users' int4 checkpoints -> Anvil's packed format (engine/quant/int4.py), bit-exact, and the quantization_config
check that names whatever is not supported.

Supported (per HF Linear, e.g. model.layers.0.self_attn.q_proj.{qweight, qzeros, scales[, g_idx, bias]}):

- AutoAWQ GEMM (`quant_method: awq`, `version: gemm`, `zero_point: true`, bits 4): qweight int32 [K, N/8] and
  qzeros int32 [K/G, N/8] packed along N in AWQ's interleaved order (nibble j of a word holds column
  8c + [0, 2, 4, 6, 1, 3, 5, 7][j]), scales fp16 [K/G, N]; W[n, k] = (q - z) * s. Not supported: versions gemv,
  gemv_fast, marlin, exllama, ipex; zero_point false; bits != 4.
- GPTQ (`quant_method: gptq`, AutoGPTQ / GPTQModel / optimum): qweight int32 [K/8, N] packed along K (nibble j of
  row r is k = 8r + j), qzeros int32 [K/G, N/8] packed along N (sequential order), scales fp16 [K/G, N], g_idx
  int32 [K] (act-order: desc_act). checkpoint_format `gptq` (v1, the default and every older checkpoint): the
  stored zero is zero - 1, so z = (stored & 15) + 1, 1..16 (sym checkpoints store 7 for z = 8); `gptq_v2`
  (GPTQModel): z = stored. Not supported: bits != 4, checkpoint_format marlin / bitblas / ipex / anything else,
  other quant_methods (exl2, bitsandbytes, fp8, ...).
- `quant_method: anvil` (ours, written by engine.quant.save_quantized): the int4 format itself (qweight, scales,
  zeros[, g_idx, in_scale]) or NF4 (qweight, absmax), per HF Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quant.int4 import MAXQ, SHIFTS, Int4Weight, pack_int4
from engine.quant.nf4 import NF4Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8c + AWQ_ORDER[j]


class UnsupportedQuantization(ValueError):
    """A checkpoint's quantization is not one Anvil reads (the message names the option and the value)."""


@dataclass(frozen=True)
class QuantSpec:
    kind: str  # "awq" | "gptq" | "anvil-int4" | "anvil-nf4"
    group_size: int  # -1: one group per row (K)
    zero_plus_one: bool = False  # GPTQ v1: stored zeros are zero - 1


def parse_quant_config(qc: dict) -> QuantSpec:
    """Check a config.json quantization_config (or quantize_config.json) and name what is unsupported."""
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit", 4))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method not in ("awq", "gptq", "anvil"):
        raise UnsupportedQuantization(f"unsupported quant_method {method!r} (supported: awq (gemm), gptq, anvil)")
    if method == "anvil" and qc.get("format") == "nf4":
        return QuantSpec("anvil-nf4", 64)
    if bits != 4:
        raise UnsupportedQuantization(f"{method}: bits={bits} is not supported (only 4-bit)")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedQuantization(f"awq: version {version!r} is not supported (only 'gemm')")
        if not qc.get("zero_point", True):
            raise UnsupportedQuantization("awq: zero_point=false is not supported (only asymmetric GEMM)")
        return QuantSpec("awq", group)
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedQuantization(f"gptq: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        return QuantSpec("gptq", group, zero_plus_one=fmt == "gptq")
    return QuantSpec("anvil-int4", group)


def _unpack_cols(packed: torch.Tensor, order=None) -> torch.Tensor:
    """int32 [R, C] packed along columns -> int64 [R, 8C]; output column 8c + order[j] = nibble j of word c."""
    r, c = packed.shape
    nib = torch.stack([(packed.to(torch.int64) >> s) & MAXQ for s in SHIFTS], -1)  # [R, C, 8], nibble j
    if order is not None:
        nib = nib[:, :, torch.argsort(torch.tensor(order))]  # position p <- the nibble holding column p
    return nib.reshape(r, 8 * c)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] packed along rows (row 8r + j = nibble j of row r) -> int64 [8R, C]."""
    r, c = packed.shape
    nib = torch.stack([(packed.to(torch.int64) >> s) & MAXQ for s in SHIFTS], 1)  # [R, 8, C]
    return nib.reshape(8 * r, c)


def _group(group_size: int, k: int) -> int:
    return k if group_size <= 0 else group_size


def decode_awq(t: dict[str, torch.Tensor], group_size: int) -> Int4Weight:
    q = _unpack_cols(t["qweight"], AWQ_ORDER)  # [K, N]
    z = _unpack_cols(t["qzeros"], AWQ_ORDER)  # [K/G, N]
    k, n = q.shape
    g = _group(group_size, k)
    _check_groups("awq", t["scales"], k, n, g)
    return Int4Weight(pack_int4(q.T.contiguous()), t["scales"].T.contiguous(), z.T.contiguous().to(t["scales"].dtype), g)


def decode_gptq(t: dict[str, torch.Tensor], group_size: int, zero_plus_one: bool) -> Int4Weight:
    q = _unpack_rows(t["qweight"])  # [K, N]
    z = _unpack_cols(t["qzeros"])  # [K/G, N]
    if zero_plus_one:
        z = z + 1
    k, n = q.shape
    g = _group(group_size, k)
    _check_groups("gptq", t["scales"], k, n, g)
    g_idx = t.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
        if torch.equal(g_idx.long(), torch.arange(k) // g):
            g_idx = None  # trivial (desc_act false): the plain k // G layout
        elif int(g_idx.min()) < 0 or int(g_idx.max()) >= k // g:
            raise UnsupportedQuantization(f"gptq: g_idx values outside 0..{k // g - 1}")
    w = Int4Weight(pack_int4(q.T.contiguous()), t["scales"].T.contiguous(), z.T.contiguous().to(t["scales"].dtype), g)
    w.g_idx = g_idx
    return w


def _check_groups(kind: str, scales: torch.Tensor, k: int, n: int, g: int) -> None:
    if k % g or tuple(scales.shape) != (k // g, n):
        raise UnsupportedQuantization(f"{kind}: scales {list(scales.shape)} do not match K={k}, N={n}, group {g}")


def decode_anvil(t: dict[str, torch.Tensor], spec: QuantSpec) -> Int4Weight | NF4Weight:
    if spec.kind == "anvil-nf4":
        return NF4Weight(t["qweight"], t["absmax"].float())
    k = t["qweight"].shape[1] * 8
    return Int4Weight(t["qweight"], t["scales"], t["zeros"], _group(spec.group_size, k), t.get("g_idx"),
                      t.get("in_scale"))


def decode(t: dict[str, torch.Tensor], spec: QuantSpec) -> Int4Weight | NF4Weight:
    """One HF Linear's tensors (names below its prefix) -> the packed weight."""
    if spec.kind == "awq":
        return decode_awq(t, spec.group_size)
    if spec.kind == "gptq":
        return decode_gptq(t, spec.group_size, spec.zero_plus_one)
    return decode_anvil(t, spec)


def tensor_names(spec: QuantSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor names of one quantized Linear in this format."""
    if spec.kind == "awq":
        return ("qweight", "qzeros", "scales"), ("bias",)
    if spec.kind == "gptq":
        return ("qweight", "qzeros", "scales"), ("g_idx", "bias")
    if spec.kind == "anvil-nf4":
        return ("qweight", "absmax"), ("bias",)
    return ("qweight", "scales", "zeros"), ("g_idx", "in_scale", "bias")


def concat_rows(parts: list[Int4Weight | NF4Weight], where: str) -> Int4Weight | NF4Weight:
    """Fuse [q; k; v] or [gate; up]: rows concatenate; per-input-channel tensors must agree."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, NF4Weight):
        return NF4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.absmax for p in parts]))
    for p in parts[1:]:
        if p.group_size != first.group_size:
            raise UnsupportedQuantization(f"{where}: the fused projections have different group sizes")
        for name in ("g_idx", "in_scale"):
            a, b = getattr(first, name), getattr(p, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise UnsupportedQuantization(
                    f"{where}: the fused projections have different {name} (act-order orders differ), which "
                    f"one fused Linear cannot hold")
    return Int4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                      torch.cat([p.zeros for p in parts]), first.group_size, first.g_idx, first.in_scale)
