"""RMSNorm: a weight and an eps; applied by the Linear that consumes it (a prologue a kernel may fuse) or alone."""

from __future__ import annotations

import torch
from torch import nn

from engine import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)
