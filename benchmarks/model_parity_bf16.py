"""Model-level bf16 parity: anvil (its generation core, engine.LLM) vs HF transformers, both against an fp32 reference.

usage: PYTHONPATH=. python3 benchmarks/model_parity_bf16.py [--model tiny] [--device cuda] [--out results/gpu/x.json]

For each seeded random prompt: max |logit - fp32 logit| over all positions for anvil-bf16 and hf-bf16 (the
issue's bound: anvil's error <= 2x HF's own bf16 error), and the number of greedy tokens (of --n-tokens) where
anvil-bf16 equals hf-bf16. The fp32 reference is HF transformers in float32 on the same device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import engine
from engine import LLM, EngineConfig
from engine.hub import resolve
from harness.envinfo import snapshot


def hf_model(path: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()


@torch.inference_mode()
def hf_logits(model, ids: list[int], device: str) -> torch.Tensor:
    return model(torch.tensor([ids], device=device)).logits[0].float().cpu()  # [L, V]


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int, device: str) -> list[int]:
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-lens", default="16,97,200,480")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--n-tokens", type=int, default=32)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    path, dev = resolve(a.model), a.device
    ref = hf_model(path, torch.float32, dev)
    hfb = hf_model(path, torch.bfloat16, dev)
    lm = engine.load(path, "bfloat16", dev)
    from engine import ops

    llm = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=1024))
    vocab = lm.config.vocab_size
    rows = []
    for plen in [int(x) for x in a.prompt_lens.split(",")]:
        for seed in [int(x) for x in a.seeds.split(",")]:
            g = torch.Generator().manual_seed(seed * 1000 + plen)
            ids = torch.randint(3, vocab, (plen,), generator=g).tolist()
            lr = hf_logits(ref, ids, dev)
            err_hf = (hf_logits(hfb, ids, dev) - lr).abs().max().item()
            err_anvil = (llm.logits(ids) - lr).abs().max().item()
            greedy_hf = hf_greedy(hfb, ids, a.n_tokens, dev)
            greedy_anvil = llm.generate([ids], max_tokens=a.n_tokens)[0].tokens
            match = next((i for i, (x, y) in enumerate(zip(greedy_hf, greedy_anvil, strict=False)) if x != y), a.n_tokens)
            rows.append(
                dict(prompt_len=plen, seed=seed, err_anvil_bf16=err_anvil, err_hf_bf16=err_hf,
                     ratio=err_anvil / max(err_hf, 1e-12), greedy_match_tokens=match, n_tokens=a.n_tokens)
            )
            print(f"prompt {plen:4d} seed {seed}: |anvil-fp32| {err_anvil:.4f}  |hf-fp32| {err_hf:.4f}  "
                  f"ratio {rows[-1]['ratio']:.2f}  greedy match {match}/{a.n_tokens}", flush=True)
    summary = dict(
        max_ratio=max(r["ratio"] for r in rows),
        prompts_full_greedy_match=sum(r["greedy_match_tokens"] == a.n_tokens for r in rows),
        prompts=len(rows),
        ops_backend=list(ops.backend()),
        attention_backend=llm.info()["attention_backend"],
    )
    print(json.dumps(summary))
    if a.out:
        Path(a.out).write_text(json.dumps(dict(model=a.model, device=dev, rows=rows, summary=summary,
                                               env=snapshot()), indent=1))


if __name__ == "__main__":
    main()
