"""Times each anvil CUDA kernel against its torch equivalent (CUDA events, warm-up, median) and writes JSON with the
environment; prints a short table last. Usage: python benchmarks/bench_kernels.py --out results/gpu/kernels.json"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.kernels import ext
from engine.kernels import reference as ref

BF16 = torch.bfloat16


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except Exception as e:
        driver = f"unknown ({e})"
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
        )
        commit = proc.stdout.strip() if proc.returncode == 0 else ""
    except Exception:
        commit = ""
    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit or os.environ.get("ANVIL_COMMIT", "unknown"),
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "ext": ext.why_unavailable(),
    }


def bench(fn, warmup: int = 5, reps: int = 30) -> dict:
    """Median over `reps` samples; each sample times `inner` back-to-back calls between two CUDA events (inner is
    chosen so a sample lasts >= ~1 ms), so host launch overhead hides behind GPU work as in a busy engine."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    inner = max(1, min(50, int(1.0 / max(a.elapsed_time(b), 1e-3))))
    samples = []
    for _ in range(reps):
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / inner)
    return {"median_ms": statistics.median(samples), "inner": inner, "samples_ms": samples}


def sdpa(q, k, v, causal, backend):
    """torch SDPA [B, H, S, D] on one backend (None = torch's own choice, cuDNN on H100); GQA through enable_gqa,
    else K/V expanded beforehand (not timed). The backend context is entered inside the timed call."""
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    def ctx():
        return sdpa_kernel([backend]) if backend is not None else nullcontext()

    def call(kk, vv, **kw):
        with ctx():
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **kw)

    try:
        with ctx():
            F.scaled_dot_product_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], is_causal=causal, enable_gqa=True)
        return (lambda: call(k, v, enable_gqa=True)), "enable_gqa"
    except Exception:
        rep = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return (lambda: call(ke, ve)), "expanded kv"


def _prefill_one(rows: list, s: int, variants: list, d: int = 128) -> None:
    h, hkv = 32, 8
    q, k, v = (torch.randn(s, n, d, device="cuda", dtype=BF16) for n in (h, hkv, hkv))
    cu = torch.tensor([0, s], device="cuda", dtype=torch.int32)
    flops = 4 * s * s * d * h / 2  # causal: half of the score matrix
    scale = 1 / math.sqrt(d)
    for var in variants:
        if var is not None:
            os.environ["ANVIL_PREFILL_VARIANT"] = str(var)
        r = bench(lambda: ext.prefill_attention(q, k, v, cu, scale, True, 0), reps=20)
        os.environ.pop("ANVIL_PREFILL_VARIANT", None)
        name = f"prefill seq={s}" + (f" d{d}" if d != 128 else "") + (f" v{var}" if var is not None else "")
        rows.append({"kernel": name, "impl": "anvil", **r, "tflops": flops / r["median_ms"] / 1e9})
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))  # [1, H, S, D]
    from torch.nn.attention import SDPBackend

    for label, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-default", None)):
        fn, how = sdpa(qt, kt, vt, True, backend)
        r = bench(fn, reps=20)
        name = f"prefill seq={s}" + (f" d{d}" if d != 128 else "")
        rows.append({"kernel": name, "impl": f"{label} ({how})", **r, "tflops": flops / r["median_ms"] / 1e9})


def run_prefill(rows: list, variants: list[int]) -> None:
    for s in (1024, 4096, 16384):
        _prefill_one(rows, s, [None, *variants] if s == 4096 and len(variants) > 1 else [None])
        torch.cuda.empty_cache()
    if len(variants) > 1:  # tile-variant sweep for head_dim 64 as well
        _prefill_one(rows, 4096, [None, *variants], d=64)


def _decode_one(rows: list, ctx: int, knobs: list[dict] | None = None) -> None:
    b, h, hkv, d = 8, 32, 8, 128
    q = torch.randn(b, h, d, device="cuda", dtype=BF16)
    kc = torch.randn(b, hkv, ctx, d, device="cuda", dtype=BF16)
    vc = torch.randn(b, hkv, ctx, d, device="cuda", dtype=BF16)
    sl = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    nbytes = 2 * kc.numel() * kc.element_size()
    scale = 1 / math.sqrt(d)
    for kn in knobs or [{}]:
        os.environ.update({k: str(v) for k, v in kn.items()})
        r = bench(lambda: ext.decode_attention(q, kc, vc, sl, scale, 0), reps=50)
        for k in kn:
            os.environ.pop(k, None)
        tag = "".join(f" {k.split('_')[-1].lower()}={v}" for k, v in kn.items())
        rows.append(
            {"kernel": f"decode ctx={ctx} b={b}{tag}", "impl": "anvil", **r, "gbps": nbytes / r["median_ms"] / 1e6}
        )
    q4 = q.unsqueeze(2)  # [B, H, 1, D]
    try:
        F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)
        fn, how = (lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)), "enable_gqa"
    except Exception:
        ke, ve = kc.repeat_interleave(h // hkv, 1), vc.repeat_interleave(h // hkv, 1)
        fn, how = (lambda: F.scaled_dot_product_attention(q4, ke, ve)), "expanded kv"
    r = bench(fn, reps=50)
    rows.append(
        {"kernel": f"decode ctx={ctx} b={b}", "impl": f"sdpa ({how})", **r, "gbps": nbytes / r["median_ms"] / 1e6}
    )


def run_decode(rows: list) -> None:
    sweep = [{}] + [{"ANVIL_DECODE_PREFETCH": pf, "ANVIL_DECODE_WAVES": w} for pf in (0, 1) for w in (4, 8, 16, 32)]
    for ctx in (4096, 8192, 16384, 32768):
        _decode_one(rows, ctx, sweep if ctx <= 8192 and os.environ.get("ANVIL_BENCH_SWEEP") == "1" else None)
        torch.cuda.empty_cache()


def run_elementwise(rows: list) -> None:
    t, n, f = 16384, 4096, 14336
    x = torch.randn(t, n, device="cuda", dtype=BF16)
    r_ = torch.randn(t, n, device="cuda", dtype=BF16)
    w = torch.randn(n, device="cuda", dtype=BF16)
    gu = torch.randn(t // 2, 2 * f, device="cuda", dtype=BF16)
    es = 2
    cases = [
        (
            "rms_norm [16384x4096]",
            2 * x.numel() * es,
            lambda: ext.rms_norm(x, w, 1e-5),
            lambda: ref.rms_norm(x, w, 1e-5),
        ),
        (
            "fused_add_rms_norm [16384x4096]",
            4 * x.numel() * es,
            lambda: ext.fused_add_rms_norm(x, r_, w, 1e-5),
            lambda: ref.fused_add_rms_norm(x, r_, w, 1e-5),
        ),
        (
            "silu_and_mul [8192x2x14336]",
            gu.numel() * es * 3 // 2,
            lambda: ext.silu_and_mul(gu),
            lambda: ref.silu_and_mul(gu),
        ),
    ]
    h, hkv, d = 32, 8, 128
    q = torch.randn(t, h, d, device="cuda", dtype=BF16)
    k = torch.randn(t, hkv, d, device="cuda", dtype=BF16)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    cs = ref.rope_cos_sin(inv, 8192)
    pos = torch.randint(0, 8192, (t,), device="cuda")
    cases.append(
        (
            "rope q+k [16384x(32+8)x128]",
            2 * (q.numel() + k.numel()) * es,
            lambda: ext.rope(q, k, pos, cs),
            lambda: ref.rope(q, k, pos, cs),
        )
    )
    bsz, s_max = 16, 4096
    kc = torch.zeros(bsz, hkv, s_max, d, device="cuda", dtype=BF16)
    vc = torch.zeros_like(kc)
    kv = torch.randn(t, hkv, d, device="cuda", dtype=BF16)
    bi = torch.arange(t, device="cuda") // (t // bsz)
    ps = torch.arange(t, device="cuda") % (t // bsz)
    cases.append(
        (
            "write_kv [16384x8x128] x2",
            2 * 2 * kv.numel() * es,
            lambda: ext.write_kv(kc, vc, kv, kv, bi, ps),
            lambda: ref.write_kv(kc, vc, kv, kv, bi, ps),
        )
    )
    for name, nbytes, ours, theirs in cases:
        for impl, fn in (("anvil", ours), ("torch eager", theirs)):
            r = bench(fn, reps=30)
            rows.append({"kernel": name, "impl": impl, **r, "gbps": nbytes / r["median_ms"] / 1e6})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/gpu/kernels.json")
    ap.add_argument("--only", default="prefill,decode,elementwise")
    ap.add_argument("--variants", default="", help="prefill tile variants to sweep at seq 4096")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not ext.is_available():
        print(f"cannot benchmark: cuda={torch.cuda.is_available()} ext={ext.why_unavailable()}")
        return 2
    env = environment()
    rows: list[dict] = []
    only = args.only.split(",")
    if "prefill" in only:
        run_prefill(rows, [int(v) for v in args.variants.split(",") if v])
    if "decode" in only:
        run_decode(rows)
    if "elementwise" in only:
        run_elementwise(rows)
    from harness.envinfo import copy_bandwidth_gb_s

    copy = copy_bandwidth_gb_s()  # measured on this GPU in this run, never a constant
    targets = {
        "prefill_tflops_floor": "SDPA flash at seq 4096",
        "decode_gbps_floor": 0.8 * copy,
        "elementwise_gbps_floor": 0.8 * copy,
        "copy_bandwidth_gbps": copy,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"format": 1, "environment": env, "targets": targets, "results": rows}, indent=1)
    )
    print(f"\n{env['gpu']} | driver {env['driver']} | torch {env['torch']} | CUDA {env['cuda']} | {env['time_utc']}")
    print(f"{'kernel':44} {'impl':26} {'median ms':>10} {'TFLOP/s':>8} {'GB/s':>8}")
    for r in rows:
        tf = f"{r['tflops']:.1f}" if "tflops" in r else ""
        gb = f"{r['gbps']:.0f}" if "gbps" in r else ""
        print(f"{r['kernel']:44} {r['impl']:26} {r['median_ms']:10.4f} {tf:>8} {gb:>8}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
