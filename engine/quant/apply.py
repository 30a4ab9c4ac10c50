"""quantize_model: swap every Linear of a model except the lm_head (`output`) to a quantized weight, in place
(gpt-fast's replace_linear pattern), with RTN, AWQ, GPTQ or NF4.

Two kinds of Linear are handled:
- engine.model.layers.linear.Linear (the pluggable model): its method becomes Int4LinearMethod / NF4LinearMethod
  and its `weight` parameter is replaced by the packed buffers;
- torch.nn.Linear (a model without pluggable linears): fake quantization. The weight is overwritten with the
  dequantized weight (for AWQ with in_scale folded in: W' = Q(W s) / s), numerically the reference path
  (dequantize, then F.linear) up to float rounding order. The packed weight is kept as `module.quantized`.

AWQ and GPTQ calibrate one transformer block at a time, in order: its Linears' inputs come from one pass in which
the earlier blocks are already quantized and this block is still float (AutoAWQ's and AutoGPTQ's layer-wise
scheme; GPTQ's optional true-sequential sub-steps inside a block are not done); the pass stops at the block's
last Linear.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.quant.awq import quantize_awq
from engine.quant.calib import capture_inputs
from engine.quant.gptq import Hessian, quantize_gptq
from engine.quant.int4 import Int4Weight, dequantize, quantize_rtn
from engine.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

METHODS = ("rtn", "awq", "gptq", "nf4")
SKIP = ("output",)  # the lm_head stays in the model dtype


def quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear to quantize, in forward order."""
    out = []
    for name, mod in model.named_modules():
        if name in SKIP:
            continue
        if isinstance(mod, nn.Linear) or (hasattr(mod, "method") and hasattr(mod, "in_features")):
            out.append((name, mod))
    return out


def dense_weight(mod: nn.Module) -> torch.Tensor:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{mod}: no dense weight to quantize (already quantized?)")
    return w


def install(mod: nn.Module, q: Int4Weight | NF4Weight) -> None:
    """Put the quantized weight into the module (see the module docstring for the two kinds)."""
    if isinstance(mod, nn.Linear):
        deq = dequantize(q, fold_in_scale=True) if isinstance(q, Int4Weight) else dequantize_nf4(q)
        mod.weight.data.copy_(deq.to(mod.weight.dtype))
        mod.quantized = q
        return
    from engine.quant.methods import method_for

    method = method_for(q)
    bias = mod.bias
    del mod.weight
    method.create_weights(mod, mod.in_features, mod.out_features, False)
    for name, t in q.tensors().items():
        if name in ("absmax_q", "absmax_scale", "absmax_offset"):
            continue
        setattr(mod, name, t)
    if q.__class__ is NF4Weight and q.absmax is None:
        from engine.quant.nf4 import absmax_of

        mod.absmax = absmax_of(q)
    mod.bias = bias
    mod.method = method


def quantized_weight(mod: nn.Module) -> Int4Weight | NF4Weight | None:
    """The packed weight of a quantized module (either kind), None when it is dense."""
    if isinstance(mod, nn.Linear):
        return getattr(mod, "quantized", None)
    fn = getattr(getattr(mod, "method", None), "weight", None)
    return fn(mod) if callable(fn) else None


def _no_clip_rows(model: nn.Module, name: str) -> int:
    """q and k rows of a fused wqkv are not clipped (AutoAWQ skips q_proj / k_proj in its clip search)."""
    c = getattr(model, "config", None)
    return c.q_size + c.kv_size if c is not None and name.endswith("attention.wqkv") else 0


class _Stats:
    """What one Linear's calibration keeps: the GPTQ Hessian, or (AWQ) its input rows."""

    def __init__(self, method: str, mod: nn.Module, max_rows: int):
        self.method, self.max_rows = method, max_rows
        self.h = Hessian(mod.in_features, dense_weight(mod).device) if method == "gptq" else None
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        if self.h is not None:
            self.h.add(x)
        else:
            self.rows.append(x.detach().clone())

    def x(self) -> torch.Tensor:
        x = torch.cat(self.rows)
        if x.shape[0] > self.max_rows:  # evenly spaced rows: the search's cost grows with them, its result barely
            x = x[torch.linspace(0, x.shape[0] - 1, self.max_rows, device=x.device).long()]
        return x


def _calibrated_group(model, group, calib, method, group_size, dtype, opts) -> dict[str, Int4Weight]:
    """Quantize the Linears of one block from their inputs in one pass (earlier blocks already quantized)."""
    stats = [_Stats(method, mod, opts.get("max_rows", 8192)) for _, mod in group]
    capture_inputs(model, [mod for _, mod in group], calib, [s.add for s in stats])
    out = {}
    for (name, mod), st in zip(group, stats, strict=True):
        w = dense_weight(mod)
        if method == "gptq":
            out[name] = quantize_gptq(w, st.h.h, group_size, dtype, act_order=opts.get("act_order", False),
                                      damp=opts.get("damp", 0.01))
        else:
            out[name] = quantize_awq(w, st.x(), group_size, dtype, no_clip_rows=_no_clip_rows(model, name),
                                     clip=opts.get("clip", True), duo_scaling=opts.get("duo_scaling", True),
                                     post=_mlp_output(group, name))
    return out


def _mlp_output(group, name: str):
    """For a fused [gate; up] Linear: y -> w2(silu(gate) * up) with the block's (still float) w2, else None."""
    if not name.endswith("feed_forward.w13"):
        return None
    w2 = dict(group).get(name.removesuffix("w13") + "w2")
    if w2 is None:
        return None
    from engine import ops

    w2w = dense_weight(w2).float()
    return lambda y: ops.silu_and_mul(y) @ w2w.T


def _blocks(targets: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Group the Linears by transformer block (the name up to the layer index), in forward order."""
    groups: dict[str, list] = {}
    for name, mod in targets:
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else name
        groups.setdefault(key, []).append((name, mod))
    return list(groups.values())


def quantize_model(model: nn.Module, method: str, calib: Iterable[list[list[int]]] | None = None,
                   group_size: int = 128, **opts) -> dict[str, Int4Weight | NF4Weight]:
    """Quantize every Linear except `output` in place; returns {module name: packed weight}.

    method: rtn | awq | gptq (int4, asymmetric, group_size) | nf4 (block 64; opts double_quant=True).
    calib: batches of token lists (engine.quant.calib.stdlib_calibration), required by awq and gptq.
    opts: act_order (gptq), damp (gptq, 0.01), clip / duo_scaling (awq, True), max_rows (awq search rows,
    8192)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r} (supported: {', '.join(METHODS)})")
    if method in ("awq", "gptq"):
        if calib is None:
            raise ValueError(f"{method} needs calibration data (calib=...; see engine.quant.calib)")
        calib = list(calib)  # iterated once per Linear
    dtype = getattr(model, "dtype", None)
    out: dict[str, Int4Weight | NF4Weight] = {}
    targets = quantizable(model)
    if method in ("awq", "gptq"):
        for group in _blocks(targets):
            dt = dtype if isinstance(dtype, torch.dtype) else dense_weight(group[0][1]).dtype
            packed = _calibrated_group(model, group, calib, method, group_size, dt, opts)
            with torch.inference_mode():
                for name, mod in group:
                    install(mod, packed[name])
            out.update(packed)
        return out
    with torch.inference_mode():
        for name, mod in targets:
            w = dense_weight(mod)
            dt = dtype if isinstance(dtype, torch.dtype) else w.dtype
            if method == "rtn":
                q = quantize_rtn(w, group_size, dt)
            else:
                q = quantize_nf4(w, double_quant=opts.get("double_quant", False))
            install(mod, q)
            out[name] = q
    return out
