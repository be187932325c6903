"""Kernelized linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),   S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)

with the sums over all j (bidirectional) or j <= i (causal); phi(x) = elu(x) + 1 by default.

Backends:
  reference  the quadratic masked form: A = phi(Q) phi(K)^T (lower-triangular when causal),
             y = A V / (A 1 + eps);
  torch      bidirectional: phi(Q) (phi(K)^T V), linear in T. Causal: chunk-wise parallel, a
             masked quadratic inside each chunk of ``chunk`` positions plus the running
             summary (S, z) of all earlier chunks, so time is O(T (chunk + d) d) with no Python
             loop over positions.
Decode: the recurrent form, state (S, z) of size H * d * (d + 1), independent of length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.contract import REFERENCE, TORCH
from zoo.errors import unknown
from zoo.nn.attention import AttentionMixer

FEATURE_MAPS = {
    "elu": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "softplus": F.softplus,
}


class ExclusiveCumsum(torch.autograd.Function):
    """Exclusive prefix sum along dim 2. Its backward, a reverse exclusive prefix sum, is
    written as total - cumsum: autograd's own cumsum backward flips the tensor twice, which
    cost 30% of the causal forward+backward on the CPU."""

    @staticmethod
    def forward(ctx, x):
        return x.cumsum(2) - x

    @staticmethod
    def backward(ctx, g):
        return g.sum(2, keepdim=True) - g.cumsum(2)


class LinearAttention(AttentionMixer):
    BACKENDS = {"reference": REFERENCE, "torch": TORCH}
    AUTO_ORDER = ("torch",)
    POSITIONS = ("none", "sinusoidal", "learned")

    def __init__(self, d_model: int, *, causal: bool, feature_map: str = "elu", chunk: int = 64,
                 eps: float = 1e-6, **attention):
        super().__init__(d_model, causal=causal, **attention)
        if feature_map not in FEATURE_MAPS:
            raise unknown("feature_map of linear attention", feature_map, FEATURE_MAPS)
        self.feature_map, self.phi = feature_map, FEATURE_MAPS[feature_map]
        self.chunk, self.eps = chunk, eps

    def attend(self, q, k, v):
        q, k = self.phi(q), self.phi(k)
        if self.backend_for(q.device) == "reference":
            A = q @ k.transpose(-2, -1)  # (B, H, T, T)
            if self.causal:
                A = A.tril()
            return (A @ v) / (A.sum(-1, keepdim=True) + self.eps)
        if not self.causal:
            S = k.transpose(-2, -1) @ v  # (B, H, d, dv)
            z = k.sum(-2)  # (B, H, d)
            return (q @ S) / ((q @ z[..., None]) + self.eps)
        return self._causal_chunked(q, k, v)

    def _causal_chunked(self, q, k, v):
        B, H, T, d = q.shape
        c = min(self.chunk, T)
        n = math.ceil(T / c)
        # A column of ones on v carries the normalizer through the same matmuls as the values.
        v1 = torch.cat((v, torch.ones_like(v[..., :1])), -1)  # (B, H, T, dv + 1)
        if n * c != T:  # padded positions come last, so causality hides them from real ones
            q, k, v1 = (F.pad(t, (0, 0, 0, n * c - T)) for t in (q, k, v1))
        qc, kc, vc = q.view(B, H, n, c, d), k.view(B, H, n, c, d), v1.view(B, H, n, c, -1)
        kv = kc.transpose(-2, -1) @ vc  # (B, H, n, d, dv + 1): each chunk's summary (S | z)
        S = ExclusiveCumsum.apply(kv)  # the summaries of all earlier chunks
        A = (qc @ kc.transpose(-2, -1)).tril()  # (B, H, n, c, c), causal inside the chunk
        out = A @ vc + qc @ S  # (B, H, n, c, dv + 1)
        y = out[..., :-1] / (out[..., -1:] + self.eps)
        return y.reshape(B, H, n * c, -1)[:, :, :T]

    # -- decoding: the recurrent form ----------------------------------------------------
    def init_state(self, batch, device=None, dtype=None) -> dict:
        w = self.qkv.weight
        kw = {"device": device or w.device, "dtype": dtype or w.dtype}
        H, d = self.n_heads, self.head_dim
        return {"S": torch.zeros(batch, H, d, d, **kw), "z": torch.zeros(batch, H, d, **kw)}

    def step(self, x_t, state):
        q, k, v = self.project(x_t[:, None])  # (B, H, 1, d)
        q, k = self.phi(q), self.phi(k)
        S = state["S"] + k.transpose(-2, -1) @ v  # (B, H, d, dv)
        z = state["z"] + k[:, :, 0]
        y = (q @ S) / ((q @ z[..., None]) + self.eps)
        return self.merge(y)[:, 0], {"S": S, "z": z}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_map={self.feature_map!r}, chunk={self.chunk}"
