"""CUDA-graph capture of a step function for bucketed batch sizes, sharing one memory pool (nano-vllm style).

The step function must read and write only static buffers and must not sync with the host. Buckets are captured
largest first so the smaller graphs reuse the largest one's pool; each is warmed up on a side stream first (Triton
compiles, cuBLAS creates its handles and workspaces) so nothing but kernel launches is recorded.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


@contextmanager
def gc_paused(collect: bool = True) -> Iterator[None]:
    """No automatic garbage collection inside a capture (after one now, unless collect=False). torch.cuda.graph no
    longer collects on entry, so a dead cycle (an earlier engine with its graphs and pinned buffers) could be freed
    mid-capture: its CUDA frees and event records invalidate the capture, and torch's CUDA generator is left in
    capture mode (every later CUDA RNG call fails: "Offset increment outside graph capture"), seen on the H200 in
    tests/engine/test_core_gpu.py. vLLM pauses collection during capture too."""
    if collect:
        gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class GraphRunner:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.fallback: str | None = None  # why graphs are not used (None = captured)

    def capture(self, step: Callable[[int], torch.Tensor], buckets: list[int], reset: Callable[[], None]) -> None:
        """Capture step(bs) for every bucket; on any failure keep none and record the reason (eager fallback)."""
        try:
            with gc_paused():
                self._capture(step, buckets)
        except Exception as e:  # capture failure is not fatal: the same step runs eagerly
            self.graphs.clear()
            self.outputs.clear()
            self.fallback = f"capture failed: {type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed, decoding eagerly: %s", self.fallback)
        finally:
            reset()
            torch.cuda.synchronize(self.device)

    def _capture(self, step: Callable[[int], torch.Tensor], buckets: list[int]) -> None:
        pool = None
        side = torch.cuda.Stream(self.device)
        for bs in sorted(buckets, reverse=True):
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step(bs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[bs] = step(bs)
            pool = g.pool() if pool is None else pool
            self.graphs[bs] = g

    def has(self, bs: int) -> bool:
        return bs in self.graphs

    def run(self, bs: int, step: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Replay the bucket's graph (its output tensor is rewritten in place), or run the step eagerly."""
        g = self.graphs.get(bs)
        if g is None:
            return step(bs)
        g.replay()
        return self.outputs[bs]
