"""Test helpers: small configs and random checkpoints written in the HF layout (config.json + safetensors)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.config import ModelConfig, RopeScaling
from engine.weights import INDEX_FILE, SINGLE_FILE, hf_shapes


def tiny_config(model_type: str = "llama", **overrides) -> ModelConfig:
    """A small config of the given family (dim 64, 2 layers, GQA 4/2, vocab 512); override any field."""
    base = ModelConfig(
        model_type=model_type,
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        rms_norm_eps=1e-6 if model_type == "qwen2" else 1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        qkv_bias=model_type == "qwen2",
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    return replace(base, **overrides)


LLAMA3_SCALING_SMALL = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)
"""Llama-3 scaling with a short original context, so that tiny head dims fall in all three frequency bands."""


def random_hf_state(
    config: ModelConfig, seed: int = 0, std: float = 0.02, norm_std: float = 0.0
) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors: weights and biases ~ N(0, std), norms ~ 1 + N(0, norm_std)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(config).items():
        t = torch.randn(shape, generator=g)
        state[name] = 1.0 + norm_std * t if name.endswith("norm.weight") else std * t
    return state


def save_checkpoint(
    path: str | Path, config: ModelConfig | dict, state: dict[str, torch.Tensor], shards: int = 1
) -> Path:
    """Write config.json and the tensors: one model.safetensors, or `shards` files plus the index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = config.to_hf() if isinstance(config, ModelConfig) else config
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.contiguous() for k, v in state.items()}
    if shards <= 1:
        save_file(state, str(path / SINGLE_FILE), metadata={"format": "pt"})
        return path
    names = list(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return path


def write_random_checkpoint(
    path: str | Path,
    config: ModelConfig,
    seed: int = 0,
    std: float = 0.02,
    norm_std: float = 0.0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random checkpoint of `config` in the HF layout under `path` (created)."""
    state = {k: v.to(dtype) for k, v in random_hf_state(config, seed, std, norm_std).items()}
    return save_checkpoint(path, config, state, shards)


def run_script(code: str, *args: str, interpret: bool = True, timeout: float = 900, **env: str) -> str:
    """Run `code` in a fresh Python (cwd on PYTHONPATH) with the Triton interpreter on (interpret=True: it must be
    set before any kernel is defined, hence the subprocess) or off (an AOT compile check), extra env vars added;
    assert it exits 0 with its last line "OK". Returns its stdout."""
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(PYTHONPATH=os.getcwd(), **env, **({"TRITON_INTERPRET": "1"} if interpret else {}))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=full)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout
