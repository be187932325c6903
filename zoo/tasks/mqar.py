"""Multi-query associative recall (Arora et al. 2023, Zoology, arXiv:2312.04927).

A sequence starts with ``n_pairs`` key-value pairs (k1 v1 k2 v2 ...), keys from one half of the
vocabulary and values from the other, keys distinct within a sequence. The rest is filler
(token 0) with queries at random places: a key followed by its value. By default every key is
queried once (Zoology); ``n_queries`` > ``n_pairs`` asks that many queries, keys drawn with
replacement, which gives the model denser signal and no elimination shortcut.
The target at a queried key is its value; only those positions are scored. Measures recall of
bound pairs across distance: what gated convolutions and SSMs find hard. Causal.
"""

from __future__ import annotations

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import IGNORE, Task


class MQAR(Task):
    def __init__(self, *, vocab: int = 64, seq_len: int = 64, n_pairs: int = 8, n_queries: int = 0,
                 train_size: int = 4096, test_size: int = 512, **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        n_keys = (vocab - 1) // 2
        if n_pairs > n_keys:
            raise ZooConfigError(f"mqar: n_pairs={n_pairs} needs vocab >= {2 * n_pairs + 1}, got vocab={vocab}")
        n_queries = n_queries or n_pairs
        if 2 * n_pairs + 2 * n_queries > seq_len:
            raise ZooConfigError(
                f"mqar: seq_len={seq_len} is too short: {n_pairs} pairs and {n_queries} queries take "
                f"{2 * n_pairs + 2 * n_queries} positions"
            )
        self.vocab, self.n_pairs, self.n_keys, self.n_queries = vocab, n_pairs, n_keys, n_queries

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 1 - self.n_keys)  # values come from the upper half

    def generate(self, n: int, seed: int, split: str):
        g = torch.Generator().manual_seed(seed)
        N, T = self.n_pairs, self.seq_len
        keys = torch.rand(n, self.n_keys, generator=g).argsort(-1)[:, :N] + 1  # distinct, 1..n_keys
        values = torch.randint(self.n_keys + 1, self.vocab, (n, N), generator=g)
        tokens = torch.zeros(n, T, dtype=torch.long)
        tokens[:, 0 : 2 * N : 2], tokens[:, 1 : 2 * N : 2] = keys, values
        targets = torch.full((n, T), IGNORE, dtype=torch.long)
        # query slots: pairs of positions (p, p + 1) in the tail, Q distinct slots per sequence
        Q = self.n_queries
        n_slots = (T - 2 * N) // 2
        slots = torch.rand(n, n_slots, generator=g).argsort(-1)[:, :Q]  # which slots hold queries
        if Q == N:  # every key once, in random order
            order = torch.rand(n, N, generator=g).argsort(-1)
        else:
            order = torch.randint(0, N, (n, Q), generator=g)
        pos = 2 * N + 2 * slots  # (n, Q)
        rows = torch.arange(n)[:, None]
        qk, qv = keys.gather(1, order), values.gather(1, order)
        tokens[rows, pos], tokens[rows, pos + 1] = qk, qv
        targets[rows, pos] = qv
        return tokens, targets
