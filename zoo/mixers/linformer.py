"""Linformer (Wang et al. 2020): keys and values projected along the sequence to length k.

    y = softmax(Q (E K)^T / sqrt(d)) (F V),   E, F: learned (k x max_len)

Bidirectional only, as published: E mixes all positions, so position t's output depends on
every input. Inputs shorter than ``max_len`` use the first T columns of E and F (as the
reference implementation does); longer inputs are an error. E and F may be shared between K
and V (``share_kv``) and are shared across heads unless ``share_heads=False``.

Backends: ``reference`` writes the projection and the attention as plain einsums and a
softmax; ``torch`` projects with one matmul and attends with ``scaled_dot_product_attention``.
Time O(T k d), memory O(T k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import implements
from zoo.errors import ZooConfigError
from zoo.nn.attention import AttentionMixer


class LinformerAttention(AttentionMixer):
    AUTO_ORDER = ("torch",)
    IN_ATTENTION = ()  # rope and alibi: not defined through the projection along the sequence

    def __init__(self, d_model: int, *, causal: bool, max_len: int = 4096, k: int = 256,
                 share_kv: bool = False, share_heads: bool = True, **attention):
        if causal:
            raise ZooConfigError(
                "linformer cannot be causal: its projection E mixes all positions along the "
                "sequence, so every output sees the future. Use it with causal=False."
            )
        super().__init__(d_model, causal=False, **attention)
        if k < 1 or max_len < 1:
            raise ZooConfigError(f"linformer needs k >= 1 and max_len >= 1, got k={k}, max_len={max_len}")
        self.max_len, self.k, self.share_kv, self.share_heads = max_len, k, share_kv, share_heads
        shape = (max_len, k) if share_heads else (self.n_heads, max_len, k)
        bound = 1 / math.sqrt(k)
        self.proj_k = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.proj_v = None if share_kv else nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

    def projections(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """E and F for ``T`` positions: (T, k), or (H, T, k) when heads do not share them."""
        if T > self.max_len:
            raise ZooConfigError(
                f"linformer was built for max_len={self.max_len} positions and got {T}; "
                "build it with max_len >= the longest input"
            )
        E = self.proj_k[..., :T, :]
        return E, (E if self.proj_v is None else self.proj_v[..., :T, :])

    @implements("reference", op="attend")
    def attend_reference(self, q, k, v):
        E, Fm = self.projections(k.shape[-2])
        eq = "bhtd,tk->bhkd" if self.share_heads else "bhtd,htk->bhkd"
        kp, vp = torch.einsum(eq, k, E), torch.einsum(eq, v, Fm)
        scores = torch.einsum("bhnd,bhkd->bhnk", q, kp) * self.scale
        return torch.einsum("bhnk,bhkd->bhnd", scores.softmax(-1), vp)

    @implements("torch", op="attend")
    def attend_torch(self, q, k, v):
        E, Fm = self.projections(k.shape[-2])
        if not self.share_heads:
            E, Fm = E[None], Fm[None]
        kp = E.transpose(-2, -1) @ k  # (B, H, k, d)
        vp = Fm.transpose(-2, -1) @ v
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, kp, vp, dropout_p=p)

    def attend_flops(self, batch: int, length: int) -> int:
        """Keys and values projected along the sequence to k rows (E^T K, F^T V), then attention
        of the T queries over those k."""
        return 4 * batch * self.n_heads * self.head_dim * self.k * length * 2

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, max_len={self.max_len}, k={self.k}, "
                f"share_kv={self.share_kv}, share_heads={self.share_heads}")
