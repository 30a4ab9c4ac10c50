"""Prefill / extend attention on the GPU: the Triton paged prefill kernel against torch SDPA (cuDNN and flash
backends) on the Llama-3-8B head layout (32 query / 8 KV heads, d128, bf16, causal), CUDA events, median.
TFLOP/s counts the causal half: 2 * 2 * H * D * sum over queries of the keys each attends.

  python benchmarks/bench_attention.py --out results/gpu/attention.json [--lens 4096,16384] [--extend 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.kernels.triton.paged_prefill import paged_prefill_attention

H, HKV, D, PAGE = 32, 8, 128, 16


def timed(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def case(n_ctx: int, q_len: int, dtype=torch.bfloat16) -> dict:
    """q_len new queries at the end of an n_ctx-token sequence (q_len == n_ctx: a fresh prompt)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(q_len, H, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(n_ctx, HKV, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(n_ctx, HKV, D, device=dev, dtype=dtype, generator=g)
    nb = (n_ctx + PAGE - 1) // PAGE
    perm = torch.randperm(nb, device=dev, generator=g).to(torch.int32)  # scattered pages, as in a shared pool
    kc = torch.zeros(nb, HKV, PAGE, D, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    pos = torch.arange(n_ctx, device=dev)
    kc[perm[pos // PAGE].long(), :, pos % PAGE] = k
    vc[perm[pos // PAGE].long(), :, pos % PAGE] = v
    bt = perm[None, :]
    cu = torch.tensor([0, q_len], device=dev, dtype=torch.int32)
    lens = torch.tensor([n_ctx], device=dev, dtype=torch.int32)
    scale = D**-0.5
    flops = 4 * H * D * sum(n_ctx - q_len + i + 1 for i in range(q_len))
    res = {"n_ctx": n_ctx, "q_len": q_len}
    out_t = paged_prefill_attention(q, kc, vc, bt, cu, lens, scale, 0, 0, 1, q_len)
    res["triton_paged_ms"] = timed(lambda: paged_prefill_attention(q, kc, vc, bt, cu, lens, scale, 0, 0, 1, q_len))
    qq = q.transpose(0, 1)[None]
    kk = k.transpose(0, 1)[None]
    vv = v.transpose(0, 1)[None]
    mask = None
    if q_len != n_ctx:  # bottom-right causal: query i sees keys <= n_ctx - q_len + i
        i = torch.arange(q_len, device=dev)[:, None]
        mask = torch.arange(n_ctx, device=dev)[None, :] <= (n_ctx - q_len + i)
    ref = None
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip
        try:
            with sdpa_kernel(be):
                def f():
                    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None,
                                                          scale=scale, enable_gqa=True)  # fmt: skip
                o = f()
                res[f"sdpa_{name}_ms"] = timed(f)
                ref = o if ref is None else ref
        except Exception as e:  # a backend that does not take this case
            res[f"sdpa_{name}_ms"] = None
            res[f"sdpa_{name}_why"] = f"{type(e).__name__}: {str(e)[:120]}"
    if ref is not None:
        res["triton_max_abs_err"] = (out_t.float() - ref[0].transpose(0, 1).float()).abs().max().item()
    for key in [k for k in res if k.endswith("_ms") and res[k]]:
        res[key.replace("_ms", "_tflops")] = flops / (res[key] * 1e-3) / 1e12
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lens", default="4096,16384")
    ap.add_argument("--extend", type=int, default=2048, help="also a chunk of this many queries over each prefix")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.lens.split(",")):
        for ql in (n, min(args.extend, n)) if args.extend else (n,):
            r = case(n, ql)
            rows.append(r)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if not k.endswith("_why")},
                  flush=True)  # fmt: skip
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
