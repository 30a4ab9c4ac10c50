"""The model: the one Llama-family forward (llama.py) and its layers (layers/)."""

from engine.model.layers.rotary import rope_inv_freq
from engine.model.llama import Block, LoadedModel, Transformer

__all__ = ["Block", "LoadedModel", "Transformer", "rope_inv_freq"]
