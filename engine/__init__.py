"""Anvil's in-house Llama-family inference engine: `engine.load(path) -> LoadedModel` (model, config, tokenizer),
`engine.LLM(model, engine.EngineConfig(...))` to generate."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine import hub
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM, Completion
from engine.model import LoadedModel
from engine.request import SamplingParams

__version__ = "0.2.0"
__all__ = ["LLM", "Completion", "EngineConfig", "LoadedModel", "ModelConfig", "SamplingParams", "hub", "load"]


def _tokenizer(path: Path):
    """engine.tokenizer.Tokenizer for the folder, or None when that module is absent or the folder has none."""
    try:
        from engine.tokenizer import Tokenizer
    except ModuleNotFoundError as e:
        if e.name == "engine.tokenizer":
            return None
        raise
    return Tokenizer.from_dir(path)


def load(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    """Load an HF-layout checkpoint folder (or a name engine.hub.resolve knows, such as 'tiny'); a folder whose
    config.json has a quantization_config (AutoAWQ GEMM, GPTQ, or `bench quantize` output) loads with 4-bit Linears."""
    from engine.config import ModelConfig
    from engine.hub import resolve
    from engine.weights import load_model

    p = Path(path)
    if not (p / "config.json").is_file():
        p = resolve(str(path))
    if "quantization_config" in json.loads((p / "config.json").read_text()):
        from engine.quant import load_quantized  # AutoAWQ / GPTQ / anvil int4 and NF4 folders

        return load_quantized(p, dtype, device)
    config = ModelConfig.from_dir(p)
    model = load_model(p, config, dtype, device)
    return LoadedModel(model=model, config=config, tokenizer=_tokenizer(p))
