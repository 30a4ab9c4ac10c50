"""Programmatic dependent launch (PDL, sm_90+) for the decode step's Triton kernels.

A kernel launched with `launch_pdl=True` may start while the previous kernel on the stream is still finishing:
its programs first issue the loads that do not depend on earlier kernels (a GEMV's first weight tile), then
`gdc_wait()` blocks until the previous kernel has completed and its writes are visible, then
`gdc_launch_dependents()` lets the next kernel start the same way. Every PDL kernel waits before touching memory
an earlier kernel writes, and triggers only after its own wait, so at most two kernels overlap and the order of
the stream is kept (each kernel still sees everything before it complete). The launch gap and the ramp of each of
the ~230 kernels of a batch-1 step overlap the previous kernel's tail instead of following it.

`ENABLED` is False off CUDA, under the Triton interpreter, before sm_90, when this Triton has no launch_pdl
option, or with ANVIL_PDL=0. Kernels take a `PDL: tl.constexpr` mode (0 off, 1 on) and launchers pass `**launch()`;
a kernel enters with `pdl_enter(PDL)` after its independent loads.

ANVIL_PDL_EARLY=1 (mode 2, an experiment): each kernel triggers its dependents *before* its own wait, so a whole
chain of short kernels (RoPE, split-KV attention, merge) and the next GEMV can be resident at once, the GEMV's
independent weight loads overlapping the chain. Still ordered: a kernel's wait returns only when the previous kernel
completed, which itself waited for the one before. Off by default: on the H200 (6e8027f, one run each) it made
batch 1 -0.5%, batch 8 -3% and batch 32 +2.3% (results/gpu/core-h200/core-bench-step-check-6e8027f-*.json).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _supported() -> tuple[bool, str]:
    if os.environ.get("ANVIL_PDL", "1") == "0":
        return False, "disabled by ANVIL_PDL=0"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "Triton interpreter"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device"
        if torch.cuda.get_device_capability() < (9, 0):
            return False, f"sm_{''.join(map(str, torch.cuda.get_device_capability()))} < sm_90"
        from triton.backends.nvidia.compiler import CUDAOptions

        if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
            return False, "this Triton has no launch_pdl option"
        from triton.language.extra import cuda as _cuda

        if not hasattr(_cuda, "gdc_wait"):
            return False, "this Triton has no gdc_wait"
    except Exception as e:  # any probe failure: plain launches
        return False, f"probe failed: {type(e).__name__}: {e}"
    return True, "on"


ENABLED, REASON = _supported()
EARLY = ENABLED and os.environ.get("ANVIL_PDL_EARLY", "0") == "1"


def launch() -> dict:
    """Launch keyword arguments: the PDL mode of the kernel and the launch option."""
    return {"PDL": 2 if EARLY else 1, "launch_pdl": True} if ENABLED else {"PDL": 0}


if ENABLED:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
else:  # never traced: kernels call these only under `if PDL:` (a constexpr False prunes the branch)

    @tl.core.extern
    def gdc_wait(_semantic=None):  # pragma: no cover
        raise RuntimeError("PDL is not enabled")

    @tl.core.extern
    def gdc_launch_dependents(_semantic=None):  # pragma: no cover
        raise RuntimeError("PDL is not enabled")


@triton.jit
def pdl_enter(MODE: tl.constexpr):
    """Mode 1: wait for the previous kernel, then let the next one launch; mode 2: the other way round."""
    if MODE == 2:
        gdc_launch_dependents()
    gdc_wait()
    if MODE == 1:
        gdc_launch_dependents()
