"""Gated linear attention (Yang, Wang, Shen, Panda & Kim 2023, arXiv:2312.06635).

Linear attention whose state forgets through a data-dependent gate per key dimension:

    alpha_t = sigmoid(x_t W_a1 W_a2 + b_a) ^ (1 / tau)              (B, H, d_k), low-rank W_a, tau = 16
    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,    o_t = q_t S_t         (per head; S is d_k x d_v)
    out = W_o (swish(x W_g) * RMSNorm_head(o))

With b_t = sum_{s <= t} log alpha_s (per key dimension), the output is
o_t = sum_{s <= t} (q_t * exp(b_t - b_s)) . k_s v_s, every exponent <= 0.

Backends of ``attend``:
  reference  the recurrence above, one position per Python iteration;
  torch      chunkwise: inside a chunk of ``chunk`` positions the pairwise decays exp(b_i - b_j)
             (exactly 0 above the diagonal; (c, c, d_k) per chunk, never overflowing), across
             chunks the state S carried with the chunk's total decay. O(T chunk d_k) time;
  fla        flash-linear-attention's ``chunk_gla`` (Triton, CUDA; extra ``gpu``).
Keys are scaled by 1/sqrt(d_k). Decoding: the recurrence; a state of n_heads x d_k x d_v.
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


class GatedLinearAttention(MatrixStateAttention):
    AUTO_ORDER = ("fla", "torch")
    IN_ATTENTION = ()  # no scores to bias; the gates carry position

    def __init__(self, d_model: int, *, causal: bool = True, chunk: int = 8, gate_rank: int = 16,
                 gate_temperature: float = 16.0, **attention):
        if not causal:
            raise ZooConfigError("gla is causal only: its gates decay the past. Use causal=True.")
        super().__init__(d_model, causal=True, **attention)
        at_least("gla", 1, chunk=chunk, gate_rank=gate_rank)
        if gate_temperature <= 0:
            raise ZooConfigError(f"gla needs gate_temperature > 0, got {gate_temperature}")
        self.chunk, self.gate_temperature = chunk, gate_temperature
        width = self.n_heads * self.head_dim
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, width, bias=True)
        self.output_gate = nn.Linear(d_model, width, bias=False)
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-5, elementwise_affine=False)  # eps as fla's GLA

    def log_gates(self, x: torch.Tensor) -> torch.Tensor:
        """log alpha (B, H, T, d_k) <= 0 from x (B, T, d)."""
        B, T, _ = x.shape
        g = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.gate_temperature
        return g.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        q, k, v = self.project(x)
        if x.shape[0] == 0 or x.shape[1] == 0:
            return self.finish(x, v)
        return self.finish(x, self.attend(q, k * self.scale, v, self.log_gates(x)))

    def attend(self, q, k, v, log_alpha):
        return self.implementation("attend", q.device)(q, k, v, log_alpha)

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """RMSNorm per head of o (B, H, T, d_v), the swish gate from x (B, T, d), the output projection."""
        B, H, T, hd = o.shape
        o = self.norm(o).transpose(1, 2).reshape(B, T, H * hd)
        return self.out(F.silu(self.output_gate(x)) * o)

    @implements("reference", op="attend")
    def attend_reference(self, q, k, v, log_alpha):
        B, H, T, hd = q.shape
        S, ys = q.new_zeros(B, H, hd, v.shape[-1]), []
        for t in range(T):
            S = torch.exp(log_alpha[:, :, t, :, None]) * S + k[:, :, t, :, None] @ v[:, :, t, None, :]
            ys.append((q[:, :, t, None, :] @ S)[:, :, 0])
        return torch.stack(ys, 2)

    @implements("torch", op="attend")
    def attend_torch(self, q, k, v, log_alpha):
        B, H, T, dk = q.shape
        dv = v.shape[-1]
        c = min(self.chunk, T)
        n = math.ceil(T / c)
        pad = n * c - T  # padding comes last (gate 1, key 0): causality hides it from real positions
        q, k, v, log_alpha = (F.pad(t, (0, 0, 0, pad)).view(B, H, n, c, -1) for t in (q, k, v, log_alpha))
        b = log_alpha.cumsum(3)  # (B, H, n, c, dk): decay from the chunk's start through position i
        # inside a chunk: A_ij = sum_d q_id k_jd exp(b_id - b_jd) for j <= i, exactly 0 above
        lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        diff = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~lower[..., None], 0.0)
        decay = torch.exp(diff).masked_fill(~lower[..., None], 0.0)  # (B, H, n, c, c, dk)
        A = torch.einsum("bhnid,bhnjd,bhnijd->bhnij", q, k, decay)
        inner = A @ v  # (B, H, n, c, dv)
        # across chunks: S_(j+1) = exp(b_last) S_j + sum_i (k_i * exp(b_last - b_i))^T v_i
        last = b[..., -1:, :]  # (B, H, n, 1, dk)
        added = (k * torch.exp(last - b)).transpose(-2, -1) @ v  # (B, H, n, dk, dv)
        whole = torch.exp(last[..., 0, :])[..., None]  # (B, H, n, dk, 1)
        cross = (q * torch.exp(b)) @ self.carry(added, whole)  # (B, H, n, c, dv)
        return (inner + cross).view(B, H, n * c, dv)[:, :, :T]

    def flops(self, batch: int, length: int) -> int:
        """The attention projections, the output gate and the low-rank forget gate, and the
        chunkwise products per head (the length padded to whole chunks): the gated scores (the
        triple product over the key dimension), their product with V, each chunk's K^T V, and Q
        times the carried state."""
        width = self.n_heads * self.head_dim
        rank = self.gate_down.out_features
        proj = 2 * batch * length * (self.d_model * width * 5 + self.d_model * rank + rank * width)
        return proj + self.chunkwise_flops(batch, length) + self.conv_flops(batch, length)

    @implements("fla", op="attend", package="fla", extra="gpu", devices=("cuda",))
    def attend_fla(self, q, k, v, log_alpha):
        return fla.call(fla.kernel("gla", "chunk_gla"), q, k, v, log_alpha).to(q.dtype)

    # -- decoding: the recurrence (init_state: MatrixStateAttention's) ---------------------------
    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x_t (B, d) -> (B, d); a new state (the one given is not changed)."""
        n = state["length"]
        x = x_t[:, None]
        q, k, v, conv = self.project_step(x_t, state, start=n)  # (B, H, 1, hd)
        alpha = torch.exp(self.log_gates(x))[:, :, 0, :, None]  # (B, H, dk, 1)
        S = alpha * state["S"] + (k * self.scale).transpose(-2, -1) @ v
        return self.finish(x, q @ S)[:, 0], {"S": S, "length": n + 1, **conv}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk={self.chunk}, gate_temperature={self.gate_temperature}"
