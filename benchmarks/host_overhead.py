"""Host overhead of the graph-replayed decode loop: host time per replay launch, GPU idle time between replays,
and host scheduling time per generated token (target: 1 microsecond). Called by bench_decode.py (same model), or
alone: python benchmarks/host_overhead.py --preset llama-3-8b --out results/gpu/host-overhead-h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_US_PER_TOKEN = 1.0


def _q(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs), 2), "p90": round(xs[int(0.9 * (len(xs) - 1))], 2),
            "max": round(xs[-1], 2), "n": len(xs)}  # fmt: skip


@torch.inference_mode()
def measure(fg, batches: list[int], prompt_len: int = 128, steps: int = 64) -> dict:
    """For each batch: (1) host us per graph.replay() call with the GPU queue non-empty, (2) GPU gap between
    consecutive replays inside generate() (events around each replay; the gap holds the token copy + any idle),
    (3) generate()'s host time not spent waiting on the GPU, per step and per generated token."""
    vocab = fg.config.vocab_size
    out: dict = {"per_batch": {}, "target_us_per_token": TARGET_US_PER_TOKEN}
    for b in batches:
        prompts = torch.randint(0, vocab, (b, prompt_len), generator=torch.Generator().manual_seed(b)).tolist()
        # (1) launch cost
        bs, _ = fg.begin(prompts, steps + 2, lambda lg: lg.argmax(-1))
        fg._run_step(bs)
        torch.cuda.synchronize()
        launch = []
        for _ in range(steps):
            h0 = time.perf_counter()
            fg._run_step(bs)
            launch.append((time.perf_counter() - h0) * 1e6)
        torch.cuda.synchronize()
        fg.kv.release_all()
        # (2) + (3): the real loop, with events around each replay
        evs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        orig = fg._run_step

        def timed(bs_: int, orig=orig, evs=evs):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            r = orig(bs_)
            e.record()
            evs.append((s, e))
            return r

        fg._run_step = timed
        try:
            fg.generate(prompts, steps)
        finally:
            del fg._run_step  # back to the class method
        torch.cuda.synchronize()
        st = dict(fg.last_stats)
        gaps = [evs[i][1].elapsed_time(evs[i + 1][0]) * 1e3 for i in range(len(evs) - 1)]
        step_us = [s.elapsed_time(e) * 1e3 for s, e in evs]
        n = max(1, st["decode_steps"])
        host_step = 1e6 * st["host_overhead_s"] / n
        out["per_batch"][b] = {
            "bucket": bs,
            "graph": st.get("graph"),
            "replay_launch_us": _q(launch),
            "gpu_gap_between_replays_us": _q(gaps),
            "gpu_step_us": _q(step_us),
            "host_us_per_step": round(host_step, 2),
            "host_us_per_token": round(host_step / b, 3),
            "exposed_gap_us_per_token": round(statistics.median(gaps) / b, 3),
            "decode_steps": n,
        }
    rows = out["per_batch"]
    out["summary"] = {
        str(b): {"host_us_per_token": r["host_us_per_token"], "exposed_gap_us_per_token": r["exposed_gap_us_per_token"],
                 "replay_launch_us_p50": r["replay_launch_us"]["p50"]}
        for b, r in rows.items()
    }  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--out", default="results/gpu/host-overhead-h100.json")
    args = ap.parse_args()
    from benchmarks.bench_decode import environment
    from engine.fast_decode import FastGenerator
    from engine.presets import synthetic

    batches = [int(x) for x in args.batches.split(",")]
    lm = synthetic(args.preset, args.dtype, "cuda")
    fg = FastGenerator(lm, max(batches), 512, buckets=batches)
    res = measure(fg, batches)
    res["environment"] = environment()
    res["report"] = {k: fg.report[k] for k in ("backend", "graphs", "graph_fallback")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
