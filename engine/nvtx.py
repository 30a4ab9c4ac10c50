"""NVTX ranges the engine can put around prefill / decode / layers; free no-ops unless enabled on a CUDA machine.

Ranges show up in Nsight Systems timelines and let Nsight Compute filter kernels (`ncu --nvtx --nvtx-include`).
They are off by default (a push/pop pair costs ~1 us, which matters per layer in a decode step); turn them on with
`enable()` (bench profile does, for ncu/nsys) or ANVIL_NVTX=1 in the environment of the profiled process.

    from engine import nvtx
    with nvtx.range("prefill"):
        ...
    @nvtx.annotate("decode_step")
    def step(...): ...
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

F = TypeVar("F", bound=Callable)

_state: dict[str, object] = {"on": None}  # None = not decided yet (decided on first use)


def _cuda_nvtx():
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.nvtx
    except Exception:  # no torch / broken CUDA: ranges stay no-ops
        pass
    return None


def enable(on: bool = True) -> bool:
    """Turn ranges on (or off); returns whether they are really on (False without CUDA)."""
    _state["on"] = bool(on) and _cuda_nvtx() is not None
    _state["mod"] = _cuda_nvtx() if _state["on"] else None
    return bool(_state["on"])


def enabled() -> bool:
    if _state["on"] is None:
        enable(os.environ.get("ANVIL_NVTX", "") not in ("", "0"))
    return bool(_state["on"])


@contextlib.contextmanager
def range(name: str) -> Iterator[None]:  # shadows the builtin on purpose: nvtx.range(...)
    """An NVTX range around the block, when enabled."""
    if not enabled():
        yield
        return
    mod = _state["mod"]
    mod.range_push(name)
    try:
        yield
    finally:
        mod.range_pop()


def annotate(name: str | None = None) -> Callable[[F], F]:
    """Decorator: the whole call in one range named `name` (default: the function's qualified name)."""

    def deco(fn: F) -> F:
        label = name or fn.__qualname__

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not enabled():
                return fn(*args, **kwargs)
            with range(label):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


def mark(message: str) -> None:
    """An instantaneous marker, when enabled."""
    if enabled():
        _state["mod"].mark(message)
