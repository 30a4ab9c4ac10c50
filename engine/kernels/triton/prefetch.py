"""L2 prefetch from inside a Triton kernel (`prefetch.global.L2`, sm_80+): a kernel with little HBM traffic of its
own (batch-1 split-KV attention) can ask L2 for the next kernel's weights, so HBM streams them while it runs.
The requests are fire-and-forget: nothing waits for them and no register holds the data.

`spread_prefetch` gives each program of the calling grid an equal share of the 128-byte lines of a buffer.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 256  # lines per loop step of a program


@triton.jit
def _l2_prefetch(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@triton.jit
def spread_prefetch(base_ptr, num_lines, pid, num_programs, BLOCK: tl.constexpr):
    """Program pid of num_programs prefetches its contiguous share of the num_lines 128-byte lines at base_ptr (a
    pointer to bytes)."""
    per = tl.cdiv(num_lines, num_programs)
    start = pid * per
    end = tl.minimum(start + per, num_lines)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        offs = tl.where(offs < end, offs, start)  # past the share: its first line again (harmless)
        _l2_prefetch(base_ptr + offs.to(tl.int64) * 128)


def num_lines(t) -> int:
    """128-byte lines of a contiguous tensor's storage."""
    return triton.cdiv(t.numel() * t.element_size(), 128)
