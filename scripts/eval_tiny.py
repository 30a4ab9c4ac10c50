"""Evaluate the embedded models with HF transformers in float32 on the CPU: held-out loss/perplexity (main, draft,
unigram baseline), bits per byte, draft-vs-main greedy next-token agreement, and greedy completions of code prompts.

    python scripts/train_tiny.py prep          # once (deterministic): .train/{train,val,test}.npy
    python scripts/eval_tiny.py --out .train/eval.json [--max-windows 0]
The held-out `test` stream (modules HELD_OUT_TEST of scripts/train_tiny.py, never used for training or checkpoint
selection) is re-encoded here with the HF tokenizer and checked against the SentencePiece encoding from `prep`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny as T  # noqa: E402

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(path):\n    \"\"\"Return the .py files under path.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]


def load(path: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return m.eval()


def test_stream(tok) -> np.ndarray:
    """BOS + ids + EOS per held-out test file, concatenated, encoded with the HF tokenizer."""
    files = T.corpus_files()["test"]
    parts = [np.array([T.BOS, *tok(text, add_special_tokens=False)["input_ids"], T.EOS], dtype=np.int64)
             for _, text in files]
    return np.concatenate(parts)


def token_bytes(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for (byte-fallback pieces: 1; control tokens: 0)."""
    out = np.zeros(len(tok), dtype=np.int64)
    for i in range(len(tok)):
        piece = tok.convert_ids_to_tokens(i)
        if i in (T.UNK, T.BOS, T.EOS):
            continue
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out[i] = 1
        else:
            out[i] = len(piece.replace("\u2581", " ").encode())
    return out


def unigram_logprobs(train: np.ndarray, vocab: int) -> torch.Tensor:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    return torch.from_numpy(np.log(counts / counts.sum()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--main", default=str(T.REPO / "models" / "tiny"))
    ap.add_argument("--draft", default=str(T.REPO / "models" / "tiny-draft"))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=0, help="0: the whole test stream")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(T.DATA / "eval.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.main, local_files_only=True)
    draft_tok = AutoTokenizer.from_pretrained(args.draft, local_files_only=True)
    assert tok.get_vocab() == draft_tok.get_vocab(), "draft must share the main model's tokenizer"
    stream = test_stream(tok)
    sp_path = T.DATA / "test.npy"
    if sp_path.exists():
        assert np.array_equal(np.load(sp_path).astype(np.int64), stream), "HF and SentencePiece encodings differ"
    train = np.load(T.DATA / "train.npy").astype(np.int64)
    uni = unigram_logprobs(train, len(tok))
    nbytes = token_bytes(tok)
    main_m, draft_m = load(Path(args.main)), load(Path(args.draft))
    n_main = sum(p.numel() for p in main_m.parameters())
    n_draft = sum(p.numel() for p in draft_m.parameters())

    starts = list(range(0, len(stream) - 1, args.seq))
    if args.max_windows:
        starts = starts[:args.max_windows]
    ce = {"main": 0.0, "draft": 0.0, "unigram": 0.0}
    agree, n_tok, n_bytes = 0, 0, 0
    with torch.inference_mode():
        for k, s in enumerate(starts):
            w = torch.from_numpy(stream[s:s + args.seq + 1])[None]
            x, y = w[:, :-1], w[0, 1:]
            lm = main_m(input_ids=x).logits[0].float()
            ld = draft_m(input_ids=x).logits[0].float()
            ce["main"] += F.cross_entropy(lm, y, reduction="sum").item()
            ce["draft"] += F.cross_entropy(ld, y, reduction="sum").item()
            ce["unigram"] -= uni[y].sum().item()
            agree += (lm.argmax(-1) == ld.argmax(-1)).sum().item()
            n_tok += y.numel()
            n_bytes += int(nbytes[y.numpy()].sum())
            if k % 20 == 0:
                print(f"window {k + 1}/{len(starts)}  main {ce['main'] / n_tok:.4f}  draft {ce['draft'] / n_tok:.4f}"
                      f"  {time.time() - t0:.0f}s", flush=True)
    res: dict = {
        "test_modules": list(T.HELD_OUT_TEST), "test_tokens": n_tok, "test_bytes": n_bytes, "seq": args.seq,
        "windows": len(starts), "params": {"main": n_main, "draft": n_draft},
        "param_ratio": round(n_main / n_draft, 2), "draft_greedy_agreement": round(agree / n_tok, 4),
    }
    for name, tot in ce.items():
        loss = tot / n_tok
        res[name] = {"loss": round(loss, 4), "ppl": round(math.exp(loss), 2),
                     "bits_per_byte": round(tot / math.log(2) / n_bytes, 4)}
    res["completions"] = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = main_m.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=T.EOS,
                                  pad_token_id=T.EOS)
        res["completions"].append({"prompt": prompt, "completion": tok.decode(out[0, ids.shape[1]:],
                                                                              skip_special_tokens=True)})
    res["eval_seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "completions"}, indent=1))
    for c in res["completions"]:
        print("-" * 60 + "\n" + c["prompt"] + c["completion"])


if __name__ == "__main__":
    main()
