"""On-device choice of the decode GEMV: per (M, N, K, act), time cuBLAS and each Triton config over every layer's
weight of that shape (so L2 holds none of it), replayed as a CUDA graph as in the decode step, check Triton against
cuBLAS, keep the fastest. The table is reported.
"""

from __future__ import annotations

import gc
import logging
import statistics
from dataclasses import dataclass, field

import torch
import triton

from engine.kernels.triton import gemv
from engine.worker.graph_capture import gc_paused

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    m: int
    n: int
    k: int
    act: bool
    best: str
    us: dict[str, float] = field(default_factory=dict)  # config -> median microseconds per call
    gbs: dict[str, float] = field(default_factory=dict)  # config -> weight GB/s
    rejected: dict[str, str] = field(default_factory=dict)  # config -> why (compile error, wrong result)


def _time_ms(fn, reps: int) -> list[float]:
    """Device ms of fn() per rep. fn is captured in a CUDA graph first, so the timing holds the kernels alone:
    timed from the host loop, a Triton launch (~20-40 us of Python) is slower than a small GEMV and would be
    measured instead of it (seen on the H100: wo 4096x4096 "1.1 TB/s"). Eager timing if capture fails."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with gc_paused(collect=False), torch.cuda.graph(g):  # GemvTuner.tune collected once per shape
            fn()
        g.replay()
    except Exception as e:  # pragma: no cover - depends on the driver
        log.warning("GEMV tuning without graphs (%s: %s)", type(e).__name__, e)
        g = None
    out = []
    for _ in range(reps):
        start.record()
        if g is not None:
            g.replay()
        else:
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    del g
    return out


def candidate_call(x: torch.Tensor, act: bool, norm_weight: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None):
    """call(cfg, w, b): y for one candidate config the way the step runs it (gemv.step_linear, GemvLinearMethod.apply's
    own dispatch: the RMSNorm prologue or the residual epilogue), so the tuner checks and times the very kernel
    variant the step launches."""
    return lambda cfg, w, b: gemv.step_linear(x, w, cfg, b, act=act, norm_weight=norm_weight, eps=1e-5,
                                              residual=residual)


class GemvTuner:
    """Maps (m, n, k, act) -> GemvConfig. Untuned keys use cuBLAS."""

    def __init__(self) -> None:
        self.choice: dict[tuple[int, int, int, bool], gemv.GemvConfig] = {}
        self.results: list[TuneResult] = []

    def get(self, m: int, n: int, k: int, act: bool) -> gemv.GemvConfig:
        return self.choice.get((m, n, k, act), gemv.CUBLAS)

    def tune(
        self,
        weights: list[torch.Tensor],
        m: int,
        act: bool = False,
        biases: list[torch.Tensor | None] | None = None,
        reps: int = 5,
        norm: bool = False,
        tma: bool = False,
        residual: bool = False,
    ) -> TuneResult:
        """weights: every layer's [N, K] matrix of one role (all the same shape). norm: the role takes the RMSNorm
        as its prologue (qkv, w13), timed as the step runs it — fused into the batch-1 fma GEMV (every program
        re-reads x for the rms, so configs with many programs pay more), else a norm kernel before the GEMV.
        residual: the role adds the residual stream in its epilogue (wo, w2), so every config is checked and timed
        with that epilogue: a kernel variant's shared memory grows with it (a TMA config tuned without it ran out
        of shared memory in the decode graph's capture: float32, H100, results/gpu/core-h100/skinny-16f03ba/)."""
        from engine.kernels.triton import skinny_tma

        gc.collect()  # no dead engine left to be freed inside the captures below (engine/worker/graph_capture.py)

        n, k = weights[0].shape
        key = (m, n, k, act)
        dev, dt = weights[0].device, weights[0].dtype
        biases = biases or [None] * len(weights)
        x = torch.randn(m, 2 * k if act else k, device=dev, dtype=dt)
        nw = torch.rand(k, device=dev, dtype=dt) + 0.5 if norm and not act else None
        r = torch.randn(m, n, device=dev, dtype=dt) if residual else None
        call = candidate_call(x, act, nw, r)

        ref = call(gemv.CUBLAS, weights[0], biases[0]).float()
        res = TuneResult(m, n, k, act, best="cublas")
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        kmax = triton.next_power_of_2(k)
        tma = tma and skinny_tma.supported(x[:, :k], weights[0]) is None  # asked for, sm_90+, aligned rows
        for cfg in gemv.candidates(m, tma):
            name = str(cfg)
            if cfg.kind != "cublas" and cfg.block_k > kmax:
                continue
            try:
                y = call(cfg, weights[0], biases[0]).float()
                torch.cuda.synchronize()
            except Exception as e:  # a config that fails to compile on this GPU is skipped, not fatal
                res.rejected[name] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            if not err < 2e-2:
                res.rejected[name] = f"relative error {err:.3g} vs cuBLAS"
                continue

            def run_all(cfg=cfg) -> None:
                for w, b in zip(weights, biases, strict=True):
                    call(cfg, w, b)

            times = [t * 1e3 / len(weights) for t in _time_ms(run_all, reps)]
            us = statistics.median(times)
            res.us[name] = round(us, 2)
            res.gbs[name] = round(nbytes / len(weights) / (us * 1e-6) / 1e9, 1)
        best = min(res.us, key=res.us.get)
        res.best = best
        self.choice[key] = next(c for c in gemv.candidates(m, tma) if str(c) == best)
        self.results.append(res)
        log.info("gemv m=%d n=%d k=%d act=%s: %s %.1f us (cublas %.1f us)", m, n, k, act, best, res.us[best],
                 res.us.get("cublas", float("nan")))  # fmt: skip
        return res
