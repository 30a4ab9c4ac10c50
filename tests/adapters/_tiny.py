"""Test helpers: a random tiny HF-layout Llama/Mistral checkpoint with a SentencePiece tokenizer trained in-test."""

from __future__ import annotations

import io
import json
import sysconfig
from pathlib import Path

TEXT_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py")


def stdlib_text(limit: int = 120_000) -> str:
    """A few KB of text every machine has: CPython standard library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "".join((root / f).read_text(encoding="utf-8") for f in TEXT_FILES if (root / f).is_file())[:limit]


def train_sentencepiece(out: Path, vocab_size: int = 512) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    lines = [ln for ln in stdlib_text().splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   num_threads=1, minloglevel=2, hard_vocab_limit=True)
    path = out / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def make_checkpoint(out: Path, arch: str = "llama", tokenizer: bool = True, seed: int = 0, tie: bool = False) -> Path:
    """A random 2-layer model (dim 64, GQA 4/2 heads, vocab 512) saved with save_pretrained into `out`."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.08,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    if arch == "llama":
        cfg = transformers.LlamaConfig(rope_theta=10000.0, **common)
        model_cls = transformers.LlamaForCausalLM
    elif arch == "llama3":  # llama3 rope scaling: the exporter writes rope_freqs factors
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(rope_parameters=rope, **common)
        model_cls = transformers.LlamaForCausalLM
    elif arch == "mistral":  # explicit head_dim != hidden/heads exercises the key/value length metadata
        cfg = transformers.MistralConfig(rope_theta=1e6, head_dim=32, sliding_window=4096, **common)
        model_cls = transformers.MistralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones; random norms catch a misplaced norm weight
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        train_sentencepiece(out)
        (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    return out


def hf_logits(model_dir: Path, ids: list[int]):
    """HF transformers float32 logits [len(ids), vocab] for one prompt."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()
