"""The trained tiny model: anvil and HF transformers give identical greedy tokens (64) on held-out code, float32."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

import engine
from engine.generator import Generator, SamplingParams
from engine.hub import resolve

transformers = pytest.importorskip("transformers")

# held-out modules of scripts/train_tiny.py: never trained on (see models/README.md)
HELD_OUT = ["json/__init__.py", "shlex.py", "fractions.py", "calendar.py"]
N_NEW = 64


@pytest.fixture(scope="module")
def setup():
    path = resolve("tiny")
    if not (path / "tokenizer.model").exists():
        pytest.skip("models/tiny is not the trained model here")
    lm = engine.load(path, "float32", "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for rel in HELD_OUT:
        text = (stdlib / rel).read_text(encoding="utf-8")
        start = max(text.find("    def "), 0)  # a method header in the middle of the module
        prompts.append(lm.tokenizer.encode(text[start : start + 300]))
    return lm, hf, prompts


def hf_greedy(hf, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_greedy_64_tokens_equal_hf_one_by_one_and_batched(setup):
    lm, hf, prompts = setup
    expected = [hf_greedy(hf, p) for p in prompts]
    gen = Generator(lm.model, max_batch_size=len(prompts), max_seq_len=512)
    for p, want in zip(prompts, expected, strict=True):
        assert gen.generate([p], N_NEW, SamplingParams())[0].tokens == want
    batched = gen.generate(prompts, N_NEW, SamplingParams())  # mixed prompt lengths in one packed batch
    assert [c.tokens for c in batched] == expected
    assert len({len(p) for p in prompts}) > 1


def test_logits_match_hf_on_held_out_prompt(setup):
    lm, hf, prompts = setup
    gen = Generator(lm.model, max_batch_size=1, max_seq_len=512)
    ours = gen.logits([prompts[0]])[0]
    with torch.inference_mode():
        theirs = hf(torch.tensor([prompts[0]])).logits[0].float()
    assert (ours - theirs).abs().max().item() < 1e-4
