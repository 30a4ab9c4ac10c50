"""Engine adapters behind adapters/base.py; engines registered here besides base.REGISTRY's own."""

from adapters.base import REGISTRY

REGISTRY.setdefault("sglang", "adapters.sglang:SGLangAdapter")
