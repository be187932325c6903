"""Induction heads (Olsson et al. 2022): recall the token that followed a trigger.

Random tokens (1..vocab-2); a trigger token (vocab-1) appears once at a random position in the
first half, followed by a token X; the sequence ends with the trigger again, and the target at
that last position is X (only it is scored). Trained at ``seq_len``; tested at each of
``test_lengths`` (default 1x, 2x, 4x) to measure length extrapolation. Causal.
"""

from __future__ import annotations

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import IGNORE, Task, derived_seed


class Induction(Task):
    def __init__(self, *, vocab: int = 32, seq_len: int = 64, test_lengths: list[int] | tuple[int, ...] = (),
                 train_size: int = 4096, test_size: int = 512, **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        if vocab < 3 or seq_len < 4:
            raise ZooConfigError(f"induction needs vocab >= 3 and seq_len >= 4, got vocab={vocab}, seq_len={seq_len}")
        self.vocab = vocab
        self.test_lengths = list(test_lengths) or [seq_len, 2 * seq_len, 4 * seq_len]

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 2)  # the recalled token is one of 1..vocab-2

    def generate(self, n: int, seed: int, split: str, length: int | None = None):
        T = length or self.seq_len
        g = torch.Generator().manual_seed(seed)
        trigger = self.vocab - 1
        tokens = torch.randint(1, trigger, (n, T), generator=g)
        pos = torch.randint(0, T // 2, (n,), generator=g)
        rows = torch.arange(n)
        tokens[rows, pos] = trigger
        tokens[:, -1] = trigger
        targets = torch.full((n, T), IGNORE, dtype=torch.long)
        targets[:, -1] = tokens[rows, pos + 1]
        return tokens, targets

    def test_splits(self):
        return {f"test@{T}": self.generate(self.test_size, derived_seed(self.seed, "test", T), "test", length=T)
                for T in self.test_lengths}
