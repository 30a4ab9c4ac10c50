"""CPU micro-benchmarks under pytest-benchmark: the tiny model's tokenizer and the sampler.

Run: pytest benchmarks/test_micro.py --benchmark-only   (not part of the default `pytest -q`, whose testpaths is
tests/). Compare runs with --benchmark-autosave / --benchmark-compare. Each benchmark also checks its result, so a
fast wrong answer does not pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
import torch  # noqa: E402

from engine import hub  # noqa: E402
from engine.sampling import sample  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402

TEXT = (Path(__file__).resolve().parents[1] / "engine" / "sampling.py").read_text(encoding="utf-8")  # real code
BATCH, VOCAB = 32, 32000


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.from_dir(hub.resolve("tiny"))
    assert t is not None
    return t


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, VOCAB, generator=g) * 3.0  # [B, V] float32


def test_tokenizer_encode(benchmark, tok):
    ids = benchmark(tok.encode, TEXT)
    assert len(ids) > 500
    benchmark.extra_info.update(chars=len(TEXT), tokens=len(ids))


def test_tokenizer_decode(benchmark, tok):
    ids = tok.encode(TEXT)
    text = benchmark(tok.decode, ids)
    assert text.strip() == TEXT.strip()
    benchmark.extra_info.update(tokens=len(ids))


def test_sample_greedy_batch32_vocab32000(benchmark, logits):
    out = benchmark(sample, logits, 0.0)
    assert torch.equal(out, logits.argmax(dim=-1))


def test_sample_top_p_batch32_vocab32000(benchmark, logits):
    g = torch.Generator().manual_seed(1)
    out = benchmark(lambda: sample(logits, temperature=0.8, top_p=0.9, generator=g))
    assert out.shape == (BATCH,) and out.dtype == torch.int64 and bool(((out >= 0) & (out < VOCAB)).all())
