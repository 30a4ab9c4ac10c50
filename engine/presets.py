"""Synthetic presets: real model shapes (Llama-3-8B, Llama-3-70B, Llama-2-7B, Mistral-7B) with random weights, for
speed runs. Under tensor parallelism each rank makes only its own shard (engine/model/layers/parallel.py)."""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.config import ModelConfig, RopeScaling
from engine.model.layers.parallel import TPShard
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
# Llama-3(.1)-70B: Llama-3.1-70B's config.json is 3.1-8B's with these sizes (vocab, rope, eps, context the same;
# the 3.0 release has the same shapes with max_position_embeddings 8192 and no rope scaling)
PRESETS["llama-3-70b"] = replace(PRESETS["llama-3-8b"], dim=8192, n_layers=80, n_heads=64, ffn_dim=28672)


def synthetic(
    preset: str | ModelConfig, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu", seed: int = 0,
    tp: TPShard | None = None,
) -> LoadedModel:
    """A model of the preset's shape (a name, or a ModelConfig such as a preset with fewer layers) with random
    weights (std 0.02, norms 1) made directly on `device` in `dtype`: no host copy, so an 8B model in bf16 needs
    only its 16 GB on the GPU. With `tp` (built for this config) only this rank's shard is made, from a seed of
    its own: the weights differ from the single-process model's (speed only, as every synthetic model)."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    config = PRESETS[preset] if isinstance(preset, str) else preset
    dt = to_dtype(dtype)
    tp = tp if tp is not None and tp.world > 1 else None
    local = config if tp is None else tp.local_config()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(local, tp=tp).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed if tp is None else seed + 7919 * tp.rank)
    state = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dt, device=device)
        state[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=g)
    return LoadedModel(model=Transformer.from_state_dict(local, state, tp), config=config, tokenizer=None)
