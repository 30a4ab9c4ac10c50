"""GPTQ (Frantar et al., arXiv 2210.17323), as AutoGPTQ's `gptq.py` `fasterquant`: with H = 2 X^T X / T from the
layer's calibration inputs, quantize W column by column in blocks of 128, each column's rounding error spread
over the not-yet-quantized columns through the upper Cholesky factor of H^-1; damping 0.01 * mean(diag H);
groups of 128 columns get their (asymmetric, min/max) parameters when the quantizer reaches them; optional
act-order (columns processed by decreasing diag H; codes stored in input order, the groups recorded as g_idx,
as in GPTQ checkpoints).
"""

from __future__ import annotations

import torch

from engine.quant.int4 import Int4Weight, check_shapes, group_params, pack_int4, quantize_codes


class Hessian:
    """Running H = 2/T sum_t x_t x_t^T in float32 (AutoGPTQ's add_batch)."""

    def __init__(self, k: int, device):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.h *= self.n / (self.n + t)
        self.n += t
        x = x * (2 / self.n) ** 0.5
        self.h += x.T @ x


def quantize_gptq(w: torch.Tensor, h: torch.Tensor, group_size: int = 128, dtype: torch.dtype | None = None,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False) -> Int4Weight:
    """w [N, K], h [K, K] -> Int4Weight (with g_idx when act_order)."""
    n, k = w.shape
    check_shapes(n, k, group_size)
    dt = dtype or w.dtype
    W = w.float().clone()
    H = h.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(n, k // group_size, dtype=dt, device=w.device)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // group_size
            if col % group_size == 0:  # parameters from the group's current (error-updated) weights
                cur = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :group_size]
                s, z = group_params(cur, group_size, dt)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            wcol = W1[:, i]
            c = quantize_codes(wcol[:, None], scales[:, g:g + 1], zeros[:, g:g + 1], 1)[:, 0]
            codes[:, col] = c
            q = (c.float() - zeros[:, g].float()) * scales[:, g].float()
            err = (wcol - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is None:
        return Int4Weight(pack_int4(codes), scales, zeros, group_size)
    inv = torch.argsort(perm)  # processed column i is input channel perm[i]: back to input order
    g_idx = (torch.arange(k, device=w.device) // group_size)[inv].to(torch.int32)
    return Int4Weight(pack_int4(codes[:, inv]), scales, zeros, group_size, g_idx=g_idx)
