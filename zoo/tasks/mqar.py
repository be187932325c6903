"""Multi-query associative recall (Arora et al. 2023, Zoology, arXiv:2312.04927), as Zoology
generates it (``zoology/data/multiquery_ar.py``):

    k1 v1 k2 v2 ... kN vN | f f k3 f f f k1 f f ...        (f: filler)
                                ^-- target v3   ^-- target v1

``n_pairs`` key-value pairs first (keys from the lower half of the vocabulary, values from the
upper half, both distinct within a sequence), then the query region: filler, with every key
asked once at even offsets whose gaps follow Zoology's power law (``power_a`` 0.01 favours
queries near the pairs; 1.0 is uniform). The target at a query is its key's value; only queries
are scored, so chance is 1 / (number of value tokens). The answer never appears in the input:
``reveal_answers: true`` writes each value after its query, which is *not* Zoology's task: it
lets a model score 0.52 at 4 pairs by elimination (the values not yet answered) without binding
any key to its value, a plateau attention sits on for thousands of steps (docs/findings.md).
Filler is random tokens (Zoology's ``random_non_queries``) or token 0 (``filler: zero``).
``n_queries`` > ``n_pairs`` asks that many queries, keys drawn with replacement.
Measures recall of bound pairs across distance: what gated convolutions and SSMs find hard. Causal.
"""

from __future__ import annotations

import torch

from zoo.errors import ZooConfigError, unknown
from zoo.tasks.base import IGNORE, Task

FILLERS = ("random", "zero")


class MQAR(Task):
    def __init__(self, *, vocab: int = 64, seq_len: int = 64, n_pairs: int = 8, n_queries: int = 0,
                 power_a: float = 0.01, filler: str = "random", reveal_answers: bool = False,
                 train_size: int = 4096, test_size: int = 512, **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        n_keys = (vocab - 1) // 2  # keys 1..n_keys, values n_keys+1..vocab-1
        if n_pairs < 1 or n_pairs > min(n_keys, vocab - 1 - n_keys):
            raise ZooConfigError(f"mqar: n_pairs={n_pairs} needs vocab >= {2 * n_pairs + 1} (and n_pairs >= 1), "
                                 f"got vocab={vocab}")
        n_queries = n_queries or n_pairs
        if 2 * n_pairs + 2 * n_queries > seq_len:
            raise ZooConfigError(
                f"mqar: seq_len={seq_len} is too short: {n_pairs} pairs and {n_queries} queries take "
                f"{2 * n_pairs + 2 * n_queries} positions"
            )
        if not 0 < power_a <= 1:
            raise ZooConfigError(f"mqar: power_a must be in (0, 1] (1 = uniform gaps), got {power_a}")
        if filler not in FILLERS:
            raise unknown("mqar filler", filler, FILLERS)
        self.vocab, self.n_pairs, self.n_keys, self.n_queries = vocab, n_pairs, n_keys, n_queries
        self.power_a, self.filler, self.reveal_answers = power_a, filler, reveal_answers

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 1 - self.n_keys)  # values come from the upper half

    @property
    def floor(self) -> float:
        """A model that copies one of the example's values without binding it to its key: one
        in ``n_pairs``. Learning that much takes no recall; a mixer that sits there has not
        started the task (docs/findings.md). With ``reveal_answers`` and each key asked once,
        a guess among the values not yet answered: H(n_pairs) / n_pairs (0.52 at 4 pairs)."""
        if self.reveal_answers and self.n_queries == self.n_pairs:
            return sum(1.0 / k for k in range(1, self.n_pairs + 1)) / self.n_pairs
        return 1.0 / self.n_pairs

    def generate(self, n: int, seed: int, split: str):
        g = torch.Generator().manual_seed(seed)
        N, Q, T = self.n_pairs, self.n_queries, self.seq_len
        distinct = lambda size, k: torch.rand(n, size, generator=g).argsort(-1)[:, :k]  # noqa: E731
        keys = distinct(self.n_keys, N) + 1  # (n, N) in 1..n_keys
        values = distinct(self.vocab - 1 - self.n_keys, N) + self.n_keys + 1  # in n_keys+1..vocab-1
        if self.filler == "random":
            tokens = torch.randint(0, self.vocab, (n, T), generator=g)
        else:
            tokens = torch.zeros(n, T, dtype=torch.long)
        tokens[:, 0 : 2 * N : 2], tokens[:, 1 : 2 * N : 2] = keys, values
        # query slots: even offsets 2 * gap after the pairs, Q distinct gaps per sequence drawn
        # with Zoology's power law p(gap) ~ power_a * (gap + 1) ** (power_a - 1)
        n_slots = (T - 2 * N) // 2
        p = self.power_a * torch.arange(1, n_slots + 1, dtype=torch.float64) ** (self.power_a - 1)
        gaps = torch.multinomial(p.expand(n, -1), Q, replacement=False, generator=g)  # (n, Q)
        order = distinct(N, N) if Q == N else torch.randint(0, N, (n, Q), generator=g)  # which key each asks
        pos, rows = 2 * N + 2 * gaps, torch.arange(n)[:, None]
        qk, qv = keys.gather(1, order), values.gather(1, order)
        tokens[rows, pos] = qk
        if self.reveal_answers:
            tokens[rows, pos + 1] = qv
        targets = torch.full((n, T), IGNORE, dtype=torch.long)
        targets[rows, pos] = qv
        return tokens, targets
