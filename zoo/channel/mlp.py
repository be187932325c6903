"""Dense channel mixers: the GELU MLP and SwiGLU (Shazeer 2020). Shape (B, T, d) -> (B, T, d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import at_least


class MLP(nn.Module):
    """Linear -> GELU -> Linear; ``hidden`` defaults to 4 * d_model."""

    def __init__(self, d_model: int, *, hidden: int | None = None, bias: bool = True):
        super().__init__()
        at_least("mlp", 1, d_model=d_model)
        at_least("mlp", 0, hidden=hidden or 0)  # 0 or None: the default
        hidden = hidden or 4 * d_model
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))

    def flops(self, batch: int, length: int) -> int:
        """Forward FLOPs: the two matmuls (2 per multiply-add)."""
        return 2 * batch * length * (self.up.in_features * self.up.out_features * 2)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); ``hidden`` defaults to 8/3 * d_model rounded up to 8,
    which keeps the parameter count of a 4x MLP."""

    def __init__(self, d_model: int, *, hidden: int | None = None, bias: bool = False):
        super().__init__()
        at_least("swiglu", 1, d_model=d_model)
        at_least("swiglu", 0, hidden=hidden or 0)  # 0 or None: the default
        hidden = hidden or -(-8 * d_model // 3 // 8) * 8
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def flops(self, batch: int, length: int) -> int:
        """Forward FLOPs: gate and up (one matmul) and down."""
        d, h = self.down.out_features, self.down.in_features
        return 2 * batch * length * (d * 2 * h + h * d)
