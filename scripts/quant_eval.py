"""Accuracy of 4-bit weight-only quantization on the trained `tiny` model (CPU, float32 activations): held-out
perplexity of the float model vs RTN / AWQ / GPTQ (int4, asymmetric, g128) and NF4 (block 64), max |logit
difference| vs float, teacher-forced argmax agreement, and greedy agreement over held-out prompts.

    python scripts/quant_eval.py [--max-windows 0] [--out results/cpu/quant-tiny.json]

Held-out text: the `test` modules of scripts/train_tiny.py (HELD_OUT_TEST, the same stream scripts/eval_tiny.py
scores: each file as <s> ... </s>, non-overlapping 1024-token windows). Calibration (AWQ, GPTQ): 64 x 512 tokens of
the training files (engine.quant.calib.stdlib_calibration, which excludes the test and val modules). The
quantized forward is recorded in the JSON: with the pluggable Linear the reference path of Int4LinearMethod /
NF4LinearMethod (dequantize, F.linear); on older trees fake quantization (dequantized weights in nn.Linear),
numerically the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import train_tiny as T  # noqa: E402

import engine  # noqa: E402
from engine.generator import Generator  # noqa: E402
from engine.quant import quantize_model, stdlib_calibration  # noqa: E402
from engine.quant.methods import Linear  # noqa: E402

METHODS = ("rtn", "awq", "gptq", "nf4")


def test_stream(tok) -> list[int]:
    ids: list[int] = []
    for _, text in T.corpus_files()["test"]:
        ids += [T.BOS, *tok.encode(text, add_bos=False, parse_special=False), T.EOS]
    return ids


def prompts_from(stream: list[int], n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [stream[s:s + length] for s in sorted(rng.randrange(0, len(stream) - length) for _ in range(n))]


def weight_bytes(model, packed: dict) -> int:
    """Bytes of the Linear weights (packed tensors for quantized ones, the dense lm_head included)."""
    total = 0
    for name, mod in model.named_modules():
        if name in packed:
            total += sum(t.numel() * t.element_size() for t in packed[name].tensors().values())
        elif isinstance(getattr(mod, "weight", None), torch.Tensor) and mod is not model.tok_embeddings \
                and hasattr(mod, "in_features"):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


class Scores:
    """Running held-out statistics of one model against the float model's logits."""

    def __init__(self):
        self.ce, self.n, self.agree, self.max_diff, self.sum_diff, self.windows = 0.0, 0, 0, 0.0, 0.0, 0

    def add(self, lg: torch.Tensor, y: torch.Tensor, ref: torch.Tensor) -> None:
        self.ce += F.cross_entropy(lg, y, reduction="sum").item()
        self.n += y.numel()
        self.agree += (lg.argmax(-1) == ref.argmax(-1)).sum().item()
        d = (lg - ref).abs()
        self.max_diff, self.sum_diff, self.windows = max(self.max_diff, d.max().item()), self.sum_diff + d.mean().item(), self.windows + 1

    def result(self) -> dict:
        loss = self.ce / self.n
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "tokens": self.n,
                "argmax_agreement": self.agree / self.n, "max_abs_logit_diff": self.max_diff,
                "mean_abs_logit_diff": self.sum_diff / self.windows}


def greedy_scores(greedy: list[list[int]], ref: list[list[int]], new_tokens: int) -> dict:
    match = sum(a == b for x, r in zip(greedy, ref, strict=True) for a, b in zip(x, r, strict=True))
    first = [next((j for j, (a, b) in enumerate(zip(x, r, strict=True)) if a != b), new_tokens)
             for x, r in zip(greedy, ref, strict=True)]
    return {"greedy_token_agreement": match / (len(ref) * new_tokens),
            "greedy_identical_prompts": sum(f == new_tokens for f in first),
            "greedy_mean_first_mismatch": sum(first) / len(first)}


@torch.inference_mode()
def evaluate(models: dict, windows, prompts, new_tokens) -> dict:
    """Every model over the same windows in lockstep (the float logits are never stored)."""
    seq = max(len(w) for w in windows)
    gens = {k: Generator(m, 1, seq) for k, m in models.items()}
    scores = {k: Scores() for k in models}
    t0 = time.time()
    for i, w in enumerate(windows):
        y = torch.tensor(w[1:])
        ref = gens["float32"].logits([w[:-1]])[0].float()
        for k, g in gens.items():
            scores[k].add(ref if k == "float32" else g.logits([w[:-1]])[0].float(), y, ref)
        if i % 20 == 0:
            print(f"window {i + 1}/{len(windows)}  " + "  ".join(
                f"{k} {s.ce / s.n:.4f}" for k, s in scores.items()) + f"  {time.time() - t0:.0f}s", flush=True)
    out = {k: s.result() for k, s in scores.items()}
    plen = max(len(p) for p in prompts) + new_tokens
    greedy = {k: [c.tokens for c in Generator(m, len(prompts), plen).generate(prompts, new_tokens)]
              for k, m in models.items()}
    for k in models:
        out[k].update(greedy_scores(greedy[k], greedy["float32"], new_tokens))
    return out


def env() -> dict:
    from harness.envinfo import snapshot

    snap = snapshot()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": snap.get("cpu"),
            "threads": torch.get_num_threads(), "commit": commit.stdout.strip() or None,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=0, help="0: the whole held-out stream")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(REPO / "results" / "cpu" / "quant-tiny.json"))
    args = ap.parse_args(argv)

    t0 = time.time()
    base = engine.load(args.model, "float32", "cpu")
    tok = base.tokenizer
    stream = test_stream(tok)
    windows = [stream[s:s + args.seq + 1] for s in range(0, len(stream) - 1, args.seq)]
    windows = [w for w in windows if len(w) > 1][: args.max_windows or None]
    prompts = prompts_from(stream, args.prompts, args.prompt_len)
    calib = list(stdlib_calibration(tok, n_samples=args.calib_samples, seq_len=args.calib_seq))
    print(f"{len(windows)} windows, {len(prompts)} prompts, calibration {sum(map(len, calib))} x "
          f"{args.calib_seq} tokens  {time.time() - t0:.0f}s", flush=True)

    models = {"float32": base.model}
    info: dict = {"float32": {"weight_bytes": weight_bytes(base.model, {})}}
    for method in args.methods.split(","):
        model = engine.load(args.model, "float32", "cpu").model
        tq = time.time()
        packed = quantize_model(model, method, calib=calib if method in ("awq", "gptq") else None)
        info[method] = {"quantize_s": round(time.time() - tq, 1), "weight_bytes": weight_bytes(model, packed)}
        models[method] = model
        print(f"quantized {method} in {info[method]['quantize_s']}s", flush=True)
    results = evaluate(models, windows, prompts, args.new_tokens)
    for k, r in results.items():
        r.update(info[k])
        print(f"{k:8s} ppl {r['perplexity']:.4f}  loss {r['loss']:.4f}  max|dlogit| {r['max_abs_logit_diff']:.3f}  "
              f"argmax {r['argmax_agreement']:.4f}  greedy {r['greedy_token_agreement']:.4f}")

    out = {
        "schema": "anvil-quant-eval/1",
        "model": args.model,
        "forward_path": ("Int4LinearMethod / NF4LinearMethod reference (dequantize, F.linear)" if Linear is not None
                         else "fake quantization: dequantized weights in nn.Linear (same numbers as the reference)"),
        "activations_dtype": "float32",
        "int4": {"group_size": 128, "zero_point": True, "lm_head": "float (not quantized)"},
        "nf4": {"block": 64, "double_quant": False},
        "awq": {"grid": 20, "duo_scaling": True, "clip_search": True, "scale": "kept in the layer (x * 1/s)"},
        "gptq": {"damp": 0.01, "block": 128, "act_order": False, "sequential": True},
        "test_modules": list(T.HELD_OUT_TEST),
        "windows": len(windows), "seq": args.seq, "test_stream_tokens": len(stream),
        "calibration": {"samples": args.calib_samples, "seq": args.calib_seq, "source": "stdlib train split"},
        "greedy": {"prompts": len(prompts), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens},
        "results": results,
        "wall_s": round(time.time() - t0, 1),
        "env": env(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
