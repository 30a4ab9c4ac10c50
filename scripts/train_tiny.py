"""Build Anvil's embedded models: SentencePiece tokenizer + data (`prep`), Llama training and HF export (`train`).

Reproduce (from the repo root; models/README.md says how the committed models were made, on one H100):
    python scripts/train_tiny.py prep                 # CPU, ~1 min: tokenizer -> models/tiny*, tokens -> .train/
    python scripts/train_tiny.py train --preset main --shards 2 --out models/tiny &   # GPU, both at once
    python scripts/train_tiny.py train --preset draft --out models/tiny-draft; wait
    python scripts/eval_tiny.py                       # CPU: held-out numbers, agreement, completions
CPU smoke run: train --preset main --out /tmp/t --device cpu --max-steps 20 --batch 4 --seq 256 --final-eval-windows 4
The corpus is the Python standard library of the interpreter that runs `prep` (sorted file list; fixed held-out
modules, see HELD_OUT_*). Training samples random windows from the training stream; the checkpoint with the best loss
on the `val` modules is exported; `test` modules are only used for the reported numbers (scripts/eval_tiny.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".train"
VOCAB_SIZE = 4096
BOS, EOS, UNK = 1, 2, 0
ROPE_THETA = 10000.0
# Held-out top-level modules/packages (their test_<name> files/packages in test/ are held out with them).
HELD_OUT_VAL = ("csv", "difflib", "logging", "pprint", "textwrap", "wave", "heapq")
HELD_OUT_TEST = ("argparse", "json", "shlex", "fractions", "dataclasses", "zipfile", "calendar", "string")
MAX_FILE_BYTES = 500_000
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
PRESETS = {
    # ~11.7M params: GQA (6 heads / 2 kv heads), head_dim 64, SwiGLU, RMSNorm, RoPE, untied embeddings.
    "main": dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=5, num_attention_heads=6,
                 num_key_value_heads=2, lr=2e-3, epochs_cap=20.0, dropout=0.2),
    # ~1.3M params (>= 8x smaller), same tokenizer, head_dim 64, GQA 2 heads / 1 kv head.
    "draft": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, lr=3e-3, epochs_cap=60.0, dropout=0.0),
}


# ----------------------------------------------------------------------------------------------------- corpus
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel: Path) -> str:
    """'train' | 'val' | 'test' for a path relative to the stdlib folder."""
    parts = rel.parts
    name = parts[0].removesuffix(".py")
    if len(parts) > 1 and parts[0] == "test":
        name = parts[1].removesuffix(".py").removeprefix("test_")
    if name in HELD_OUT_TEST:
        return "test"
    if name in HELD_OUT_VAL:
        return "val"
    return "train"


def corpus_files() -> dict[str, list[tuple[str, str]]]:
    """{'train'|'val'|'test': [(relative path, text)]}, sorted, UTF-8 only, CRLF normalised."""
    root = stdlib_dir()
    out: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(s in ("site-packages", "__pycache__") or s.startswith("config-3") for s in rel.parts):
            continue
        if rel.name.startswith("_sysconfigdata") or p.stat().st_size > MAX_FILE_BYTES or p.is_symlink():
            continue
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace("\r\n", "\n")
        if text.strip():
            out[split_of(rel)].append((rel.as_posix(), text))
    return out


# -------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(train: list[tuple[str, str]], out_prefix: Path) -> None:
    import sentencepiece as spm

    lines = [ln for _, text in train for ln in text.split("\n") if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out_prefix), model_type="bpe", vocab_size=VOCAB_SIZE,
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentence_length=8192, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        pad_id=-1, num_threads=os.cpu_count() or 1, input_sentence_size=0, shuffle_input_sentence=False,
        user_defined_symbols=["\n", "\t"], minloglevel=2,
    )


def sp_to_hf(sp_model: Path):
    """A `tokenizers.Tokenizer` equal to the SentencePiece BPE model (byte fallback, no dummy prefix)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []  # every (a, b) with a, b, a+b in the vocab, ranked like SentencePiece: by the merged piece's id
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((pid, vocab[a], vocab[b], a, b))
    merges = [(a, b) for *_, a, b in sorted(merges)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("\n", "\t")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    return tok


def write_tokenizer_files(sp_model: Path, dest: Path) -> None:
    """tokenizer.model (our SentencePiece path) + tokenizer.json/tokenizer_config.json (HF) in `dest`."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    sp_to_hf(sp_model).save(str(dest / "tokenizer.json"))
    shutil.copyfile(sp_model, dest / "tokenizer.model")
    cfg = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
        "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 2048,
        "padding_side": "left", "chat_template": CHAT_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (dest / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
    (dest / "chat_template.jinja").unlink(missing_ok=True)


def generation_config(dest: Path) -> None:
    (dest / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": False, "max_new_tokens": 128}, indent=2) + "\n")


def cmd_prep(args: argparse.Namespace) -> None:
    import sentencepiece as spm

    t0 = time.time()
    DATA.mkdir(exist_ok=True)
    files = corpus_files()
    print({k: (len(v), sum(len(t.encode()) for _, t in v)) for k, v in files.items()}, flush=True)
    prefix = DATA / "spm"
    train_tokenizer(files["train"], prefix)
    print(f"tokenizer trained in {time.time() - t0:.0f}s", flush=True)
    for name in ("tiny", "tiny-draft"):
        write_tokenizer_files(prefix.with_suffix(".model"), REPO / "models" / name)
    sp = spm.SentencePieceProcessor(model_file=str(prefix.with_suffix(".model")))
    meta: dict = {"stdlib": str(stdlib_dir()), "python": sys.version.split()[0], "vocab_size": VOCAB_SIZE,
                  "held_out_val": HELD_OUT_VAL, "held_out_test": HELD_OUT_TEST}
    for split, items in files.items():
        ids = sp.encode([t for _, t in items])
        stream = np.concatenate([np.array([BOS, *x, EOS], dtype=np.uint16) for x in ids])
        np.save(DATA / f"{split}.npy", stream)
        meta[split] = {"files": len(items), "bytes": sum(len(t.encode()) for _, t in items),
                       "tokens": int(stream.size), "paths": [p for p, _ in items] if split != "train" else None}
        print(split, meta[split]["files"], "files", meta[split]["bytes"], "bytes", stream.size, "tokens", flush=True)
    (DATA / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"prep done in {time.time() - t0:.0f}s", flush=True)


# --------------------------------------------------------------------------------------------------- training
def build_model(preset: str, max_pos: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"], head_dim=64, hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=max_pos, rope_theta=ROPE_THETA, tie_word_embeddings=False, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=None, attention_bias=False, mlp_bias=False, initializer_range=0.02,
    )
    return LlamaForCausalLM(cfg)


def save_hf(model, dest: Path, shards: int) -> int:
    """Write config.json + bf16 safetensors (1 file, or `shards` files + model.safetensors.index.json)."""
    import torch
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    c = model.config
    cfg = {  # classic Llama keys (rope_theta at top level) so every loader, old or new, reads it the same way
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": ROPE_THETA, "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02, "bos_token_id": BOS,
        "eos_token_id": EOS, "use_cache": True, "torch_dtype": "bfloat16",
    }
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    if shards <= 1:
        save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
        return total
    groups: list[dict] = [{} for _ in range(shards)]
    budget, acc, g = total / shards, 0, 0
    for k, v in sd.items():  # state_dict order: embed, layers..., norm, lm_head
        if acc >= budget * (g + 1) and g < shards - 1:
            g += 1
        groups[g][k] = v
        acc += v.numel() * v.element_size()
    weight_map = {}
    for i, grp in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(grp, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in grp})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def eval_loss(model, stream, seq: int, batch: int, max_windows: int | None, dev) -> float:
    """Mean next-token loss over non-overlapping windows of `seq` tokens (last partial window included)."""
    import torch
    import torch.nn.functional as F

    n = stream.numel()
    starts = list(range(0, n - 1, seq))
    if max_windows is not None:
        starts = starts[:max_windows]
    tot, cnt = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for i in range(0, len(starts), batch):
            chunk = [stream[s:min(s + seq + 1, n)] for s in starts[i:i + batch]]
            if all(c.numel() == seq + 1 for c in chunk):
                x = torch.stack(chunk)
                logits = model(input_ids=x[:, :-1]).logits.float()
                tot += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                       reduction="sum").item()
                cnt += x[:, 1:].numel()
            else:  # the last, shorter window: one by one
                for c in chunk:
                    c = c[None]
                    logits = model(input_ids=c[:, :-1]).logits.float()
                    tot += F.cross_entropy(logits[0], c[0, 1:], reduction="sum").item()
                    cnt += c.size(1) - 1
    model.train()
    return tot / max(cnt, 1)


def add_dropout(model, p: float) -> None:
    """Training-only dropout on the embeddings, attention and MLP outputs (forward hooks; nothing is saved)."""
    import torch.nn.functional as F

    model.config.attention_dropout = 0.0  # keep SDPA on its fused path; dropout is on the residual branches
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: F.dropout(o, p, m.training))
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(
            lambda m, i, o: (F.dropout(o[0], p, m.training), *o[1:]) if isinstance(o, tuple) else
            F.dropout(o, p, m.training))
        layer.mlp.register_forward_hook(lambda m, i, o: F.dropout(o, p, m.training))


def cmd_train(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    p = PRESETS[args.preset]
    train = torch.from_numpy(np.load(DATA / "train.npy").astype(np.int64)).to(dev)
    val = torch.from_numpy(np.load(DATA / "val.npy").astype(np.int64)).to(dev)
    model = build_model(args.preset).to(dev)
    n_params = sum(x.numel() for x in model.parameters())
    dropout = p["dropout"] if args.dropout < 0 else args.dropout
    if dropout > 0:
        add_dropout(model, dropout)
    print(f"[{args.preset}] params={n_params:,} train_tokens={train.numel():,} val_tokens={val.numel():,}", flush=True)
    decay = [x for x in model.parameters() if x.dim() >= 2]
    no_decay = [x for x in model.parameters() if x.dim() < 2]
    lr = args.lr or p["lr"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    fwd = model
    if args.compile and dev.type == "cuda":
        fwd = torch.compile(model)
    tokens_cap = (args.epochs_cap or p["epochs_cap"]) * train.numel()
    tok_per_step = args.batch * args.seq
    warmup = min(args.warmup, max(1, args.max_steps // 10) if args.max_steps else args.warmup)
    ar = torch.arange(args.seq + 1, device=dev)
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    def step_fn(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = fwd(input_ids=x[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    best, best_state, best_step, history = float("inf"), None, 0, []
    t0 = time.time()
    last_eval, step, progress, seen = t0, 0, 0.0, 0
    while progress < 1.0:
        starts = torch.randint(0, train.numel() - args.seq - 1, (args.batch,), device=dev, generator=gen)
        x = train[starts[:, None] + ar]
        if step < warmup:
            cur = lr * (step + 1) / warmup
        else:
            cur = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = cur
        try:
            opt.zero_grad(set_to_none=True)
            loss = step_fn(x)
            loss.backward()
        except Exception as e:  # torch.compile trouble: fall back to eager once
            if fwd is model:
                raise
            print(f"compile failed ({type(e).__name__}: {str(e)[:500]}); eager", flush=True)
            fwd = model
            opt.zero_grad(set_to_none=True)
            loss = step_fn(x)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += tok_per_step
        elapsed = time.time() - t0
        progress = max(seen / tokens_cap, elapsed / args.time_budget if args.time_budget else 0.0,
                       step / args.max_steps if args.max_steps else 0.0)
        if step % args.log_every == 0 or step == 1:
            print(f"[{args.preset}] step {step} loss {loss.item():.4f} lr {cur:.2e} tok {seen / 1e6:.1f}M "
                  f"ep {seen / train.numel():.2f} t {elapsed:.0f}s {seen / elapsed:,.0f} tok/s", flush=True)
        if time.time() - last_eval >= args.eval_every or progress >= 1.0:
            vl = eval_loss(model, val, args.seq, args.eval_batch, args.eval_windows, dev)
            history.append({"step": step, "time_s": round(elapsed, 1), "tokens": seen, "val_loss": round(vl, 4)})
            print(f"[{args.preset}] eval step {step} val_loss {vl:.4f} (best {min(best, vl):.4f})", flush=True)
            if vl < best:
                best, best_step = vl, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            last_eval = time.time()
    train_s = time.time() - t0
    model.load_state_dict(best_state)
    vl_full = eval_loss(model, val, args.seq, args.eval_batch, args.final_eval_windows or None, dev)
    out = Path(args.out)
    size = save_hf(model, out, args.shards)
    generation_config(out)
    metrics = {
        "preset": args.preset, "params": n_params, "steps": step, "best_step": best_step, "tokens_seen": seen,
        "epochs": round(seen / train.numel(), 2), "train_seconds": round(train_s, 1), "batch": args.batch,
        "seq": args.seq, "lr": lr, "weight_decay": args.wd, "dropout": dropout, "val_loss": round(vl_full, 4),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
        "weights_bytes": size, "history": history,
    }
    (Path(args.metrics) if args.metrics else DATA / f"{args.preset}_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prep", help="train the tokenizer, write tokenizer files to models/tiny*, tokens to .train/")
    t = sub.add_parser("train", help="train one model on .train/ and save it in HF layout")
    t.add_argument("--preset", choices=sorted(PRESETS), required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--metrics", default=None, help="where to write the training metrics json")
    t.add_argument("--device", default="cuda")
    t.add_argument("--time-budget", type=float, default=440.0, help="seconds of training (lr schedule follows it)")
    t.add_argument("--max-steps", type=int, default=0)
    t.add_argument("--epochs-cap", type=float, default=0.0, help="stop after this many epochs (0: preset's)")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq", type=int, default=1024)
    t.add_argument("--lr", type=float, default=0.0)
    t.add_argument("--wd", type=float, default=0.1)
    t.add_argument("--dropout", type=float, default=-1.0, help="residual-branch dropout (<0: preset's)")
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--eval-every", type=float, default=20.0)
    t.add_argument("--eval-batch", type=int, default=32)
    t.add_argument("--eval-windows", type=int, default=96)
    t.add_argument("--final-eval-windows", type=int, default=0, help="0: the whole val set")
    t.add_argument("--log-every", type=int, default=1000)
    t.add_argument("--shards", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compile", type=int, default=1)
    args = ap.parse_args(argv)
    {"prep": cmd_prep, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    main()
