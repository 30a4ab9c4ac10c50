"""hub.resolve (tiny fallback, local folders, the local HF cache) and the synthetic presets."""

from __future__ import annotations

import pytest
import torch

from engine import hub
from engine.config import ModelConfig
from engine.presets import PRESETS, synthetic
from engine.testing import tiny_config, write_random_checkpoint


def test_local_directory(tmp_path):
    write_random_checkpoint(tmp_path, tiny_config())
    assert hub.resolve(str(tmp_path)) == tmp_path.resolve()


def test_hf_cache_snapshot(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / "abc123"
    write_random_checkpoint(snap, tiny_config())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert hub.resolve("acme/tiny-llama") == snap
    with pytest.raises(FileNotFoundError, match="models--acme--other"):
        hub.resolve("acme/other")


def test_unknown_names_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        hub.resolve("no-such-model")


def test_tiny_random_fallback_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(hub, "TINY_RANDOM_DIR", tmp_path / "cache" / "tiny-random")
    p = hub.resolve("tiny")
    assert p == tmp_path / "cache" / "tiny-random"
    assert ModelConfig.from_dir(p) == hub.tiny_random_config()
    first = (p / "model.safetensors").read_bytes()
    monkeypatch.setattr(hub, "TINY_RANDOM_DIR", tmp_path / "cache2" / "tiny-random")
    assert (hub.resolve("tiny") / "model.safetensors").read_bytes() == first
    with pytest.raises(FileNotFoundError, match="tiny-draft"):
        hub.resolve("tiny-draft")


def test_presets_shapes():
    c = PRESETS["llama-3-8b"]
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert c.rope_theta == 500000.0 and c.rope_scaling is not None
    c = PRESETS["llama-2-7b"]
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (4096, 32, 32, 32, 11008, 32000)
    c = PRESETS["mistral-7b"]
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (4096, 32, 32, 8, 14336, 32000)
    assert c.window(0) == 4096
    assert 6.6e9 < PRESETS["llama-2-7b"].num_params < 6.8e9


def test_synthetic_tiny_weights():
    m = synthetic("tiny-test", dtype="bfloat16")
    assert m.model.dtype == torch.bfloat16 and m.tokenizer is None
    w = m.model.layers[0].feed_forward.w13.weight.float()
    assert 0.015 < w.std().item() < 0.025
    assert torch.equal(m.model.norm.weight, torch.ones_like(m.model.norm.weight))
    with pytest.raises(ValueError, match="llama-3-8b"):
        synthetic("nope")
