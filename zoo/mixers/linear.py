"""Kernelized linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),   S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)

with the sums over all j (bidirectional) or j <= i (causal); phi(x) = elu(x) + 1 by default.

Backends:
  reference  the quadratic masked form: A = phi(Q) phi(K)^T (lower-triangular when causal),
             y = A V / (A 1 + eps);
  torch      bidirectional: phi(Q) (phi(K)^T V), linear in T. Causal: chunk-wise parallel, a
             masked quadratic inside each chunk of ``chunk`` positions plus the running
             summary (S, z) of all earlier chunks, so time is O(T (chunk + d) d) with no Python
             loop over positions (``CausalChunked``, forward and backward by hand).
Decode: the recurrent form, state (S, z) of size H * d * (d + 1), independent of length.

``short_conv`` k > 0 (the registry's ``linear_conv``: k = 4) runs a causal depthwise
convolution of k taps and a SiLU over the q, k and v projections before the feature map, as
Based (Arora et al. 2024) does (``zoo.nn.attention.ShortConvAttention``): without it, linear
attention sits at mqar's floor (bench/experiments/short_conv). Decoding then also keeps the
last k - 1 projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from zoo.contract import implements
from zoo.errors import at_least, unknown
from zoo.nn.attention import ShortConvAttention

FEATURE_MAPS = {
    "elu": lambda x: F.elu(x).add_(1.0),  # in place: elu saves its input, not its output
    "relu": F.relu,
    "softplus": F.softplus,
}


class CausalChunked(torch.autograd.Function):
    """The causal chunk-wise form with a hand-written backward. Per chunk of ``c`` positions,
    with V1 = [V | 1] (the ones column carries the normaliser through the same matmuls):

        out = tril(Q K^T) V1 + Q S,   S = sum over earlier chunks of K^T V1,   y = out_v / (out_1 + eps)

    Written by hand, not left to autograd, because autograd's version did work besides the
    matmuls that this one avoids: zero-filled gradient buffers for the two slices of ``out``,
    separate additions where one ``baddbmm`` accumulates, a flip-cumsum-flip for the prefix
    sum's backward, and the gradient of the ones column (docs/efficient-attention.md has the
    timings). Saves q, k, v1, S, the masked chunk scores, y and the normaliser (the chunk
    scores cost T * c numbers, as q does at c = d)."""

    @staticmethod
    def forward(ctx, q, k, v, c: int, eps: float):
        B, H, T, d = q.shape  # T a multiple of c; q and k after the feature map
        n, N = T // c, B * H * (T // c)
        v1 = torch.cat((v, v.new_ones(v.shape[:-1] + (1,))), -1)
        qc, kc, vc = q.reshape(N, c, d), k.reshape(N, c, d), v1.view(N, c, -1)
        kv = torch.bmm(kc.transpose(1, 2), vc).view(B * H, n, d, -1)  # each chunk's summary
        # Exclusive prefix sum: the earlier chunks only. Summed without the current chunk, never
        # as (inclusive sum - current chunk), which would let later positions leak in by rounding.
        S = torch.zeros_like(kv)
        torch.cumsum(kv[:, :-1], 1, out=S[:, 1:])
        S = S.view(N, d, -1)
        A = torch.bmm(qc, kc.transpose(1, 2)).tril_()  # causal inside the chunk
        out = torch.baddbmm(torch.bmm(qc, S), A, vc)
        den = out[..., -1:].add_(eps)
        y = out[..., :-1].div_(den)
        ctx.save_for_backward(qc, kc, vc, S, A, y, den)
        ctx.dims = (B, H, n)
        return y.view(B, H, T, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        qc, kc, vc, S, A, y, den = ctx.saved_tensors
        B, H, n = ctx.dims
        N, c, d = qc.shape
        gnum = gy.reshape(N, c, -1) / den
        gout = torch.cat((gnum, -(gnum * y).sum(-1, keepdim=True)), -1)  # d loss / d out
        gA = torch.bmm(gout, vc.transpose(1, 2)).tril_()
        gS = torch.bmm(qc.transpose(1, 2), gout).view(B * H, n, d, -1)
        gkv = torch.zeros_like(gS)  # reverse exclusive prefix sum: the later chunks only
        gkv[:, :-1] = gS[:, 1:].flip(1).cumsum(1).flip(1)
        gkv = gkv.view(N, d, -1)
        gq = torch.baddbmm(torch.bmm(gout, S.transpose(1, 2)), gA, kc)
        gk = torch.baddbmm(torch.bmm(vc, gkv.transpose(1, 2)), gA.transpose(1, 2), qc)
        gv = torch.baddbmm(torch.bmm(kc, gkv[..., :-1]), A.transpose(1, 2), gnum)
        shape = (B, H, n * c, -1)
        return gq.view(shape), gk.view(shape), gv.view(shape), None, None


class LinearAttention(ShortConvAttention):
    AUTO_ORDER = ("torch",)
    IN_ATTENTION = ()  # no scores to bias (alibi); rope would break the feature map's positivity

    def __init__(self, d_model: int, *, causal: bool, feature_map: str = "elu", chunk: int = 64,
                 eps: float = 1e-6, **attention):
        super().__init__(d_model, causal=causal, **attention)
        at_least("linear attention", 1, chunk=chunk)
        if feature_map not in FEATURE_MAPS:
            raise unknown("feature_map of linear attention", feature_map, FEATURE_MAPS)
        self.feature_map, self.phi = feature_map, FEATURE_MAPS[feature_map]
        self.chunk, self.eps = chunk, eps

    def flops(self, batch: int, length: int) -> int | None:
        return super().flops(batch, length) + self.conv_flops(batch, length)

    @implements("reference", op="attend")
    def attend_reference(self, q, k, v):
        q, k = self.phi(q), self.phi(k)
        A = q @ k.transpose(-2, -1)  # (B, H, T, T)
        if self.causal:
            A = A.tril()
        return (A @ v) / (A.sum(-1, keepdim=True) + self.eps)

    @implements("torch", op="attend")
    def attend_torch(self, q, k, v):
        q, k = self.phi(q), self.phi(k)
        if not self.causal:
            S = k.transpose(-2, -1) @ v  # (B, H, d, dv)
            z = k.sum(-2)  # (B, H, d)
            return (q @ S) / ((q @ z[..., None]) + self.eps)
        return self._causal_chunked(q, k, v)

    def _causal_chunked(self, q, k, v):
        T = q.shape[2]
        c = min(self.chunk, T)
        pad = -T % c
        if pad:  # padded positions come last, so causality hides them from real ones
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        return CausalChunked.apply(q, k, v, c, self.eps)[:, :, :T]

    # -- decoding: the recurrent form ----------------------------------------------------
    def attend_flops(self, batch: int, length: int) -> int:
        """Bidirectional: K^T V, Q S and the normaliser Q z. Causal (chunks of c, the length
        padded to whole chunks): each chunk's K^T [V|1] and Q S over the padded length, and the
        masked chunk scores Q K^T and their product with [V|1]."""
        BH, d = batch * self.n_heads, self.head_dim
        if not self.causal:
            return BH * (2 * length * d * d * 2 + 2 * length * d)
        if length == 0:
            return 0
        c = min(self.chunk, length)
        n = math.ceil(length / c)
        return BH * (2 * 2 * n * c * d * (d + 1) + 2 * n * c * c * d + 2 * n * c * c * (d + 1))

    def init_state(self, batch, device=None, dtype=None) -> dict:
        w = self.qkv.weight
        kw = {"device": device or w.device, "dtype": dtype or w.dtype}
        H, d = self.n_heads, self.head_dim
        return {"S": torch.zeros(batch, H, d, d, **kw), "z": torch.zeros(batch, H, d, **kw),
                **self.conv_state(batch, device, dtype)}

    def step(self, x_t, state):
        q, k, v, new = self.project_step(x_t, state)  # (B, H, 1, d)
        q, k = self.phi(q), self.phi(k)
        S = state["S"] + k.transpose(-2, -1) @ v  # (B, H, d, dv)
        z = state["z"] + k[:, :, 0]
        y = (q @ S) / ((q @ z[..., None]) + self.eps)
        return self.merge(y)[:, 0], {"S": S, "z": z, **new}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_map={self.feature_map!r}, chunk={self.chunk}"
