"""Longformer sliding-window attention with global tokens (Beltagy et al. 2020), and BigBird's
random key blocks (Zaheer et al. 2020) with ``random_blocks``.

Who attends to whom (i a query position, j a key position, r = (window - 1) * dilation + 1):
  window    causal: 0 <= i - j < r;  bidirectional: |i - j| < r;  and (i - j) % dilation == 0,
            so a query sees ``window`` keys on each allowed side, itself included;
  global    a global position attends to every position and every position attends to it
            (causal: still only j <= i). Global positions are ``global_tokens`` (a list) and
            every ``global_every``-th position. They use the same projections as the rest
            (Longformer has separate global projections; here one set serves both).
  random    (BigBird, ``random_blocks`` = r > 0) positions are cut into blocks of ``block``; the
            queries of block i also attend every key of r key blocks drawn at random for i, among
            the blocks the window does not reach (causal: only blocks that end before the
            window's first block, so never the future). The draw depends only on i and the
            module's ``pattern_seed`` (a buffer, drawn from torch's RNG at construction, so each
            layer differs and a checkpoint keeps its pattern); outputs of a prefix do not change
            when the sequence grows.

Backends:
  reference  the dense T x T mask of that rule, textbook attention;
  torch      blocked: queries in blocks of ``block``, each attending the keys of the blocks
             within reach plus the global keys, through ``scaled_dot_product_attention`` with a
             per-block mask; the global queries' rows are computed separately. Time and memory
             grow as O(T (r + block + G)); no T x T tensor exists;
  flex       ``torch.nn.attention.flex_attention`` with a block mask of the same rule (window,
             dilation, global, random blocks; ALiBi as a score modification), compiled: one fused
             block-sparse kernel. ``auto`` takes it on CUDA; on the CPU PyTorch has no backward
             for it, so there it is only called directly (the tests check its forward against the
             blocked backend) and CPU training keeps the blocked SDPA.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from zoo.contract import claim_buffers, implements
from zoo.errors import ZooConfigError
from zoo.nn.attention import AttentionMixer
from zoo.nn.positions import alibi_bias


class WindowAttention(AttentionMixer):
    AUTO_ORDER = ("flex", "torch")  # flex: CUDA only (no backward on the CPU)

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool,
        window: int = 256,
        dilation: int = 1,
        global_tokens: list[int] | tuple[int, ...] = (),
        global_every: int = 0,
        block: int = 0,
        random_blocks: int = 0,
        **attention,
    ):
        super().__init__(d_model, causal=causal, **attention)
        if window < 1 or dilation < 1 or global_every < 0 or block < 0 or random_blocks < 0:
            raise ZooConfigError(
                f"window needs window >= 1, dilation >= 1, global_every >= 0, block >= 0, random_blocks >= 0; "
                f"got window={window}, dilation={dilation}, global_every={global_every}, block={block}, "
                f"random_blocks={random_blocks}"
            )
        if random_blocks and not block:
            raise ZooConfigError("random_blocks draws key blocks of `block` positions: set block (BigBird: 64)")
        if any((not isinstance(g, int)) or g < 0 for g in global_tokens):
            raise ZooConfigError(f"global_tokens must be non-negative positions, got {list(global_tokens)}")
        self.window, self.dilation = window, dilation
        self.global_tokens, self.global_every = tuple(sorted(set(global_tokens))), global_every
        self.reach = (window - 1) * dilation + 1
        # default block: a quarter of the reach within 32..128, the fastest on the CPU at windows
        # 64..512 (bench/bench_attention.py); never longer than the reach
        self.block = block or min(self.reach, max(32, min(128, self.reach // 4)))
        self.random_blocks = random_blocks
        self._strided_masks: dict = {}  # torch backend: the last length's mask
        self._flex_masks: dict = {}  # flex backend: block masks by (length, device, pattern seed)
        if random_blocks:
            self.register_buffer("pattern_seed", torch.randint(0, 2**31 - 1, ()))
            self._patterns: dict[tuple[int, int], torch.Tensor] = {}

    def full_at(self, length: int) -> bool:
        """True when at ``length`` the window reaches every position: full attention."""
        return self.reach >= length

    # -- who attends to whom --------------------------------------------------------------
    def global_positions(self, T: int, device) -> torch.Tensor:
        g = {p for p in self.global_tokens if p < T}
        if self.global_every:
            g.update(range(0, T, self.global_every))
        return torch.tensor(sorted(g), dtype=torch.long, device=device)

    def band(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Window rule for query positions (..., Tq, 1) and key positions (..., 1, Tk)."""
        d = q_pos - k_pos
        ok = (d.abs() < self.reach) & (d % self.dilation == 0)
        return ok & (d >= 0) if self.causal else ok

    def random_pattern(self, n: int, device) -> torch.Tensor:
        """(n, random_blocks) long: the key blocks each of n query blocks draws (-1: none left to
        draw). Causal: among blocks 0 .. i - back - 1; bidirectional: among the blocks of the n
        that lie beyond the window's reach on either side. Query block i's draw depends on i and
        ``pattern_seed`` only (causal: not on n)."""
        b, r, seed = self.block, self.random_blocks, int(self.pattern_seed)
        back = math.ceil((self.reach - 1) / b)
        key = (seed, n) if not self.causal else (seed, -1)
        known = self._patterns.get(key)
        if known is None or known.shape[0] < n:
            rows = []
            for i in range(n):
                far = (torch.arange(max(0, i - back)) if self.causal else
                       torch.cat((torch.arange(max(0, i - back)), torch.arange(min(n, i + back + 1), n))))
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                pick = far[torch.randperm(far.numel(), generator=g)[:r]].sort().values
                rows.append(torch.cat((pick, torch.full((r - pick.numel(),), -1, dtype=torch.long))))
            known = torch.stack(rows) if rows else torch.empty(0, r, dtype=torch.long)
            self._patterns[key] = known
        return known[:n].to(device)

    def random_key_positions(self, n: int, device) -> torch.Tensor:
        """(n, random_blocks * block): the key positions each query block draws (-1: none)."""
        idx = self.random_pattern(n, device)
        pos = idx[..., None] * self.block + torch.arange(self.block, device=device)
        return pos.masked_fill(idx[..., None] < 0, -1).flatten(1)

    def dense_mask(self, T: int, device) -> torch.Tensor:
        """(T, T) bool, True where query i may attend key j."""
        pos = torch.arange(T, device=device)
        is_g = torch.zeros(T, dtype=torch.bool, device=device)
        is_g[self.global_positions(T, device)] = True
        ok = self.band(pos[:, None], pos[None, :]) | is_g[None, :] | is_g[:, None]
        if self.random_blocks:
            n = math.ceil(T / self.block)
            drawn = torch.zeros(n, n + 1, dtype=torch.bool, device=device)  # column n: "none"
            idx = self.random_pattern(n, device)
            drawn[torch.arange(n, device=device)[:, None], idx.masked_fill(idx < 0, n)] = True
            blk = pos // self.block
            ok = ok | drawn[blk][:, blk]
        return ok & (pos[None, :] <= pos[:, None]) if self.causal else ok

    @implements("reference", op="attend")
    def attend_reference(self, q, k, v):
        T = k.shape[-2]  # decoding goes through step(), so Tq == Tk here
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if self.uses_alibi:
            pos = torch.arange(T, device=q.device)
            scores = scores + alibi_bias(self.alibi_slopes, pos, pos).to(q.dtype)
        scores = scores.masked_fill(~self.dense_mask(T, q.device), float("-inf"))
        return scores.softmax(-1) @ v

    def attend_flops(self, batch: int, length: int) -> int:
        """The blocked backend's products (full attention's when the window covers the sequence):
        each query block against its keys (window blocks;
        without random blocks each of them prefixed with the global keys, with random blocks the
        drawn blocks and the global keys once), and the global queries against every key."""
        if length == 0:
            return 0
        if self.dilation == 1 and self.reach >= length:  # full attention (attend_torch)
            return 4 * batch * self.n_heads * length * length * self.head_dim
        b = min(self.block, length)
        back, n = math.ceil((self.reach - 1) / b), math.ceil(length / b)
        nk = back + 1 if self.causal else 2 * back + 1
        G = self.global_positions(length, "cpu").numel()
        K = nk * (b + G) if not self.random_blocks else nk * b + self.random_blocks * self.block + G
        return 4 * batch * self.n_heads * self.head_dim * (n * b * K + G * length)

    # -- the blocked backend ----------------------------------------------------------------
    @implements("torch", op="attend")
    def attend_torch(self, q, k, v):
        B, H, T, hd = q.shape
        if self.dilation == 1 and self.reach >= T:  # the window covers the sequence: full attention
            if self.uses_alibi:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=self.score_bias(T, T, q.device, q.dtype))
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        b = min(self.block, T)  # block length; a block never exceeds the sequence
        back = math.ceil((self.reach - 1) / b)  # key blocks of look-back (and look-ahead when bidirectional)
        n = math.ceil(T / b)  # query blocks
        Tp = n * b  # length padded to whole blocks
        span = (back + 1 if self.causal else 2 * back + 1) * b  # window keys per query block
        ahead = 0 if self.causal else back * b  # padding after the keys for the look-ahead
        glob = self.global_positions(T, q.device)
        G = glob.numel()

        rpos = self.random_key_positions(n, q.device) if self.random_blocks else glob[:0].expand(n, 0)
        R = rpos.shape[1]
        if not R:
            return self._attend_strided(q, k, v, n, b, back, span, glob)

        # Blocks become batch entries, (B*n, H, b, hd), so that SDPA runs its fused 4-d kernel.
        qb = F.pad(q, (0, 0, 0, Tp - T)).view(B, H, n, b, hd).transpose(1, 2).reshape(B * n, H, b, hd)
        # Keys of query block i: key blocks i - back .. i (+ back when bidirectional). Pad the keys
        # by `back` blocks in front (and behind), cut them into blocks, (B, n + nk - 1, H, b, hd),
        # and take nk shifted views of n blocks each, joined along the key axis (cheaper backward
        # than unfold).
        nk = span // b  # key blocks per query block
        padded = (0, 0, back * b, Tp - T + ahead)
        kblocks = F.pad(k, padded).view(B, H, n + nk - 1, b, hd).transpose(1, 2)
        vblocks = F.pad(v, padded).view(B, H, n + nk - 1, b, hd).transpose(1, 2)
        kw = torch.cat([kblocks[:, i : i + n] for i in range(nk)], dim=3)  # (B, n, H, span, hd)
        vw = torch.cat([vblocks[:, i : i + n] for i in range(nk)], dim=3)
        # BigBird (the only case left here): each query block's random key blocks, (B, n, H, span + R, hd)
        at = rpos.clamp(0, T - 1)  # -1 (none) and the padding past T: masked below
        kw = torch.cat((kw, k[:, :, at].permute(0, 2, 1, 3, 4)), 3)
        vw = torch.cat((vw, v[:, :, at].permute(0, 2, 1, 3, 4)), 3)
        if G:  # every query block also sees the global keys: (B, n, H, span + R + G, hd)
            kw = torch.cat((kw, k[:, None, :, glob].expand(B, n, H, G, hd)), 3)
            vw = torch.cat((vw, v[:, None, :, glob].expand(B, n, H, G, hd)), 3)
        K = span + R + G
        kw, vw = kw.reshape(B * n, H, K, hd), vw.reshape(B * n, H, K, hd)

        mask = self._block_mask(T, n, b, back, span, glob, rpos)  # (n, b, K) bool
        if self.uses_alibi:
            bias = alibi_bias(self.alibi_slopes, *self._block_positions(n, b, back, span, glob, rpos))
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf")).transpose(0, 1)  # (n, H, b, K)
        else:
            mask = mask[:, None]  # (n, 1, b, K)
        mask = mask.expand(B, *mask.shape).reshape(B * n, *mask.shape[1:])
        y = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=mask)  # (B*n, H, b, hd)
        y = y.view(B, n, H, b, hd).transpose(1, 2).reshape(B, H, Tp, hd)[:, :, :T]
        return self._global_queries(q, k, v, y, glob) if G else y

    def _attend_strided(self, q, k, v, n, b, back, span, glob):
        """Window and global keys without copying the keys per query block. The padded keys
        are cut into blocks and each block is prefixed with the G global keys (one copy of the
        keys, G / b larger); query block i's keys are then one contiguous run of ``span // b``
        such segments, so all of them are one overlapping strided view, and batch x heads is
        SDPA's batch with the n blocks as its "heads" (the mask broadcasts over both). Only the
        first segment's global columns count; the other segments' are masked."""
        B, H, T, hd = q.shape
        G, nk, Tp = glob.numel(), span // b, n * b
        ahead = 0 if self.causal else back * b
        seg = G + b
        kb = F.pad(k, (0, 0, back * b, Tp - T + ahead)).view(B, H, n + nk - 1, b, hd)
        vb = F.pad(v, (0, 0, back * b, Tp - T + ahead)).view(B, H, n + nk - 1, b, hd)
        if G:
            kb = torch.cat((k[:, :, None, glob].expand(B, H, n + nk - 1, G, hd), kb), 3)
            vb = torch.cat((v[:, :, None, glob].expand(B, H, n + nk - 1, G, hd), vb), 3)
        kw = _windows(kb.reshape(B * H, -1, hd), n, seg, nk * seg)  # (B*H, n, nk * seg, hd)
        vw = _windows(vb.reshape(B * H, -1, hd), n, seg, nk * seg)
        qb = F.pad(q, (0, 0, 0, Tp - T)).reshape(B * H, n, b, hd)
        key = (T, b, str(q.device))
        if key not in self._strided_masks:  # the rule depends only on the length
            self._strided_masks = {key: self._segment_mask(T, n, b, back, nk, glob)}
        mask, k_pos = self._strided_masks[key]  # (n, b, nk * seg) bool; (n, 1, nk * seg)
        if self.uses_alibi:
            q_pos = (torch.arange(n, device=q.device)[:, None, None] * b + torch.arange(b, device=q.device)[:, None])
            bias = alibi_bias(self.alibi_slopes, q_pos, k_pos).to(q.dtype)  # (H, n, b, nk * seg)
            mask = bias.masked_fill(~mask, float("-inf")).expand(B, *bias.shape).reshape(B * H, *bias.shape[1:])
        else:
            mask = mask[None]  # 4-d: SDPA's fused CPU kernel takes no 3-d mask (it falls back to the math path)
        y = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=mask)  # (B*H, n, b, hd)
        y = y.view(B, H, Tp, hd)[:, :, :T]
        return self._global_queries(q, k, v, y, glob) if G else y

    def _segment_mask(self, T, n, b, back, nk, glob):
        """The strided layout's mask (n, b, nk * (G + b)) and key positions (n, 1, nk * (G + b));
        -1 marks a global column that does not count."""
        dev, G = glob.device, glob.numel()
        q_pos = torch.arange(n, device=dev)[:, None, None] * b + torch.arange(b, device=dev)[:, None]  # (n, b, 1)
        win = (torch.arange(n, device=dev)[:, None, None] * b - back * b
               + torch.arange(nk, device=dev)[:, None] * b + torch.arange(b, device=dev))  # (n, nk, b)
        gcol = torch.full((n, nk, G), -1, dtype=torch.long, device=dev)
        gcol[:, 0] = glob
        k_pos = torch.cat((gcol, win), -1).view(n, 1, nk * (G + b))
        is_g = torch.zeros(T + 1, dtype=torch.bool, device=dev)
        is_g[glob] = True
        is_gcol = torch.cat((torch.ones(nk, G, dtype=torch.bool, device=dev),
                             torch.zeros(nk, b, dtype=torch.bool, device=dev)), -1).view(1, 1, -1)
        real = (k_pos >= 0) & (k_pos < T)
        ok_w = self.band(q_pos, k_pos) & real & ~is_g[k_pos.clamp(0, T)]
        ok_w = ok_w | ((q_pos >= T) & (k_pos == q_pos))  # padded queries see themselves only
        ok_g = (k_pos >= 0) & ((k_pos <= q_pos) if self.causal else True)
        return torch.where(is_gcol, ok_g, ok_w), k_pos

    def _global_queries(self, q, k, v, y, glob):
        """Overwrite the rows of the global queries: they see every key (causal: every earlier one)."""
        T = k.shape[-2]
        kpos = torch.arange(T, device=q.device)
        gmask = (kpos[None, :] <= glob[:, None]) if self.causal else None
        if self.uses_alibi:
            bias = alibi_bias(self.alibi_slopes, glob, kpos).to(q.dtype)
            gmask = bias if gmask is None else bias.masked_fill(~gmask, float("-inf"))
        yg = F.scaled_dot_product_attention(q[:, :, glob], k, v, attn_mask=gmask)
        return y.index_copy(2, glob, yg)

    def _block_positions(self, n, b, back, span, glob, rpos):
        """Absolute positions of each block's queries (n, b, 1) and keys (n, 1, span + R + G):
        window, random (-1: none) and global columns."""
        dev = glob.device
        start = torch.arange(n, device=dev)[:, None, None] * b
        q_pos = start + torch.arange(b, device=dev)[None, :, None]  # (n, b, 1)
        k_pos = start - back * b + torch.arange(span, device=dev)[None, None, :]  # (n, 1, span)
        k_pos = torch.cat((k_pos, rpos[:, None], glob.expand(n, 1, -1)), -1)
        return q_pos, k_pos

    def _block_mask(self, T, n, b, back, span, glob, rpos):
        q_pos, k_pos = self._block_positions(n, b, back, span, glob, rpos)
        R = rpos.shape[1]
        win, rand, gcol = k_pos[..., :span], k_pos[..., span : span + R], k_pos[..., span + R :]
        is_g = torch.zeros(T + 1, dtype=torch.bool, device=glob.device)
        is_g[glob] = True
        real = (win >= 0) & (win < T)
        # window keys: in band, real, and not global (global keys are counted in their own columns)
        ok_w = self.band(q_pos, win) & real & ~is_g[win.clamp(0, T)]
        ok_w = ok_w | ((q_pos >= T) & (win == q_pos))  # padded queries see themselves only (no empty rows)
        # random keys: drawn beyond the window's reach (never in band), real, not global
        ok_r = ((rand >= 0) & (rand < T) & ~is_g[rand.clamp(0, T)]).expand(n, b, -1)
        ok_g = (gcol <= q_pos) if self.causal else torch.ones_like(gcol <= q_pos)
        return torch.cat((ok_w, ok_r, ok_g.expand(n, b, -1)), -1)

    # -- flex_attention: the same rule as one block-sparse kernel ---------------------------
    @implements("flex", op="attend", devices=("cuda",))
    def attend_flex(self, q, k, v):
        T, dev = q.shape[-2], q.device
        key = (T, str(dev), int(self.pattern_seed) if self.random_blocks else None)
        if key not in self._flex_masks:  # built once per length and device (the rule does not change)
            self._flex_masks[key] = self._flex_block_mask(T, dev)
        mask = self._flex_masks[key]
        score_mod = None
        if self.uses_alibi:
            slopes = self.alibi_slopes.to(q.dtype)

            def score_mod(score, b, h, qi, ki):
                return score - slopes[h] * (qi - ki).abs().to(score.dtype)

        return _flex_attention()(q, k, v, score_mod=score_mod, block_mask=mask, scale=self.scale)

    def _flex_block_mask(self, T: int, dev):
        from torch.nn.attention.flex_attention import create_block_mask

        is_g = torch.zeros(T, dtype=torch.bool, device=dev)
        is_g[self.global_positions(T, dev)] = True
        n = math.ceil(T / self.block)
        drawn = torch.zeros(n, n + 1, dtype=torch.bool, device=dev)
        if self.random_blocks:
            idx = self.random_pattern(n, dev)
            drawn[torch.arange(n, device=dev)[:, None], idx.masked_fill(idx < 0, n)] = True
        reach, dilation, block, causal = self.reach, self.dilation, self.block, self.causal

        def mask_mod(b, h, qi, ki):
            d = qi - ki
            ok = (d.abs() < reach) & (d % dilation == 0)
            ok = ok | is_g[qi] | is_g[ki] | drawn[qi // block, ki // block]
            return ok & (d >= 0) if causal else ok

        return create_block_mask(mask_mod, None, None, T, T, device=dev)

    # -- decoding: a rolling window of keys and values, plus the global ones ----------------
    def init_state(self, batch, device=None, dtype=None) -> dict:
        if not self.causal:
            raise ZooConfigError("window decoding needs causal=True")
        if self.random_blocks:
            raise ZooConfigError(
                "window with random_blocks (bigbird) does not decode: a query block's random key blocks can "
                "lie anywhere before its window, so a step would need the whole history. Decode with "
                "random_blocks: 0 (window) or with softmax's KV cache."
            )
        if self.global_every or any(g >= self.window for g in self.global_tokens):
            raise ZooConfigError(
                "window decoding keeps a rolling window of keys plus the global ones; a global "
                f"position at or after window={self.window} would need the whole history. Decode "
                "with global_tokens < window and global_every = 0."
            )
        w = self.qkv.weight
        kw = {"device": device or w.device, "dtype": dtype or w.dtype}
        ring = (batch, self.n_heads, self.reach, self.head_dim)
        glob = (batch, self.n_heads, len(self.global_tokens), self.head_dim)
        return {"k": torch.zeros(ring, **kw), "v": torch.zeros(ring, **kw),
                "gk": torch.zeros(glob, **kw), "gv": torch.zeros(glob, **kw), "length": 0,
                "written": [0]}  # shared by the states that share the buffers (claim_buffers)

    def step(self, x_t, state):
        """x_t (B, d) -> y_t (B, d). Keys: a ring of the last ``reach`` positions and a buffer of
        the global positions seen so far, written in place unless another branch already wrote
        there (then copied first: copy-on-write)."""
        n = state["length"]
        state = claim_buffers(state, ("k", "v", "gk", "gv"))
        q, k, v = self.project(x_t[:, None], start=n)  # (B, H, 1, hd)
        dev = q.device
        slot = n % self.reach
        state["k"][:, :, slot], state["v"][:, :, slot] = k[:, :, 0], v[:, :, 0]
        if n in self.global_tokens:
            g = self.global_tokens.index(n)
            state["gk"][:, :, g], state["gv"][:, :, g] = k[:, :, 0], v[:, :, 0]
        if n >= self.reach + max(self.global_tokens, default=0) and self.dilation == 1 and not self.uses_alibi:
            # steady state: the ring holds exactly the last `reach` positions, all in the band and
            # all after the last global position, and every global key is past: every cached key
            # counts once, no mask to build
            K, V = state["k"], state["v"]
            scores = (q @ K.transpose(-2, -1)) * self.scale  # (B, H, 1, reach)
            if self.global_tokens:
                scores = torch.cat((scores, (q @ state["gk"].transpose(-2, -1)) * self.scale), -1)
                p = scores.softmax(-1)
                y = p[..., : self.reach] @ V + p[..., self.reach :] @ state["gv"]
            else:
                y = scores.softmax(-1) @ V
            return self.merge(y)[:, 0], {**state, "length": n + 1}
        gpos = torch.tensor(self.global_tokens, dtype=torch.long, device=dev)
        slots = torch.arange(self.reach, device=dev)
        pos = n - ((slot - slots) % self.reach)  # absolute position in each slot (< 0: empty)
        ok_ring = (pos >= 0) & ~torch.isin(pos, gpos)  # global keys come from their own buffer
        if n not in self.global_tokens:  # a global query (n < window) sees every cached key
            ok_ring = ok_ring & self.band(torch.tensor(n, device=dev), pos)
        ok = torch.cat((ok_ring, gpos <= n))
        K = torch.cat((state["k"], state["gk"]), 2)
        V = torch.cat((state["v"], state["gv"]), 2)
        scores = (q @ K.transpose(-2, -1)) * self.scale  # (B, H, 1, reach + G)
        if self.uses_alibi:
            kpos = torch.cat((pos, gpos))
            scores = scores + alibi_bias(self.alibi_slopes, torch.tensor([n], device=dev), kpos).to(q.dtype)
        y = scores.masked_fill(~ok, float("-inf")).softmax(-1) @ V
        return self.merge(y)[:, 0], {**state, "length": n + 1}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, window={self.window}, dilation={self.dilation}, "
                f"global_tokens={list(self.global_tokens)}, global_every={self.global_every}"
                + (f", block={self.block}, random_blocks={self.random_blocks}" if self.random_blocks else ""))


class _Windows(torch.autograd.Function):
    """(N, L, d) -> (N, n, span, d): n windows of ``span`` rows starting every ``b`` rows, as one
    overlapping strided view (no copy). Backward adds each window's gradient back in place:
    ``span // b`` shifted adds, instead of the generic as_strided backward."""

    @staticmethod
    def forward(ctx, x, n: int, b: int, span: int):
        ctx.shape, ctx.n, ctx.b, ctx.span = x.shape, n, b, span
        x = x.contiguous()
        N, L, d = x.shape
        return x.as_strided((N, n, span, d), (L * d, b * d, d, 1), x.storage_offset())

    @staticmethod
    def backward(ctx, g):
        N, L, d = ctx.shape
        n, b, span = ctx.n, ctx.b, ctx.span
        out = g.new_zeros(N, L, d)
        for j in range(span // b):
            out[:, j * b : j * b + n * b].view(N, n, b, d).add_(g[:, :, j * b : (j + 1) * b])
        return out, None, None, None


def _windows(x: torch.Tensor, n: int, b: int, span: int) -> torch.Tensor:
    return _Windows.apply(x, n, b, span)


@functools.cache
def _flex_attention():
    """flex_attention compiled once per process (uncompiled it materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
