"""Attention backends behind one ABC (engine/attention/base.py), chosen per device by name."""

from __future__ import annotations

from engine.attention.base import AttentionBackend, AttentionLayerSpec
from engine.attention.metadata import AttentionMetadata, ForwardBatch

BACKENDS = ("torch", "triton")

__all__ = ["BACKENDS", "AttentionBackend", "AttentionLayerSpec", "AttentionMetadata", "ForwardBatch", "get_backend"]


def get_backend(name: str, fresh_attention: str = "triton", fresh_pad: int = 0, warm_fresh_upto: int = 0) -> AttentionBackend:
    """A backend by name; an unknown name lists the known ones. fresh_attention / fresh_pad: EngineConfig's (triton
    only); warm_fresh_upto: the longest fresh prompt whose padded SDPA plan warmup() builds."""
    if name == "torch":
        from engine.attention.torch_ref import TorchBackend

        return TorchBackend()
    if name == "triton":
        from engine.attention.triton_backend import TritonBackend

        return TritonBackend(fresh_attention, fresh_pad, warm_fresh_upto)
    raise ValueError(f"unknown attention backend {name!r} (known: {', '.join(BACKENDS)})")
