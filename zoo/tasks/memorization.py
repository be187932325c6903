"""Memorization (Poli et al. 2024, MAD, arXiv:2403.17844): recall facts stored in the weights.

    k7 i k2 i k9 i ...        (i: the insert token; scored at each i: the value of the key before)

One fixed map from keys to values for the whole task (drawn from the data seed, the same in
training, validation and test): keys are the lower half of ``vocab - 1`` tokens, values the upper
half, one value per key and no value twice (MAD's ``generate_kv_map``). A sequence is
``seq_len / 2`` random keys, each followed by the insert token (``vocab - 1``), at which the
target is the key's value. Nothing in the context tells the answer: the model must have learned
the map, so the task measures how many facts a model stores for its size (MAD's baseline: vocab
256, seq_len 32, only 256 training sequences, the map shown again and again). Chance is
1 / (number of values). Causal.
"""

from __future__ import annotations

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import IGNORE, Task, derived_seed


class Memorization(Task):
    def __init__(self, *, vocab: int = 256, seq_len: int = 32, train_size: int = 256, test_size: int = 1280,
                 **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        if seq_len % 2 or vocab < 5:
            raise ZooConfigError(f"memorization: seq_len must be even (key, insert token) and vocab >= 5; got "
                                 f"seq_len={seq_len}, vocab={vocab}")
        self.vocab, self.n_keys = vocab, (vocab - 1) // 2
        g = torch.Generator().manual_seed(derived_seed(self.seed, "memorization map"))
        n_values = vocab - 1 - self.n_keys  # >= n_keys: every key gets a value of its own
        self.table = torch.randperm(n_values, generator=g)[: self.n_keys] + self.n_keys  # key -> value

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 1 - self.n_keys)

    def generate(self, n: int, seed: int, split: str):
        g = torch.Generator().manual_seed(seed)
        keys = torch.randint(0, self.n_keys, (n, self.seq_len // 2), generator=g)
        tokens = torch.stack([keys, torch.full_like(keys, self.vocab - 1)], -1).reshape(n, -1)
        targets = torch.stack([torch.full_like(keys, IGNORE), self.table[keys]], -1).reshape(n, -1)
        return tokens, targets
