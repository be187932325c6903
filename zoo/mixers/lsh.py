"""LSH attention of the Reformer (Kitaev et al. 2020).

Queries and keys share one projection (keys are the unit-normalised queries). Each of
``n_hashes`` rounds hashes every position with a random rotation R (angular LSH: bucket =
argmax([xR, -xR])), sorts positions by (bucket, position), cuts the sorted order into chunks of
``bucket_size``, and lets each chunk attend to itself and the chunk before it (the first chunk
wraps to the last). A position does not attend to itself unless nothing else is available (its
own score is set to -5e4, as in the reference implementation); causal masking uses the original
positions. Causal mode is causal in the mask only, as published: which earlier keys share a
query's chunk depends on how many later positions sort before it, so outputs depend on later
inputs' values (``causal_leak``; ``strictly_causal: false`` in the registry). The rounds are
combined with weights softmax(log-sum-exp of each round's scores), i.e. one softmax over the
union of the rounds' keys (a key found by several rounds counts once per round, as in
reformer-pytorch's default).

Hashing is seedable: the rotations come from a generator seeded with ``seed`` and depend only
on (seed, n_buckets, head_dim, n_hashes), so the same module hashes the same way every call.
``n_buckets=0`` picks T // bucket_size rounded up to an even number (at least 2); ``n_buckets=1``
puts every position in one bucket.

Backends: ``reference`` builds the dense T x T mask of the same bucket assignment per round;
``torch`` gathers the sorted chunks and attends within them: O(T * bucket_size) scores per round.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import implements
from zoo.errors import ZooConfigError
from zoo.nn.attention import AttentionMixer

SELF_SCORE = -5e4  # a position's score for itself: used only when nothing else is visible


class LSHAttention(AttentionMixer):
    AUTO_ORDER = ("torch",)
    IN_ATTENTION = ()  # shared QK is hashed before any score exists: no rope, no alibi

    def __init__(self, d_model: int, *, causal: bool, bucket_size: int = 64, n_hashes: int = 4,
                 n_buckets: int = 0, seed: int = 0, **attention):
        super().__init__(d_model, causal=causal, **attention)
        if bucket_size < 1 or n_hashes < 1 or n_buckets < 0 or (n_buckets > 1 and n_buckets % 2):
            raise ZooConfigError(
                "lsh needs bucket_size >= 1, n_hashes >= 1 and n_buckets 0 (auto), 1 or even; got "
                f"bucket_size={bucket_size}, n_hashes={n_hashes}, n_buckets={n_buckets}"
            )
        self.bucket_size, self.n_hashes, self.n_buckets, self.seed = bucket_size, n_hashes, n_buckets, seed
        # Shared query/key projection: qkv produces (qk, v) only.
        self.qkv = nn.Linear(d_model, 2 * self.n_heads * self.head_dim, bias=self.qkv.bias is not None)
        self._rotations: dict[tuple, torch.Tensor] = {}

    @property
    def causal_leak(self) -> str | None:
        if not self.causal:
            return None
        return ("LSH sorts every position by bucket and cuts the sorted order into chunks, so later "
                "tokens move the chunk boundaries and decide which earlier keys a position sees (the "
                "causal mask hides later keys, not their effect on the chunks)")

    def project(self, x, start=0):
        B, T, _ = x.shape
        qk, v = self.qkv(x).view(B, T, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qk, F.normalize(qk, dim=-1), v  # q, k = unit-norm q, v: (B, H, T, hd)

    def full_at(self, length: int) -> bool:
        """True when at ``length`` one chunk holds the whole sequence, or there is one bucket:
        every position sees every other, as in full attention (itself only when alone)."""
        return self.bucket_size >= length or self.n_buckets == 1

    # -- hashing -------------------------------------------------------------------------
    def buckets_for(self, T: int) -> int:
        if self.n_buckets:
            return self.n_buckets
        return max(2, 2 * math.ceil(T / self.bucket_size / 2))

    def hash(self, x: torch.Tensor, n_buckets: int) -> torch.Tensor:
        """(B, H, T, hd) -> bucket ids (B, H, n_hashes, T)."""
        B, H, T, hd = x.shape
        if n_buckets == 1:
            return torch.zeros(B, H, self.n_hashes, T, dtype=torch.long, device=x.device)
        key = (n_buckets, x.device, x.dtype)
        if key not in self._rotations:
            g = torch.Generator().manual_seed(self.seed)
            R = torch.randn(hd, self.n_hashes, n_buckets // 2, generator=g, dtype=torch.float64)
            self._rotations[key] = R.to(device=x.device, dtype=x.dtype)
        rot = torch.einsum("bhtd,dri->bhrti", x.detach(), self._rotations[key])
        return torch.cat((rot, -rot), -1).argmax(-1)

    def sort_order(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, T, hd) -> (B, H, r, T): positions sorted by (bucket, position), per hash round."""
        T = q.shape[2]
        buckets = self.hash(q, self.buckets_for(T))  # (B, H, r, T)
        return (buckets * T + torch.arange(T, device=q.device)).argsort(-1)

    def _combine(self, o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """Rounds (B, H, r, T, hd) weighted by softmax over rounds of their log-sum-exp."""
        return (o * lse.softmax(2)[..., None]).sum(2)

    @implements("reference", op="attend")
    def attend_reference(self, q, k, v):
        """Dense: the T x T scores, masked to each position's own chunk and the one before."""
        order = self.sort_order(q)
        B, H, T, hd = q.shape
        c = min(self.bucket_size, T)  # a chunk never exceeds the sequence (one chunk either way)
        n_chunks = math.ceil(T / c)
        chunk = order.argsort(-1) // c  # (B, H, r, T): the chunk of each original position
        ci, cj = chunk[..., :, None], chunk[..., None, :]
        allowed = (ci == cj) | ((ci - 1) % n_chunks == cj)  # own chunk or the one before
        scores = (q @ k.transpose(-2, -1))[:, :, None] * self.scale  # (B, H, 1, T, T)
        pos = torch.arange(T, device=q.device)
        scores = scores.masked_fill(pos[:, None] == pos[None, :], SELF_SCORE)
        if self.causal:
            scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        scores = scores.masked_fill(~allowed, float("-inf"))  # (B, H, r, T, T)
        lse = scores.logsumexp(-1)
        o = (scores - lse[..., None]).exp() @ v[:, :, None]  # (B, H, r, T, hd)
        return self._combine(o, lse)

    @implements("torch", op="attend")
    def attend_torch(self, q, k, v):
        """Chunked, as Reformer: gather the sorted positions, attend within chunk pairs."""
        order = self.sort_order(q)
        B, H, T, hd = q.shape
        r, c = self.n_hashes, min(self.bucket_size, T)
        n = math.ceil(T / c)
        Tp = n * c
        if Tp != T:  # padding positions sort last; they are masked as keys and dropped as queries
            order = torch.cat((order, torch.arange(T, Tp, device=q.device).expand(B, H, r, -1)), -1)
            q, k, v = (F.pad(t, (0, 0, 0, Tp - T)) for t in (q, k, v))
        spos = order.view(B, H, r, n, c)
        # Each chunk attends to itself and the previous one (chunk 0 to the last): one gather
        # of the 2c key positions per chunk, through flat row indices into (B*H*Tp, hd).
        kpos = torch.cat((spos, spos.roll(1, dims=3)), 4)  # (B, H, r, n, 2c)
        base = (torch.arange(B * H, device=q.device) * Tp).view(B, H, 1, 1, 1)
        sq = (q * self.scale).reshape(-1, hd).index_select(0, (spos + base).flatten())
        kk = k.reshape(-1, hd).index_select(0, (kpos + base).flatten())
        vv = v.reshape(-1, hd).index_select(0, (kpos + base).flatten())
        shape = (B * H * r * n, c, hd)
        qp, kp = spos.reshape(-1, c, 1), kpos.reshape(-1, 1, 2 * c)
        # hidden: padding keys (>= T), and when causal later keys; one comparison either way
        # (a padded query, qp >= T, still sees every real key: its row is dropped)
        masked = kp > qp.clamp(max=T - 1) if self.causal else kp >= T  # (N, c, 2c) or (N, 1, 2c)
        # a query's own key sits on the diagonal of its own chunk's block (and of the "previous"
        # block too when that is the same chunk, n == 1)
        o, lse = _ChunkAttention.apply(sq.view(shape), kk.view(-1, 2 * c, hd), vv.view(-1, 2 * c, hd),
                                       masked, (0, c) if n == 1 else (0,))
        # Undo the sort: position order[i] of round r holds sorted row i.
        undo = order.argsort(-1)
        o = o.view(B, H, r, Tp, hd).gather(3, undo[..., None].expand(-1, -1, -1, -1, hd))
        lse = lse.view(B, H, r, Tp).gather(3, undo)
        return self._combine(o, lse)[:, :, :T]

    def flops(self, batch: int, length: int) -> int:
        """The shared q/k projection, v and out; the hashing rotations (each round's n_buckets / 2
        random directions); and per round the chunked attention, each chunk of c against its 2c
        keys (scores and their product with V), the length padded to whole chunks."""
        width, r = self.n_heads * self.head_dim, self.n_hashes
        proj = 2 * batch * length * self.d_model * width * 3
        if length == 0:
            return proj
        nb, c = self.buckets_for(length), min(self.bucket_size, length)
        hashing = 2 * batch * self.n_heads * length * self.head_dim * r * (nb // 2) if nb > 1 else 0
        return proj + hashing + 8 * batch * self.n_heads * r * math.ceil(length / c) * c * c * self.head_dim

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, "
                f"n_buckets={self.n_buckets or 'auto'}, seed={self.seed}")


class _ChunkAttention(torch.autograd.Function):
    """softmax attention of chunks that also returns the log-sum-exp, with a fused backward.

    q (N, c, d), k and v (N, 2c, d); ``masked`` broadcasts to (N, c, 2c); ``self_cols``: the
    column offsets of the c x c blocks whose diagonal holds each query's own key. Scores that
    are masked get -inf, a position's own score gets SELF_SCORE (written on those diagonals,
    not through a second full mask). Returns
    o (N, c, d) and lse (N, c). The gradient flows through both (the rounds are weighted by
    their lse), and the backward works on the saved probabilities in place: on the CPU this
    runs at about half the time of the same computation left to autograd.
    """

    @staticmethod
    def forward(ctx, q, k, v, masked, self_cols):
        s = torch.bmm(q, k.transpose(1, 2))  # (N, c, 2c)
        s.masked_fill_(masked, float("-inf"))
        c = s.shape[1]
        for off in self_cols:
            s[:, :, off : off + c].diagonal(dim1=1, dim2=2).fill_(SELF_SCORE)
        # softmax is one fused pass; its lse follows from the row maximum: p_max = exp(s_max - lse)
        s_max = s.amax(-1, keepdim=True)
        p = torch.softmax(s, -1)
        lse = s_max - p.amax(-1, keepdim=True).log()
        o = torch.bmm(p, v)
        ctx.save_for_backward(q, k, v, p, o)
        return o, lse.squeeze(-1)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, p, o = ctx.saved_tensors
        dp = torch.bmm(do, v.transpose(1, 2))  # (N, c, 2c)
        delta = (do * o).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse[..., None]
        ds = dp.sub_(delta).mul_(p)  # p * (dp - delta + dlse)
        dq = torch.bmm(ds, k)
        dk = torch.bmm(ds.transpose(1, 2), q)
        dv = torch.bmm(p.transpose(1, 2), do)
        return dq, dk, dv, None, None
