"""Train Medusa heads for the embedded `tiny` model on the CPU (a few minutes) and save them beside it.

    python scripts/train_medusa.py                     # -> models/tiny/medusa/{config.json, model.safetensors}
    python scripts/train_medusa.py --heads 4 --steps 400 --prompts 384

Self-distillation (Medusa's recipe when the training data does not match the model's outputs): prompts are random
64-token windows of the *training* split of the stdlib (scripts/train_tiny.py's split_of: the held-out test and
val modules are never read); the base model continues each greedily for --gen tokens; head i (1-based) learns to
predict the token at t+1+i from the base model's final normed hidden state at t, over the generated part, with
the base lm_head shared and frozen (engine/spec/medusa.py). Heads start at zero (each one = the base head).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def train_windows(tok, n: int, length: int, seed: int) -> list[list[int]]:
    from train_tiny import split_of, stdlib_dir

    root = stdlib_dir()
    files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts and "__pycache__" not in p.parts
             and split_of(p.relative_to(root)) == "train" and 2_000 < p.stat().st_size < 200_000]  # fmt: skip
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        try:
            ids = tok.encode(rng.choice(files).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if len(ids) > length + 1:
            s = rng.randrange(len(ids) - length)
            out.append(ids[s : s + length])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default=str(REPO / "models" / "tiny" / "medusa"))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=384)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=1024, help="positions per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import engine
    from engine.spec.medusa import MedusaHeads, save_heads

    t0 = time.perf_counter()
    lm = engine.load(args.model)
    llm = engine.LLM(lm, engine.EngineConfig(max_num_seqs=64, max_model_len=args.prompt_len + args.gen + 8,
                                             max_num_batched_tokens=4096))  # fmt: skip
    prompts = train_windows(lm.tokenizer, args.prompts, args.prompt_len, args.seed)
    outs = llm.generate(prompts, max_tokens=args.gen)
    seqs = [p + o.tokens for p, o in zip(prompts, outs, strict=True)]
    print(f"generated {len(seqs)} x {args.gen} tokens in {time.perf_counter() - t0:.1f}s", flush=True)

    model, K = lm.model, args.heads
    hs, labels = [], []
    with torch.inference_mode():
        for s in seqs:
            h = model.norm(llm.hidden_states(s)[-1])  # [T, dim] final normed hidden states
            t = torch.tensor(s)
            lo, hi = args.prompt_len - 1, len(s) - 1 - K  # positions t whose labels t+2 .. t+1+K exist
            hs.append(h[lo:hi])
            labels.append(torch.stack([t[lo + 1 + i : hi + 1 + i] for i in range(1, K + 1)], dim=1))
    H = torch.cat(hs).clone()
    Y = torch.cat(labels).clone()  # [N, K]
    n_val = len(H) // 10
    print(f"{len(H)} positions ({n_val} held for validation), {time.perf_counter() - t0:.1f}s", flush=True)

    heads = MedusaHeads(model.config.dim, K)
    W = model.lm_head_weight().detach().float()
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    g = torch.Generator().manual_seed(args.seed)

    def loss_acc(h, y):
        logits = torch.nn.functional.linear(heads(h), W)  # [n, K, V]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss, (logits.argmax(-1) == y).float().mean(0)

    train_h, train_y, val_h, val_y = H[n_val:], Y[n_val:], H[:n_val], Y[:n_val]
    for step in range(args.steps):
        idx = torch.randint(0, len(train_h), (args.batch,), generator=g)
        loss, _ = loss_acc(train_h[idx], train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                vl, va = loss_acc(val_h, val_y)
            print(f"step {step} loss {loss.item():.3f} val {vl.item():.3f} top-1 per head {[round(a, 3) for a in va.tolist()]}"
                  f" {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    with torch.no_grad():
        _, va = loss_acc(val_h, val_y)
    save_heads(heads, args.out, base_model=args.model, trained_by="scripts/train_medusa.py",
               val_top1_per_head=[round(a, 4) for a in va.tolist()], positions=len(H),
               recipe=f"self-distilled: {args.prompts} train-split prompts x {args.gen} greedy tokens, {args.steps} steps")
    print(f"saved {args.out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
