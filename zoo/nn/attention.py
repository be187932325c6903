"""The attention core shared by every attention-style mixer.

``AttentionMixer`` owns the q/k/v/out projections, the head split, RoPE on q and k, and the
additive score bias (causal mask and ALiBi). A variant writes only ``attend(q, k, v)``:

    q: (B, H, Tq, hd), k and v: (B, H, Tk, hd)  ->  (B, H, Tq, hd)

where the Tq queries are the *last* Tq of the Tk positions (Tq == Tk in a full forward,
Tq == 1 when decoding), so one ``attend`` serves both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import SequenceMixer
from zoo.errors import ZooConfigError, at_least
from zoo.nn.positions import IN_ATTENTION, SCHEMES, Rotary, alibi_bias, alibi_slopes


class AttentionMixer(SequenceMixer):
    """Multi-head attention with a pluggable ``attend``.

    Args:
        d_model: model width.
        causal: position t attends only to positions <= t.
        n_heads: number of heads; 0 (the default): heads of width 64, i.e. max(1, d_model // 64)
            (narrow heads cannot form the sharp key matches recall needs: at d_model 64 with 8
            heads of width 8, attention stalls on MQAR where 1-2 wide heads solve it).
        head_dim: width of one head (default ``d_model // n_heads``).
        position: ``rope`` or ``alibi`` act here; ``none`` and the additive schemes
            (applied by the model at the embedding) leave the core unchanged.
        rope_base: RoPE frequency base.
        bias: biases on the projections.
        dropout: dropout on the attention probabilities (training only).
        backend: implementation of ``attend`` (the subclass's ``@implements`` methods).
    """

    # The in-attention schemes this variant's ``attend`` honours (the additive ones are the
    # model's business). The registry's ``positions`` must agree; it is checked at load.
    IN_ATTENTION: tuple[str, ...] = IN_ATTENTION

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool,
        n_heads: int = 0,
        head_dim: int | None = None,
        position: str = "none",
        rope_base: float = 10_000.0,
        bias: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__(d_model, causal=causal, backend=backend)
        if n_heads == 0:
            n_heads = max(1, d_model // (head_dim or 64))
        at_least(type(self).__name__, 1, n_heads=n_heads)
        if head_dim is not None:
            at_least(type(self).__name__, 1, head_dim=head_dim)
        if head_dim is None:
            if d_model % n_heads:
                raise ZooConfigError(
                    f"d_model={d_model} is not divisible by n_heads={n_heads}; "
                    "choose n_heads dividing d_model or set head_dim"
                )
            head_dim = d_model // n_heads
        allowed = [p for p in SCHEMES if p not in IN_ATTENTION or p in self.IN_ATTENTION]
        if position not in allowed:
            raise ZooConfigError(
                f"{type(self).__name__} cannot use position={position!r}; allowed: {', '.join(allowed)}"
            )
        self.n_heads, self.head_dim, self.position = n_heads, head_dim, position
        self.scale = 1.0 / math.sqrt(head_dim)
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=bias)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.rotary = Rotary(head_dim, rope_base) if position == "rope" else None
        if position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads), persistent=False)

    # -- projections ---------------------------------------------------------------------
    def project(self, x: torch.Tensor, start: int = 0):
        """(B, T, d) -> q, k, v each (B, H, T, hd), RoPE applied from position ``start``."""
        return self.split(self.qkv(x), start)

    def split(self, h: torch.Tensor, start: int = 0):
        """The joint projection h (B, T, 3 H hd) -> q, k, v each (B, H, T, hd), RoPE applied from
        position ``start``."""
        B, T, _ = h.shape
        q, k, v = h.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        return q, k, v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, hd) -> (B, T, d_model) through the output projection."""
        B, H, T, hd = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, H * hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        q, k, v = self.project(x)
        if x.shape[0] == 0 or x.shape[1] == 0:  # empty: nothing to attend, an empty output
            return self.merge(v)
        return self.merge(self.attend(q, k, v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The variant's attention, by the backend chosen for the device: its methods marked
        ``@implements(backend, op="attend")``."""
        return self.implementation("attend", q.device)(q, k, v)

    # -- FLOPs: the projections plus the variant's attend ------------------------------------
    def flops(self, batch: int, length: int) -> int | None:
        core = self.attend_flops(batch, length)
        if core is None:
            return None
        width = self.n_heads * self.head_dim
        return 2 * batch * length * self.d_model * width * 4 + core  # q, k, v and out projections

    def attend_flops(self, batch: int, length: int) -> int | None:
        """FLOPs of ``attend`` on (batch, length) (the torch backend's algorithm); None: unknown."""
        return None

    # -- what a variant's attend needs ---------------------------------------------------
    @property
    def uses_alibi(self) -> bool:
        return self.position == "alibi"

    def query_key_positions(self, tq: int, tk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of the queries (the last tq) and of the keys."""
        k_pos = torch.arange(tk, device=device)
        return k_pos[tk - tq :], k_pos

    def score_bias(self, tq: int, tk: int, device: torch.device, dtype: torch.dtype):
        """Additive bias on the scores, (H or 1, tq, tk): ALiBi and the causal mask; or None."""
        if not self.uses_alibi and not (self.causal and tq > 1):
            return None
        q_pos, k_pos = self.query_key_positions(tq, tk, device)
        if self.uses_alibi:
            bias = alibi_bias(self.alibi_slopes, q_pos, k_pos).to(dtype)
        else:
            bias = torch.zeros(1, tq, tk, device=device, dtype=dtype)
        if self.causal:
            bias = bias.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        return bias

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
            f"position={self.position!r}"
        )



class ShortConvAttention(AttentionMixer):
    """Attention with an optional short convolution: ``short_conv`` k > 0 runs a depthwise
    convolution of k taps (causal: over the position and its k - 1 predecessors) and a SiLU
    over the joint q, k, v projection, as Based (Arora et al. 2024), DeltaNet (Yang et al.
    2024) and flash-linear-attention's layers (``use_short_conv``) do. Each position then
    carries its predecessors, which binding a key to the value after it needs: without it,
    linear attention sits at mqar's floor (bench/experiments/short_conv). Decoding keeps the
    last k - 1 projections (``conv_state``, ``project_step``)."""

    def __init__(self, d_model: int, *, short_conv: int = 0, **attention):
        super().__init__(d_model, **attention)
        at_least(type(self).__name__, 0, short_conv=short_conv)
        self.short_conv = short_conv
        if short_conv:
            width = 3 * self.n_heads * self.head_dim
            self.conv = nn.Conv1d(width, width, short_conv, groups=width)

    def project(self, x: torch.Tensor, start: int = 0):
        if not self.short_conv or x.shape[1] == 0:  # no positions: nothing to convolve (empty q, k, v)
            return super().project(x, start)
        k = self.short_conv
        pad = (k - 1, 0) if self.causal else ((k - 1) // 2, k // 2)
        h = F.silu(self.conv(F.pad(self.qkv(x).transpose(1, 2), pad))).transpose(1, 2)
        return self.split(h, start)

    def project_step(self, x_t: torch.Tensor, state: dict, start: int = 0):
        """q, k, v (B, H, 1, hd) of one position x_t (B, d), and what the state carries for the
        convolution next ({} without one); ``state`` is not changed."""
        if not self.short_conv:
            return (*self.project(x_t[:, None], start), {})
        window = torch.cat((state["conv"], self.qkv(x_t)[:, :, None]), dim=2)  # (B, 3 H hd, k)
        h = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)
        return (*self.split(h[:, None], start), {"conv": window[:, :, 1:]})

    def conv_state(self, batch: int, device=None, dtype=None) -> dict:
        """The convolution's part of a decode state: the last k - 1 projections (zeros: none yet)."""
        if not self.short_conv:
            return {}
        w = self.qkv.weight
        return {"conv": torch.zeros(batch, self.conv.in_channels, self.short_conv - 1,
                                    device=device or w.device, dtype=dtype or w.dtype)}

    def conv_flops(self, batch: int, length: int) -> int:
        """The depthwise convolution, as FlopCounterMode counts it (a multiply-add per tap)."""
        return 2 * batch * length * self.conv.in_channels * self.short_conv if self.short_conv else 0

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", short_conv={self.short_conv}" if self.short_conv else "")


class MatrixStateAttention(ShortConvAttention):
    """Base of the linear-attention family that decodes with a d_k x d_v state per head
    (RetNet, GLA, DeltaNet): the state and the chunk-to-chunk carry their chunkwise forms share."""

    def chunkwise_flops(self, batch: int, length: int) -> int:
        """The chunkwise form's products per head (the length padded to whole chunks of
        ``self.chunk``): the scores inside each chunk and their product with V, each chunk's
        K^T V, and Q times the carried state."""
        if length == 0:
            return 0
        c, d = min(self.chunk, length), self.head_dim
        return 2 * batch * self.n_heads * math.ceil(length / c) * c * (2 * c * d + 2 * d * d)

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        w = self.qkv.weight
        shape = (batch, self.n_heads, self.head_dim, self.head_dim)
        return {"S": torch.zeros(shape, device=device or w.device, dtype=dtype or w.dtype), "length": 0,
                **self.conv_state(batch, device, dtype)}

    @staticmethod
    def carry(added: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        """The state before each chunk from what each chunk adds, ``added`` (B, H, n, d_k, d_v), and
        how each chunk decays the state it receives, ``decay`` (B or 1, H, n, d_k or 1, 1):
        S_0 = 0, S_(j+1) = decay_j * S_j + added_j. Chunk j's state holds earlier chunks only."""
        # unbind once: indexing added[:, :, j] in the loop made autograd build a zero gradient of
        # the whole (B, H, n, ...) tensor for every chunk and add them up (quadratic in the number
        # of chunks); unbind's backward stacks the chunks' gradients once
        S, states = torch.zeros_like(added[:, :, 0]), []
        for a, g in zip(added.unbind(2), decay.unbind(2), strict=True):
            states.append(S)
            S = g * S + a
        return torch.stack(states, 2)
