"""The CUDA LinearMethod for dense weights: per (M, N, K, act) the fastest of cuBLAS and the Triton GEMV configs,
measured on the device (engine/kernels/triton/tune.py), with the RMSNorm prologue and the residual epilogue fused
into the batch-1 fma GEMV and the residual add into the dot GEMV."""

from __future__ import annotations

import os

import torch

from engine.model.layers.linear import Linear, UnquantizedLinearMethod
from engine.model.llama import Transformer

# ANVIL_GEMV_TMA=1: the TMA skinny GEMM (engine/kernels/triton/skinny_tma.py) joins the candidates at 2..64 rows on
# sm_90+, and buckets up to 64 are tuned; else buckets up to 32. Larger ones: cuBLAS. H100, one call
# (results/gpu/core-h100/skinny-16f03ba/): bf16 decode b8 / b32 / b64 +7.3 / +7.0 / +7.4% with it; still opt-in: with
# it on, 21 of test_core_gpu.py's 63 tests (float32 models) failed at graph capture (a config out of shared memory
# with the residual epilogue the tuner did not time; the tuner now does, not yet re-run on a GPU).
GEMV_TMA = os.environ.get("ANVIL_GEMV_TMA", "0") == "1"
MAX_TUNED_M = 64 if GEMV_TMA else 32


class GemvLinearMethod(UnquantizedLinearMethod):
    """Shares one GemvTuner across every Linear of the model (its choices are keyed by shape)."""

    def __init__(self, tuner) -> None:
        from engine.kernels.triton import gemv

        self.tuner = tuner
        self._gemv = gemv

    def matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return self.apply(layer, x)

    def apply(self, layer, x, norm=None, act=False, residual=None):
        w = layer.weight
        m = x.shape[0]
        n, k = w.shape
        cfg = self.tuner.get(m, n, k, act) if m <= MAX_TUNED_M else self._gemv.CUBLAS
        return self._gemv.step_linear(x, w, cfg, layer.bias, act=act, norm_weight=None if norm is None else norm.weight,
                                      eps=0.0 if norm is None else norm.eps, residual=residual)  # fmt: skip

    def fused_rope(self, layer, x, norm, rope):
        """The batch-1 fma GEMV with RoPE + the KV write as its epilogue (gemv.linear_rope), when the tuned config
        holds whole rotation pairs; None otherwise (the caller projects, then the backend rotates)."""
        w, s = layer.weight, rope.spec
        cfg = self.tuner.get(1, w.shape[0], w.shape[1], False) if x.shape[0] == 1 else self._gemv.CUBLAS
        if not self._gemv.rope_supported(cfg, w.shape[0], s.n_heads, s.n_kv_heads, s.head_dim):
            return None
        return self._gemv.linear_rope(x, w, cfg, rope.cos_sin, rope.positions, rope.seq_idx, rope.block_tables,
                                      rope.k_cache, rope.v_cache, s.n_heads, s.n_kv_heads, s.head_dim,
                                      bias=layer.bias, norm_weight=None if norm is None else norm.weight,
                                      eps=0.0 if norm is None else norm.eps)  # fmt: skip


def roles(model: Transformer) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor | None] | None, bool]]:
    """(role, every layer's weight of that role, biases, act) — the dense shapes one decode step multiplies by.
    Linears with another method (int4, NF4) are not tuned here: their methods choose their own kernels."""
    L = [blk for blk in model.layers]
    att = [b.attention for b in L]
    lins = [("qkv", [a.wqkv for a in att], False), ("wo", [a.wo for a in att], False),
            ("w13", [b.feed_forward.w13 for b in L], False), ("w2", [b.feed_forward.w2 for b in L], True)]
    if model.output is not None:
        lins.append(("lm_head", [model.output], False))
    out = []
    for role, mods, act in lins:
        if any(type(m.method) is not UnquantizedLinearMethod for m in mods):
            continue
        biases = [m.bias for m in mods] if mods[0].bias is not None else None
        out.append((role, [m.weight for m in mods], biases, act))
    return out


def install(model: Transformer, buckets: list[int], mode: str) -> tuple[object, list[dict]]:
    """Give every dense Linear of a CUDA model the GemvLinearMethod; tune (mode "tune") or fix (mode "triton")
    the GEMV per decode bucket <= MAX_TUNED_M. Returns (tuner, report rows). Linears with another method are left alone."""
    from engine.kernels.triton import gemv
    from engine.kernels.triton.tune import GemvTuner

    tuner = GemvTuner()
    report: list[dict] = []
    for bs in buckets:
        if bs > MAX_TUNED_M:
            continue
        for role, ws, biases, act in roles(model):
            n, k = ws[0].shape
            if mode == "triton":  # fixed configs, for tests
                tuner.choice[(bs, n, k, act)] = gemv.FMA_CONFIGS[1] if bs == 1 else gemv.DOT_CONFIGS[0]
                continue
            r = tuner.tune(ws, bs, act=act, biases=biases, norm=role in ("qkv", "w13"), tma=GEMV_TMA,
                           residual=role in ("wo", "w2"))  # as apply() runs them
            report.append({"role": role, **r.__dict__})
    method = GemvLinearMethod(tuner)
    for mod in model.modules():
        if isinstance(mod, Linear) and type(mod.method) is UnquantizedLinearMethod:
            mod.method = method
    return tuner, report
