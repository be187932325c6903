"""Noisy in-context recall (Poli et al. 2024, MAD, "Mechanistic Design and Scaling of Hybrid
Architectures", arXiv:2403.17844; the multi-query form of its benchmark):

    k3 v3 k1 v1 n n k3 v3 k2 v2 k1 v1 ...        (n: noise tokens)
              ^-- scored: k3 was seen, its value is v3

``seq_len / 2`` slots of two tokens. Each slot is, with probability ``frac_noise``, two noise
tokens, else a key and its value. MAD's layout: noise is the top ``noise_vocab`` tokens; of the
``vocab - noise_vocab`` below, keys are the lower half and values the upper. Each sequence has its own map
from keys to values (values drawn with replacement); keys recur. At a key that appeared in an
earlier slot the target is its value (the next token): recall of a binding made in context, with
distractors. One slot before the last is always a pair, and the last slot asks a key seen before,
so every sequence has a scored position. Chance is 1 / (number of value tokens).

MAD trains on next-token targets at every position and tests on the recalled values only; here
both are scored at the recalled values alone (the other targets are random tokens no model can
predict, so the learnable signal is the same). Causal.
"""

from __future__ import annotations

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import IGNORE, Task


class NoisyRecall(Task):
    def __init__(self, *, vocab: int = 32, seq_len: int = 128, noise_vocab: int = 16, frac_noise: float = 0.2,
                 train_size: int = 12800, test_size: int = 1280, **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        if seq_len % 2 or seq_len < 4:
            raise ZooConfigError(f"noisy_recall: seq_len must be even and >= 4 (slots of a key and its value), "
                                 f"got {seq_len}")
        if not 0 <= frac_noise < 1:
            raise ZooConfigError(f"noisy_recall: frac_noise must be in [0, 1), got {frac_noise}")
        if noise_vocab < 0 or (frac_noise > 0 and noise_vocab < 1) or vocab - noise_vocab < 4:
            raise ZooConfigError(
                f"noisy_recall: needs noise_vocab >= 1 when frac_noise > 0 and vocab - noise_vocab >= 4 (two keys, "
                f"two values); got vocab={vocab}, noise_vocab={noise_vocab}, frac_noise={frac_noise}")
        self.vocab, self.noise_vocab, self.frac_noise = vocab, noise_vocab, frac_noise
        self.n_keys = (vocab - noise_vocab) // 2  # keys 0..n_keys-1, values n_keys..vocab-noise_vocab-1

    @property
    def n_values(self) -> int:
        return self.vocab - self.noise_vocab - self.n_keys

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def generate(self, n: int, seed: int, split: str):
        g = torch.Generator().manual_seed(seed)
        S, K, rows = self.seq_len // 2, self.n_keys, torch.arange(n)
        noise = torch.rand(n, S, generator=g) < self.frac_noise
        noise[rows, torch.randint(0, S - 1, (n,), generator=g)] = False  # a pair before the last slot
        noise[:, -1] = False
        keys = torch.randint(0, K, (n, S), generator=g)
        table = torch.randint(K, K + self.n_values, (n, K), generator=g)  # this sequence's key -> value
        # the last slot asks the key of a random earlier pair
        earlier = (torch.rand(n, S - 1, generator=g) + 1) * (~noise[:, :-1])
        keys[:, -1] = keys[rows, earlier.argmax(1)]
        values = table.gather(1, keys)
        pair = torch.nn.functional.one_hot(keys, K) * (~noise)[..., None]  # (n, S, K)
        seen = (pair.cumsum(1) - pair).gather(2, keys[..., None])[..., 0] > 0  # key shown in an earlier pair
        junk = torch.randint(self.vocab - self.noise_vocab, self.vocab, (n, S, 2), generator=g) if self.noise_vocab \
            else torch.zeros(n, S, 2, dtype=torch.long)
        tokens = torch.stack([keys, values], -1).where(~noise[..., None], junk)  # (n, S, 2)
        targets = torch.full((n, S, 2), IGNORE, dtype=torch.long)
        targets[..., 0] = values.where(seen & ~noise, torch.full_like(values, IGNORE))
        return tokens.reshape(n, -1), targets.reshape(n, -1)
