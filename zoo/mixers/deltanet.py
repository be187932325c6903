"""DeltaNet: linear attention trained by the delta rule (Yang, Wang, Zhang, Shen & Kim 2024,
arXiv:2406.06484), and Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, arXiv:2412.06464) with
``gated: true``.

Per head, with unit-norm keys and queries (SiLU, then L2 normalisation) and a write strength
beta_t = sigmoid(x_t W_beta) in (0, 1):

    S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = q_t S_t / sqrt(d_k)
    alpha_t = 1 (DeltaNet), or exp(-exp(A_log) softplus(x_t W_alpha + dt_bias)) (gated, as Mamba-2)
    out = W_o (swish(x W_g) * RMSNorm_head(o))

The state moves its value for key k_t toward v_t by beta_t, instead of only adding (linear
attention): recall with a bounded state. (Both papers add short convolutions before q, k, v;
the zoo leaves them out, so the mixer is the rule alone.)

Backends of ``attend``:
  reference  the recurrence above, one position per Python iteration;
  torch      chunkwise, the WY form: inside a chunk of c positions with K, V, beta and the
             cumulative log-decay b, T = (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta),
             W = T K; outputs O = A_i (Q S_0 - (Q K^T)_<= T K S_0) + (((Q K^T)_<= T) * G) V and the
             next state S_c = A_c (S_0 - K^T W S_0) + K^T (T (exp(b_c - b) * V)), with
             G_il = exp(b_i - b_l) (l <= i) and A_i = exp(b_i): every exponent <= 0;
  fla        flash-linear-attention's ``chunk_delta_rule`` / ``chunk_gated_delta_rule`` (Triton,
             CUDA; extra ``gpu``).
Decoding: the recurrence; a state of n_heads x d_k x d_v.
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


class DeltaNet(MatrixStateAttention):
    AUTO_ORDER = ("fla", "torch")
    IN_ATTENTION = ()  # keys are unit vectors that address the state; no scores to bias

    def __init__(self, d_model: int, *, causal: bool = True, gated: bool = False, chunk: int = 32, **attention):
        if not causal:
            raise ZooConfigError("deltanet is causal only: the delta rule updates its state in order. "
                                 "Use causal=True.")
        super().__init__(d_model, causal=True, **attention)
        at_least("deltanet", 1, chunk=chunk)
        self.gated, self.chunk = gated, chunk
        H, width = self.n_heads, self.n_heads * self.head_dim
        self.beta_proj = nn.Linear(d_model, H, bias=False)
        self.output_gate = nn.Linear(d_model, width, bias=False)
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-5, elementwise_affine=False)
        if gated:  # Mamba-2's decay: A in [1, 16], dt log-uniform in [1e-3, 0.1] through softplus
            self.alpha_proj = nn.Linear(d_model, H, bias=False)
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
            dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """beta (B, H, T) in (0, 1) and log alpha (B, H, T) <= 0 (zeros when not gated)."""
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)
        if not self.gated:
            return beta, torch.zeros_like(beta)
        g = -torch.exp(self.A_log) * F.softplus(self.alpha_proj(x) + self.dt_bias)
        return beta, g.transpose(1, 2)

    def split(self, h: torch.Tensor, start: int = 0):
        """Unit-norm keys and queries after a SiLU (the short convolution's, where there is one)."""
        q, k, v = super().split(h, start)
        if not self.short_conv:
            q, k = F.silu(q), F.silu(k)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        q, k, v = self.project(x)
        if x.shape[0] == 0 or x.shape[1] == 0:
            return self.finish(x, v)
        beta, log_alpha = self.coefficients(x)
        return self.finish(x, self.attend(q * self.scale, k, v, beta, log_alpha))

    def attend(self, q, k, v, beta, log_alpha):
        return self.implementation("attend", q.device)(q, k, v, beta, log_alpha)

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        B, H, T, hd = o.shape
        o = self.norm(o).transpose(1, 2).reshape(B, T, H * hd)
        return self.out(F.silu(self.output_gate(x)) * o)

    @implements("reference", op="attend")
    def attend_reference(self, q, k, v, beta, log_alpha):
        B, H, T, dk = q.shape
        S, ys = q.new_zeros(B, H, dk, v.shape[-1]), []
        for t in range(T):
            S = self.update(S, k[:, :, t], v[:, :, t], beta[:, :, t], log_alpha[:, :, t])
            ys.append((q[:, :, t, None, :] @ S)[:, :, 0])
        return torch.stack(ys, 2)

    @staticmethod
    def update(S, k, v, beta, log_alpha):
        """One step of the rule: S (B, H, dk, dv), k (B, H, dk), v (B, H, dv), beta and log_alpha (B, H)."""
        S = torch.exp(log_alpha)[..., None, None] * S
        error = v - (k[..., None, :] @ S)[..., 0, :]  # what the state returns for k, against v
        return S + beta[..., None, None] * k[..., :, None] * error[..., None, :]

    @implements("torch", op="attend")
    def attend_torch(self, q, k, v, beta, log_alpha):
        B, H, T, dk = q.shape
        dv = v.shape[-1]
        c = min(self.chunk, T)
        n = math.ceil(T / c)
        pad = n * c - T  # padding comes last (beta 0, decay 1): causality hides it
        q, k, v = (F.pad(t, (0, 0, 0, pad)).view(B, H, n, c, -1) for t in (q, k, v))
        beta, log_alpha = (F.pad(t, (0, pad)).view(B, H, n, c) for t in (beta, log_alpha))
        b = log_alpha.cumsum(-1)  # (B, H, n, c): log decay from the chunk's start through i
        eye = torch.eye(c, dtype=q.dtype, device=q.device)
        strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
        lower = strict | eye.bool()
        kk = (k @ k.transpose(-2, -1)) * beta[..., :, None]  # (B, H, n, c, c): beta_i k_i . k_j
        L = eye + kk.masked_fill(~strict, 0.0)  # unit lower-triangular
        Tm = torch.linalg.solve_triangular(L, torch.diag_embed(beta), upper=False, unitriangular=True)
        W = Tm @ k  # (B, H, n, c, dk)
        QK = (q @ k.transpose(-2, -1)).masked_fill(~lower, 0.0)
        P = QK @ Tm  # (B, H, n, c, c), lower-triangular
        gap = (b[..., :, None] - b[..., None, :]).masked_fill(~lower, 0.0)
        G = torch.exp(gap).masked_fill(~lower, 0.0)  # exp(b_i - b_l), l <= i
        A = torch.exp(b)[..., None]  # (B, H, n, c, 1)
        to_end = torch.exp(b[..., -1:] - b)[..., None]  # exp(b_c - b_l)
        local = (P * G) @ v  # what the chunk's own writes return
        read = A * (q - P @ k)  # (B, H, n, c, dk): how each position reads the state at the chunk start
        written = Tm @ (to_end * v)  # (B, H, n, c, dv)
        whole = torch.exp(b[..., -1])[..., None, None]  # (B, H, n, 1, 1)
        S, outs = q.new_zeros(B, H, dk, dv), []
        # per chunk through unbind (one stacked gradient each), not x[:, :, j]: indexing in the
        # loop made autograd build a zero gradient of the whole tensor per chunk (quadratic in n)
        per_chunk = (t.unbind(2) for t in (read, local, k, W, written, whole))
        for rj, lj, kj, Wj, wj, hj in zip(*per_chunk, strict=True):  # the state before chunk j: earlier chunks only
            outs.append(rj @ S + lj)
            S = hj * (S - kj.transpose(-2, -1) @ (Wj @ S)) + kj.transpose(-2, -1) @ wj
        return torch.stack(outs, 2).view(B, H, n * c, dv)[:, :, :T]

    def flops(self, batch: int, length: int) -> int:
        """The projections (q, k, v, out, the output gate, beta, and alpha when gated) and the
        WY chunkwise products per head and chunk: K K^T, W = T K, Q K^T, P = (Q K^T) T, P K,
        (P * G) V and T V; per chunk the state's read and update (4 products of c x d x d); and
        the unit-triangular solve for T (:meth:`solve_flops`)."""
        width, H = self.n_heads * self.head_dim, self.n_heads
        proj = 2 * batch * length * self.d_model * (width * 5 + H * (2 if self.gated else 1))
        if length == 0:
            return proj
        proj += self.conv_flops(batch, length)
        c, d = min(self.chunk, length), self.head_dim
        n = math.ceil(length / c)
        core = 2 * batch * H * n * (6 * c * c * d + c * c * c + 4 * c * d * d)
        return proj + core + self.solve_flops(batch, length)

    def solve_flops(self, batch: int, length: int) -> int:
        """The triangular solve's part of :meth:`flops` (FlopCounterMode does not count
        ``solve_triangular``): per chunk, c right-hand sides through a unit lower-triangular c x c
        system, c (c - 1) / 2 multiply-adds each."""
        if length == 0:
            return 0
        c = min(self.chunk, length)
        return batch * self.n_heads * math.ceil(length / c) * c * c * (c - 1)

    @implements("fla", op="attend", package="fla", extra="gpu", devices=("cuda",))
    def attend_fla(self, q, k, v, beta, log_alpha):
        if self.gated:
            fn = fla.kernel("gated_delta_rule", "chunk_gated_delta_rule")
            return fla.call(fn, q, k, v, log_alpha, beta).to(q.dtype)
        return fla.call(fla.kernel("delta_rule", "chunk_delta_rule"), q, k, v, beta).to(q.dtype)

    # -- decoding: the recurrence (init_state: MatrixStateAttention's) ---------------------------
    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x_t (B, d) -> (B, d); a new state (the one given is not changed)."""
        n, x = state["length"], x_t[:, None]
        q, k, v, conv = self.project_step(x_t, state, start=n)  # (B, H, 1, hd)
        beta, log_alpha = self.coefficients(x)
        S = self.update(state["S"], k[:, :, 0], v[:, :, 0], beta[:, :, 0], log_alpha[:, :, 0])
        return self.finish(x, (q * self.scale) @ S)[:, 0], {"S": S, "length": n + 1, **conv}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gated={self.gated}, chunk={self.chunk}"
