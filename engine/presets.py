"""Synthetic presets: real model shapes (Llama-3-8B, Llama-2-7B, Mistral-7B) with random weights, for speed runs."""

from __future__ import annotations

import torch

from engine.config import ModelConfig, RopeScaling
from engine.model.llama import LoadedModel, Transformer
from engine.testing import tiny_config
from engine.weights import to_dtype

PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001,),
    ),
    "llama-2-7b": ModelConfig(
        model_type="llama",
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        ffn_dim=11008,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    "mistral-7b": ModelConfig(
        model_type="mistral",
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=32768,
        sliding_window=4096,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    # small ones for tests and CPU smoke runs
    "tiny-test": tiny_config("llama"),
    "tiny-test-mistral": tiny_config("mistral", sliding_window=16),
    "tiny-test-qwen2": tiny_config("qwen2", tie_word_embeddings=True),
}


def synthetic(
    preset: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu", seed: int = 0
) -> LoadedModel:
    """A model of the preset's shape with random weights (std 0.02, norms 1) made directly on `device`
    in `dtype`: no host copy, so an 8B model in bf16 needs only its 16 GB on the GPU."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    config = PRESETS[preset]
    dt = to_dtype(dtype)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dt, device=device)
        state[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=g)
    return LoadedModel(model=Transformer.from_state_dict(config, state), config=config, tokenizer=None)
