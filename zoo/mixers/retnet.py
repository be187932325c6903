"""Multi-scale retention, the sequence mixer of RetNet (Sun et al. 2023, arXiv:2307.08621).

Per head h with a fixed decay gamma_h = 1 - 2^(-5 - h), queries and keys rotated by position
(the relative-position rotation of the paper, RoPE here, always on):

    parallel    Y = (Q K^T * D) V,      D_nm = gamma^(n - m) if n >= m else 0
    recurrent   S_n = gamma S_{n-1} + k_n^T v_n,    y_n = q_n S_n
    chunkwise   inside a chunk the parallel form; across chunks the state S, carried as
                S_(k+1) = gamma^c S_k + sum_j gamma^(c-1-j) k_j^T v_j
    out = W_O (swish(X W_G) * GroupNorm_heads(Y))

Keys are scaled by 1/sqrt(head_dim); the per-head GroupNorm makes the paper's other
normalisations (of D and of the scores, which rescale each position) unnecessary.

Backends of ``attend``:
  reference  the parallel form with the T x T decay mask;
  torch      the chunkwise form, chunks of ``chunk`` positions: O(T (chunk + head_dim) d) time;
  fla        flash-linear-attention's ``chunk_simple_gla`` (Triton, CUDA; extra ``gpu``) with the
             per-head log decays as its gates.
Decoding: the recurrent form, a state of n_heads x head_dim x head_dim, constant in length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import implements
from zoo.errors import ZooConfigError, at_least
from zoo.nn import fla
from zoo.nn.attention import MatrixStateAttention
from zoo.nn.positions import Rotary


class RetNet(MatrixStateAttention):
    AUTO_ORDER = ("fla", "torch")
    IN_ATTENTION = ()  # retention rotates q and k itself; ALiBi has no scores to bias here

    def __init__(self, d_model: int, *, causal: bool = True, chunk: int = 64, rope_base: float = 10_000.0,
                 **attention):
        if not causal:
            raise ZooConfigError("retnet is causal only: retention decays the past. Use causal=True.")
        super().__init__(d_model, causal=True, rope_base=rope_base, **attention)
        at_least("retnet", 1, chunk=chunk)
        self.chunk = chunk
        self.rotary = Rotary(self.head_dim, rope_base)
        H, width = self.n_heads, self.n_heads * self.head_dim
        self.register_buffer("log_decay", torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))),
                             persistent=False)  # log gamma_h, (H,)
        self.gate = nn.Linear(d_model, width, bias=False)
        self.group_norm = nn.GroupNorm(H, width)

    def decay(self, rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """gamma_h^(row - col) where row >= col, else exactly 0: (H, len(rows), len(cols))."""
        lag = (rows[:, None] - cols[None, :]).to(self.log_decay.dtype)
        d = torch.exp(self.log_decay[:, None, None] * lag.clamp(min=0))
        return torch.where(lag >= 0, d, 0.0).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        q, k, v = self.project(x)
        if x.shape[0] == 0 or x.shape[1] == 0:
            return self.finish(x, v)
        return self.finish(x, self.attend(q, k * self.scale, v))

    def finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-head GroupNorm of y (B, H, T, hd), the swish gate from x (B, T, d), the output projection."""
        B, H, T, hd = y.shape
        y = self.group_norm(y.transpose(1, 2).reshape(B * T, H * hd)).view(B, T, H * hd)
        return self.out(F.silu(self.gate(x)) * y)

    @implements("reference", op="attend")
    def attend_reference(self, q, k, v):
        pos = torch.arange(q.shape[2], device=q.device)
        return ((q @ k.transpose(-2, -1)) * self.decay(pos, pos, q.dtype)) @ v

    @implements("torch", op="attend")
    def attend_torch(self, q, k, v):
        B, H, T, hd = q.shape
        c = min(self.chunk, T)
        n = math.ceil(T / c)
        pad = n * c - T  # padding comes last, so causality hides it from real positions
        q, k, v = (F.pad(t, (0, 0, 0, pad)).view(B, H, n, c, hd) for t in (q, k, v))
        pos = torch.arange(c, device=q.device)
        inner = ((q @ k.transpose(-2, -1)) * self.decay(pos, pos, q.dtype)[:, None]) @ v  # (B, H, n, c, hd)
        # what chunk j adds to the state, sum_i gamma^(c-1-i) k_i^T v_i: (B, H, n, hd, hd)
        to_end = self.decay(torch.full((1,), c - 1, device=q.device), pos, q.dtype)  # (H, 1, c)
        added = (k * to_end[:, None].transpose(-2, -1)).transpose(-2, -1) @ v
        whole = torch.exp(self.log_decay * c).to(q.dtype).view(1, H, 1, 1, 1).expand(1, H, n, 1, 1)  # gamma^c
        states = self.carry(added, whole)  # (B, H, n, hd, hd)
        from_start = self.decay(pos + 1, torch.zeros(1, dtype=torch.long, device=q.device), q.dtype)  # gamma^(i+1)
        cross = (q * from_start[:, None]) @ states  # (B, H, n, c, hd)
        return (inner + cross).view(B, H, n * c, hd)[:, :, :T]

    def flops(self, batch: int, length: int) -> int:
        """The attention projections and the swish gate, and the chunkwise products per head
        (the length padded to whole chunks): Q K^T and its product with V inside each chunk,
        each chunk's K^T V, and Q times the carried state."""
        width = self.n_heads * self.head_dim
        return (2 * batch * length * self.d_model * width * 5 + self.chunkwise_flops(batch, length)
                + self.conv_flops(batch, length))

    @implements("fla", op="attend", package="fla", extra="gpu", devices=("cuda",))
    def attend_fla(self, q, k, v):
        B, H, T, _ = q.shape
        g = self.log_decay.to(torch.float32)[None, :, None].expand(B, H, T)
        return fla.call(fla.kernel("simple_gla", "chunk_simple_gla"), q, k, v, g).to(q.dtype)

    # -- decoding: the recurrent form (init_state: MatrixStateAttention's) ----------------------
    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x_t (B, d) -> (B, d); a new state (the one given is not changed)."""
        n = state["length"]
        q, k, v, conv = self.project_step(x_t, state, start=n)  # (B, H, 1, hd)
        gamma = torch.exp(self.log_decay).to(q.dtype)[:, None, None]
        S = gamma * state["S"] + (k * self.scale).transpose(-2, -1) @ v
        return self.finish(x_t[:, None], q @ S)[:, 0], {"S": S, "length": n + 1, **conv}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk={self.chunk}"
