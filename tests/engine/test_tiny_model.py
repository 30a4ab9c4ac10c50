"""Checks of the embedded models in models/tiny and models/tiny-draft (HF layout, offline load, shared tokenizer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
MAIN, DRAFT = REPO / "models" / "tiny", REPO / "models" / "tiny-draft"
pytestmark = pytest.mark.skipif(not (MAIN / "config.json").exists() or not (DRAFT / "config.json").exists(),
                                reason="models/tiny or models/tiny-draft not present")

# Held-out snippet written for this test (not from the training corpus).
SNIPPET = '''import os
import sys


def find_modules(root, suffix=".py"):
    """Yield (name, path) for every module file under root."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            if not filename.endswith(suffix):
                continue
            path = os.path.join(dirpath, filename)
            name = os.path.relpath(path, root)[:-len(suffix)].replace(os.sep, ".")
            yield name, path


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, value=1):
        self.counts[key] = self.counts.get(key, 0) + value

    def most_common(self, n=None):
        items = sorted(self.counts.items(), key=lambda item: item[1], reverse=True)
        if n is not None:
            items = items[:n]
        return items


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    counter = Counter()
    for name, path in find_modules(argv[0] if argv else "."):
        with open(path, encoding="utf-8") as f:
            counter.add(name, len(f.readlines()))
    for name, count in counter.most_common(10):
        print(f"{count:8d} {name}")
    return 0
'''


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(str(MAIN), local_files_only=True)


@pytest.fixture(scope="module")
def models():
    load = transformers.AutoModelForCausalLM.from_pretrained
    return (load(str(MAIN), dtype=torch.float32, local_files_only=True).eval(),
            load(str(DRAFT), dtype=torch.float32, local_files_only=True).eval())


def _nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_files_layout_and_size():
    index = json.loads((MAIN / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2
    for s in shards:
        assert (MAIN / s).stat().st_size < 15_000_000
    assert (DRAFT / "model.safetensors").exists()
    total = sum(f.stat().st_size for d in (MAIN, DRAFT) for f in d.iterdir() if f.is_file())
    assert total <= 30_000_000
    for d in (MAIN, DRAFT):
        for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                     "tokenizer_config.json"):
            assert (d / name).exists(), d / name
        assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_architecture_features(models):
    for m in models:
        c = m.config
        assert c.model_type == "llama" and c.head_dim == 64 and c.hidden_act == "silu"
        assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention
        assert not c.tie_word_embeddings
        assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    main, draft = models
    assert main.config.hidden_size == main.config.num_attention_heads * 64
    assert 10e6 <= _nparams(main) <= 13e6
    assert _nparams(main) >= 8 * _nparams(draft)


def test_draft_shares_tokenizer(tok):
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (MAIN / name).read_bytes() == (DRAFT / name).read_bytes()
    draft_tok = transformers.AutoTokenizer.from_pretrained(str(DRAFT), local_files_only=True)
    assert draft_tok.get_vocab() == tok.get_vocab()
    assert draft_tok(SNIPPET)["input_ids"] == tok(SNIPPET)["input_ids"]


def test_tokenizer_matches_sentencepiece_and_roundtrips(tok):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(MAIN / "tokenizer.model"))
    text = SNIPPET + "\tx = 'héllo wörld ✓ 🙂'  # bytes fall back\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == sp.bos_id() == 1 and tok.eos_token_id == sp.eos_id() == 2
    assert ids[1:] == sp.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text == sp.decode(ids[1:])
    assert tok.vocab_size == sp.get_piece_size()
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<s>") and chat.endswith("### Assistant:\n")


def test_heldout_loss_far_below_unigram(tok, models):
    ids = torch.tensor([tok(SNIPPET)["input_ids"]])
    y = ids[0, 1:]
    # Best possible unigram model for this snippet: its own empirical token distribution (a lower bound).
    counts = torch.bincount(y, minlength=tok.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * p.log()).sum())
    with torch.inference_mode():
        losses = [float(torch.nn.functional.cross_entropy(m(input_ids=ids[:, :-1]).logits[0], y)) for m in models]
    main_loss, draft_loss = losses
    assert main_loss < 0.5 * unigram, (main_loss, unigram)
    assert draft_loss < 0.7 * unigram, (draft_loss, unigram)
    assert main_loss < draft_loss
    assert math.exp(main_loss) < 8


def test_greedy_completion_is_python(tok, models):
    main, _ = models
    ids = tok("def add(a, b):\n", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = main.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.startswith("    "), repr(text)  # an indented function body
