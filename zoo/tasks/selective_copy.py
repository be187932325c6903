"""Selective copying (Gu & Dao 2023, Mamba, section 3.1).

``n_tokens`` data tokens (1..vocab-3) are scattered at random positions of a context of
``seq_len - n_tokens`` noise tokens (0); then ``n_tokens`` marker tokens (vocab-1) follow. At the
j-th marker the target is the j-th data token of the context, in order; only the markers are
scored. Measures content-aware selection: what fixed (time-invariant) mixers cannot do. Causal.
"""

from __future__ import annotations

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import IGNORE, Task


class SelectiveCopy(Task):
    def __init__(self, *, vocab: int = 16, seq_len: int = 64, n_tokens: int = 8, train_size: int = 4096,
                 test_size: int = 512, **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        if vocab < 4:
            raise ZooConfigError(f"selective_copy needs vocab >= 4 (noise, marker, two data tokens), got {vocab}")
        if 2 * n_tokens > seq_len:
            raise ZooConfigError(f"selective_copy: seq_len={seq_len} must be >= 2 * n_tokens = {2 * n_tokens}")
        self.vocab, self.n_tokens = vocab, n_tokens

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 3)  # data tokens 1..vocab-3

    def generate(self, n: int, seed: int, split: str):
        g = torch.Generator().manual_seed(seed)
        M, T = self.n_tokens, self.seq_len
        ctx = T - M
        data = torch.randint(1, self.vocab - 2, (n, M), generator=g)
        pos = torch.rand(n, ctx, generator=g).argsort(-1)[:, :M].sort(-1).values  # in order
        tokens = torch.zeros(n, T, dtype=torch.long)
        rows = torch.arange(n)[:, None]
        tokens[rows, pos] = data
        tokens[:, ctx:] = self.vocab - 1
        targets = torch.full((n, T), IGNORE, dtype=torch.long)
        targets[:, ctx:] = data
        return tokens, targets
