"""Fixtures for engine tests: random HF-layout checkpoints on disk and their HF transformers twins."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.testing import write_random_checkpoint

_counter = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models are op-overhead bound: intra-op threads only contend (measured ~30x slower on a busy 2-core CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(config, **write_random_checkpoint kwargs) -> folder with config.json + safetensors."""

    def make(config: ModelConfig, **kw) -> Path:
        path = tmp_path_factory.mktemp(f"ckpt{next(_counter)}")
        return write_random_checkpoint(path, config, **kw)

    return make


def hf_model(path: Path):
    """The transformers model of a checkpoint folder, float32, eager attention (exact masks)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
