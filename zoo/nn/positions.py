"""Positional schemes.

Additive schemes (``sinusoidal``, ``learned``) are added to the token embedding by the model.
``rope`` rotates q and k inside the attention core; ``alibi`` is a per-head linear distance
bias on the attention scores. ``none`` leaves position to the mixer (causal masks, convolutions
and recurrences carry order on their own).
"""

from __future__ import annotations

import math

import torch
from torch import nn

ADDITIVE = ("sinusoidal", "learned")
IN_ATTENTION = ("rope", "alibi")
SCHEMES = ("none", *ADDITIVE, *IN_ATTENTION)


class SinusoidalPosition(nn.Module):
    """Fixed sin/cos table of Vaswani et al. (2017), added to the embedding."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (T, 1)
        inv = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(1e4) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(pos * inv)
        table[:, 1::2] = torch.cos(pos * inv[: d_model // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, start: int, length: int) -> torch.Tensor:  # (T, d)
        return self.table[start : start + length]


class LearnedPosition(nn.Module):
    """A learned embedding per absolute position (GPT-2 style), drawn from N(0, std)."""

    def __init__(self, d_model: int, max_len: int, std: float = 1.0):
        super().__init__()
        self.table = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.table.weight, std=std)

    def forward(self, start: int, length: int) -> torch.Tensor:  # (T, d)
        return self.table.weight[start : start + length]


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), rotate-half convention (GPT-NeoX, Llama).

    The cos/sin tables are built on first use for the lengths seen and grown when needed, so
    there is no maximum length.
    """

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _tables(self, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        if c is None or c[0].shape[0] < end or c[0].device != device:
            n = max(end, 2 * c[0].shape[0] if c is not None else end)
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))  # (n, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
            self._cache = c = (emb.cos(), emb.sin())
        return c

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape (B, H, T, hd) whose first position is ``start``."""
        T = x.shape[-2]
        cos, sin = self._tables(start + T, x.device)
        cos, sin = cos[start : start + T].to(x.dtype), sin[start : start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes of ALiBi (Press et al. 2022), with the paper's rule for non-powers of two."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive bias -slope * |i - j|: (H, Tq, Tk) for 1-d positions, else (H, *broadcast)."""
    if q_pos.dim() == 1 and k_pos.dim() == 1:
        q_pos, k_pos = q_pos[:, None], k_pos[None, :]
    dist = (q_pos - k_pos).abs().to(slopes.dtype)
    return -slopes.view(-1, *[1] * dist.dim()) * dist
