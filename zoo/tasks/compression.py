"""Compression (Poli et al. 2024, MAD, arXiv:2403.17844): squeeze a sequence into one state.

    t1 t2 ... t(T-1) c        -> reconstruct t1 ... t(T-1) from the state at c

``seq_len - 1`` random tokens (0..vocab-2), then the compression token (``vocab - 1``). The model
is the zoo's backbone with the ``reconstruct`` head (MAD's auto-encoder): only the last position's
hidden state reaches a decoder that, given a position code, must emit the token there. Every
random token is scored (MAD also scores the compression token, which is always the same; here it
is left out, so chance is exactly 1 / (vocab - 1)). Measures how much of its input a mixer can
carry in one position's state. Causal.
"""

from __future__ import annotations

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import IGNORE, Task


class Compression(Task):
    head = "reconstruct"

    def __init__(self, *, vocab: int = 16, seq_len: int = 32, train_size: int = 12800, test_size: int = 1280,
                 **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        if vocab < 3 or seq_len < 2:
            raise ZooConfigError(f"compression needs vocab >= 3 and seq_len >= 2, got vocab={vocab}, seq_len={seq_len}")
        self.vocab = vocab

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 1)

    def generate(self, n: int, seed: int, split: str):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.vocab - 1, (n, self.seq_len), generator=g)
        tokens[:, -1] = self.vocab - 1
        targets = tokens.clone()
        targets[:, -1] = IGNORE
        return tokens, targets
