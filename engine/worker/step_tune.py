"""The GEMV choice checked on the whole decode step.

GemvTuner times each role's GEMV alone (32 layers' weights back to back). In the step the same kernel sits between
others: the RMSNorm prologue fused or not, PDL overlap with the attention kernels before it. Two configs that tie
alone need not tie there: on the H200, w13 as `dot:n64k256w8s3` (58.72 us alone) or `fma:n4k1024w4s3` (58.91 us,
same tuning run); in the captured batch-1 step 4.33-4.43 ms with the first, 4.20 with the second
(results/gpu/core-h200/core-bench-step-check-6e8027f-*.json, info.gemv_step).

`refine` starts from the per-role choice and, role by role (largest first), captures the real decode forward
with each runner-up config that was within `within` of that role's best, times its replays over a `context`-token
prefix, and keeps a config only when the step gets faster by more than `min_gain`. Nothing is assumed about which
kernel wins; the per-role choice stays unless a whole step beats it.
"""

from __future__ import annotations

import logging
import math
import statistics

import torch

log = logging.getLogger(__name__)


def _time_step(runner, bs: int, context: int, reps: int = 3, iters: int = 20) -> float:
    """Median ms of one captured decode step of bs sequences with `context` cached tokens each (fresh pool:
    the blocks it writes belong to no request yet)."""
    from engine.worker.graphs import DecodeGraphs

    g = DecodeGraphs(runner, [bs])
    if not g.graphs.has(bs):
        raise RuntimeError(g.fallback or "no graph")
    context = max(1, min(context, runner.max_model_len - 1))  # a short model: its own longest context
    per_seq = math.ceil(context / runner.config.block_size)
    usable = runner.pool.num_blocks - 1
    tab = (torch.arange(bs * per_seq, device=runner.device, dtype=torch.int32) % usable + 1).view(bs, per_seq)
    g.block_tables[:bs, :per_seq] = tab
    g.seq_lens[:bs] = context
    g.positions[:bs] = context - 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps + 1):
        start.record()
        for _ in range(iters):
            g.graphs.graphs[bs].replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / iters)
    del g
    return statistics.median(out[1:])


def refine(runner, tuner, bs: int, context: int = 512, within: float = 0.03, alternatives: int = 2,
           min_gain: float = 0.003) -> dict:  # fmt: skip
    """Coordinate descent over the tuned configs of bucket bs (see the module doc). Returns a report: the step
    time of the per-role choice, each trial, and the final choice."""
    from engine.kernels.triton import gemv

    by_name = {str(c): c for c in gemv.candidates(bs)}
    roles = [r for r in tuner.results if r.m == bs and r.us]
    roles.sort(key=lambda r: -r.us[r.best])  # the largest first: most step time at stake
    with torch.inference_mode():
        base = _time_step(runner, bs, context)
        report = {"bs": bs, "context": context, "per_role_ms": round(base, 4), "trials": []}
        best_ms = base
        for r in roles:
            key = (r.m, r.n, r.k, r.act)
            ranked = sorted(r.us, key=r.us.get)
            alts = [n for n in ranked if n != r.best and r.us[n] <= r.us[r.best] * (1 + within)][:alternatives]
            keep = tuner.choice[key]
            try:
                for name in alts:
                    tuner.choice[key] = by_name[name]
                    ms = _time_step(runner, bs, context)
                    report["trials"].append({"shape": f"{r.n}x{r.k}{'+act' if r.act else ''}", "config": name,
                                             "alone_us": r.us[name], "step_ms": round(ms, 4)})  # fmt: skip
                    if ms < best_ms * (1 - min_gain):
                        best_ms, keep = ms, by_name[name]
            finally:  # a failed trial leaves the best choice so far, never the trial's
                tuner.choice[key] = keep
    report["final_ms"] = round(best_ms, 4)
    report["choice"] = {f"{r.n}x{r.k}{'+act' if r.act else ''}": str(tuner.choice[(r.m, r.n, r.k, r.act)])
                        for r in roles}  # fmt: skip
    log.info("gemv step check bs=%d: %.3f -> %.3f ms", bs, base, best_ms)
    return report
