"""AWQ (Lin et al., arXiv 2306.00978), after AutoAWQ's `_search_best_scale` and `_search_best_clip`.

Per Linear, from its calibration input rows X [T, K]:
1. scale search: s = x_mean^a / (w_mean^(1-a) + 1e-4) for a on a grid in [0, 1) (AutoAWQ's duo scaling;
   x_mean^a without it), normalised by sqrt(max(s) min(s)); keep the s minimising |X W^T - X (Q(W s) / s)^T|^2.
   Unlike AutoAWQ, s = 1 (plain RTN) is a candidate too: with duo scaling no grid point is the identity.
   For the fused [gate; up] the loss is on the MLP output (w2 float), as AutoAWQ inspects the whole MLP; for
   wqkv it is the layer output (AutoAWQ inspects the attention block, which needs the attention itself).
2. clip search: per output row and group, shrink the symmetric clip of W s by 1 - i/20 (i < 10) and keep the one
   minimising that group's share of the output error on up to 512 rows of X. Rows given by `no_clip_rows`
   (the q and k rows of a fused wqkv, as AutoAWQ skips q_proj / k_proj) are not clipped.

Our choice for the scale (the issue allows it): we do NOT fold s into the previous op (RMSNorm weight / the
previous Linear). The layer keeps `in_scale = 1/s` [K] and multiplies x by it before the int4 matmul
(int4.prepare_input), i.e. y = (x / s) @ Q(W s)^T. This costs one elementwise multiply per Linear and lets wo
and w2 (whose previous ops are not norms) be scaled too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.quant.int4 import Int4Weight, fake_quantize, quantize_rtn


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).float().pow(2).mean().item()


def search_scale(w: torch.Tensor, x: torch.Tensor, group_size: int, n_grid: int = 20,
                 dtype: torch.dtype | None = None, duo_scaling: bool = True,
                 post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Best per-input-channel scale s [K] (float32) and the loss at every grid point (s = 1, plain RTN, first).
    w [N, K], x [T, K]. post: compare post(x @ W^T) instead of the layer output (AutoAWQ's module2inspect)."""
    w, x = w.float(), x.float()
    n, k = w.shape
    wg = w.abs().view(n, k // group_size, group_size)
    w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).view(n, k).mean(0)
    x_mean = x.abs().mean(0)
    post = post or (lambda y: y)
    ref = post(x @ w.T)
    best, best_s, losses = float("inf"), torch.ones(k, device=w.device), []
    for i in range(-1, n_grid):
        if i < 0:  # s = 1 (RTN), so that the search never does worse than RTN on its own objective
            s = torch.ones(k, device=w.device)
        else:
            a = i / n_grid
            s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if duo_scaling else x_mean.pow(a)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize(w * s[None, :], group_size, dtype) / s[None, :]
        loss = _mse(post(x @ wq.T), ref)
        losses.append(loss)
        if loss < best:
            best, best_s = loss, s
    return best_s, losses


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, n_grid: int = 20, max_shrink: float = 0.5,
                n_rows: int = 512, row_batch: int = 256, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per (row, group) clip value [N, K/G] for the (already scaled) w [N, K] on input rows x [T, K]."""
    w = w.float()
    n, k = w.shape
    ng = k // group_size
    step = max(1, x.shape[0] // n_rows)
    xs = x.float()[::step][:n_rows].view(-1, ng, group_size)  # [T', ng, G]
    out = torch.empty(n, ng, device=w.device)
    for r0 in range(0, n, row_batch):
        wb = w[r0:r0 + row_batch].view(-1, ng, group_size)  # [R, ng, G]
        ref = torch.einsum("tgc,rgc->trg", xs, wb)  # each group's contribution to each output
        org_max = wb.abs().amax(-1)  # [R, ng]
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            cmax = org_max * (1 - i / n_grid)
            wq = fake_quantize(wb.reshape(wb.shape[0], k), group_size, dtype, clip=cmax).view_as(wb)
            err = (torch.einsum("tgc,rgc->trg", xs, wq) - ref).pow(2).mean(0)  # [R, ng]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, cmax, best)
        out[r0:r0 + row_batch] = best
    return out


def quantize_awq(w: torch.Tensor, x: torch.Tensor, group_size: int = 128, dtype: torch.dtype | None = None,
                 no_clip_rows: int = 0, clip: bool = True, duo_scaling: bool = True,
                 post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Int4Weight:
    """w [N, K] (the layer's weight), x [T, K] its calibration inputs -> Int4Weight with in_scale = 1/s."""
    dt = dtype or w.dtype
    s, _ = search_scale(w, x, group_size, dtype=dt, duo_scaling=duo_scaling, post=post)
    k = w.shape[1]
    ws = w.float() * s[None, :]
    clip_val = None
    if clip:
        xs = x.float() / s[None, :]  # the scaled layer sees x / s
        c = search_clip(ws[no_clip_rows:], xs, group_size, dtype=dt)
        no_clip = ws[:no_clip_rows].abs().view(no_clip_rows, k // group_size, group_size).amax(-1)
        clip_val = torch.cat([no_clip, c], 0)
    q = quantize_rtn(ws, group_size, dt, clip=clip_val)
    q.in_scale = (1.0 / s).to(dt)
    return q
