"""Our NF4 beside bitsandbytes' NF4 in one run (issue 12's reference): held-out perplexity of the trained tiny model
with every Linear but the lm_head in NF4 (block 64, plain float32 absmax) — ours through the engine, bitsandbytes'
`Linear4bit` inside HF transformers — and batch-1 greedy decode speed of each (tok/s over --new-tokens tokens).
The two quantizers give the same bytes (tests/engine/quant/test_nf4_bnb.py), so the perplexities differ only by
the matmul paths' rounding.

  python scripts/nf4_bnb_eval.py [--device cpu|cuda] [--dtype float32|bfloat16] [--windows 8] [--out F.json]

On the lent GPU: carry bitsandbytes' cp312 manylinux wheel (pip download bitsandbytes --no-deps --python-version 3.12
--platform manylinux_2_24_x86_64 --only-binary=:all:) and `pip install --no-deps --target /tmp/bnb` it there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from quant_eval import env, test_stream  # noqa: E402

import engine  # noqa: E402
from engine import LLM, EngineConfig  # noqa: E402
from engine.quant import quantize_model  # noqa: E402


def to_bnb(model: torch.nn.Module, dtype: torch.dtype, device: str) -> int:
    """Replace every nn.Linear but lm_head by bitsandbytes' Linear4bit (NF4, block 64, float32 absmax), quantized on
    the move to the device; returns how many."""
    import bitsandbytes as bnb

    n = 0
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if not isinstance(child, torch.nn.Linear) or cname == "lm_head":
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4", device="cpu")  # fmt: skip
            q.weight = bnb.nn.Params4bit(child.weight.data.float().cpu(), requires_grad=False, quant_type="nf4",
                                         blocksize=64, compress_statistics=False)  # fmt: skip
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(mod, cname, q.to(device))
            n += 1
    return n


def perplexity(logits_of, windows: list[list[int]]) -> dict:
    ce, n = 0.0, 0
    for w in windows:
        lg = logits_of(w[:-1]).float().cpu()
        ce += F.cross_entropy(lg, torch.tensor(w[1:]), reduction="sum").item()
        n += len(w) - 1
    return {"loss": ce / n, "perplexity": float(torch.tensor(ce / n).exp()), "tokens": n}


def timed_decode(fn, device: str) -> float:
    fn()  # warm-up (kernels, graphs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of --seq tokens")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForCausalLM

    lm = engine.load("tiny", args.dtype, args.device)
    stream = test_stream(lm.tokenizer)
    windows = [stream[i * args.seq : (i + 1) * args.seq + 1] for i in range(args.windows)]
    prompt = stream[: 32]

    quantize_model(lm.model, "nf4")
    llm = LLM(lm, EngineConfig(max_num_seqs=1, max_model_len=max(args.seq + 1, 32 + args.new_tokens)))
    ours = perplexity(lambda ids: llm.logits(ids), windows)

    def ours_decode() -> int:
        (o,) = llm.generate([prompt], max_tokens=args.new_tokens)  # no stop ids: EOS does not end it
        return len(o.tokens)

    ours["decode_tok_s_b1"] = timed_decode(ours_decode, args.device)

    hf = AutoModelForCausalLM.from_pretrained(REPO / "models" / "tiny", dtype=dtype).to(args.device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        replaced = to_bnb(hf, dtype, args.device)
        ref = perplexity(lambda ids: hf(torch.tensor([ids], device=args.device)).logits[0], windows)

        def bnb_decode() -> int:
            x = torch.tensor([prompt], device=args.device)
            out = hf.generate(x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            return out.shape[1] - x.shape[1]

        ref["decode_tok_s_b1"] = timed_decode(bnb_decode, args.device)
    import bitsandbytes

    from harness.envinfo import gpu_record

    result = {
        "env": gpu_record() if args.device.startswith("cuda") else env(),
        "bitsandbytes": bitsandbytes.__version__, "device": args.device, "dtype": args.dtype,
        "windows": args.windows, "seq": args.seq, "new_tokens": args.new_tokens, "bnb_linears": replaced,
        "anvil_nf4": ours, "bnb_nf4": ref, "abs_perplexity_diff": abs(ours["perplexity"] - ref["perplexity"]),
        "decode_speedup": ours["decode_tok_s_b1"] / ref["decode_tok_s_b1"],
    }  # fmt: skip
    for k in ("anvil_nf4", "bnb_nf4"):
        r = result[k]
        print(f"{k:10} perplexity {r['perplexity']:.4f} over {r['tokens']} tokens, b1 decode {r['decode_tok_s_b1']:.1f} tok/s")
    print(f"|perplexity difference| {result['abs_perplexity_diff']:.2e}; decode anvil / bnb {result['decode_speedup']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
