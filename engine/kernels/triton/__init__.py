"""Triton kernels of the GPU fast path (paged decode attention, decode GEMV, fused norm/RoPE/SwiGLU), each beside its launcher."""
