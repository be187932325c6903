"""Linear attention with a short causal convolution on q, k and v (the token shift that Based,
Arora et al. 2024, and flash-linear-attention's ``use_short_conv`` put before the feature map).
An experiment, not a zoo mixer: does the missing shift explain why the zoo's ``linear`` sits at
mqar's floor (1 / n_pairs) at every learning rate? Training only (no decode step)."""

import torch.nn.functional as F
from torch import nn

from zoo.mixers.linear import LinearAttention


class ConvLinearAttention(LinearAttention):
    def __init__(self, d_model: int, *, causal: bool, kernel: int = 4, **linear):
        super().__init__(d_model, causal=causal, **linear)
        width = 3 * self.n_heads * self.head_dim
        self.kernel = kernel
        self.conv = nn.Conv1d(width, width, kernel, groups=width)

    def project(self, x, start: int = 0):
        B, T, _ = x.shape
        h = F.pad(self.qkv(x).transpose(1, 2), (self.kernel - 1, 0))  # causal: the last `kernel` positions
        h = F.silu(self.conv(h)).transpose(1, 2)
        return h.reshape(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def step(self, x_t, state):  # pragma: no cover
        raise NotImplementedError("conv_linear is a training-only experiment")
