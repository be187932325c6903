"""Fuzzy in-context recall (Poli et al. 2024, MAD, arXiv:2403.17844; the multi-query form of its
benchmark): in-context recall where keys and values are motifs of several tokens.

    p p  k4 k1  v9  k2 k0 k5  v7 v8  k4 k1  v9 ...        (p: padding)
                                         ^-- scored: v9 after the key (k4 k1) seen before

Keys are runs of 1..``key_motif`` distinct tokens from the lower half of ``vocab - 1`` tokens,
values runs of 1..``value_motif`` distinct tokens from the upper half (token ``vocab - 1`` pads
the front to ``seq_len``); key and value tokens never mix, so a run of key tokens is one key.
Each sequence binds every key it shows to one value (the value of a key keeps its length); the
value tokens of a key seen before are scored, each at the position before it (next-token
targets). One pair is placed somewhere in the sequence and asked again at its end, so every
sequence has a scored value. As in MAD, training keys have random lengths (1..key_motif) while
validation and test keys all have ``key_motif`` tokens. Chance is 1 / (number of value tokens).
MAD trains on next-token targets everywhere and tests on the recalled values; here both score
the recalled values alone. Causal.
"""

from __future__ import annotations

import random

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import IGNORE, Task


class FuzzyRecall(Task):
    def __init__(self, *, vocab: int = 16, seq_len: int = 128, key_motif: int = 3, value_motif: int = 3,
                 train_size: int = 12800, test_size: int = 1280, **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        n_keys = (vocab - 1) // 2
        if key_motif < 1 or value_motif < 1 or n_keys < key_motif or vocab - 1 - n_keys < value_motif:
            raise ZooConfigError(
                f"fuzzy_recall: key_motif and value_motif must be >= 1 and fit the vocabulary (keys: {n_keys} tokens, "
                f"values: {vocab - 1 - n_keys}; motifs have distinct tokens); got vocab={vocab}, "
                f"key_motif={key_motif}, value_motif={value_motif}")
        if seq_len < 3 * (key_motif + value_motif):
            longest = key_motif + value_motif
            raise ZooConfigError(f"fuzzy_recall: seq_len={seq_len} is too short for a pair and its query of up to "
                                 f"{longest} tokens each; give seq_len >= {3 * longest}")
        self.vocab, self.key_motif, self.value_motif, self.n_keys = vocab, key_motif, value_motif, n_keys

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 1 - self.n_keys)

    def generate(self, n: int, seed: int, split: str):
        rng = random.Random(seed)
        tokens = torch.full((n, self.seq_len), self.vocab - 1, dtype=torch.long)
        targets = torch.full((n, self.seq_len), IGNORE, dtype=torch.long)
        for i in range(n):
            x, y = self._example(rng, split == "train")
            tokens[i, self.seq_len - len(x):], targets[i, self.seq_len - len(y):] = torch.tensor(x), torch.tensor(y)
        return tokens, targets

    def _example(self, rng: random.Random, train: bool) -> tuple[list[int], list[int]]:
        keys, values = range(self.n_keys), range(self.n_keys, self.vocab - 1)

        def key() -> tuple[int, ...]:
            return tuple(rng.sample(keys, rng.randint(1, self.key_motif) if train else self.key_motif))

        def value() -> tuple[int, ...]:
            return tuple(rng.sample(values, rng.randint(1, self.value_motif)))

        probe = (key(), value())
        bound = {probe[0]: probe[1]}  # this sequence's key -> value
        longest, probe_len = self.key_motif + self.value_motif, len(probe[0]) + len(probe[1])
        room = self.seq_len - probe_len  # the last pair asks the probe again
        at = rng.randint(0, room - 2 * longest)  # where the probe pair is shown first
        x: list[int] = []
        y: list[int] = []
        shown: set[tuple[int, ...]] = set()

        def put(k: tuple[int, ...]) -> None:
            v = bound[k]  # targets are next tokens: a recalled value's tokens are scored one position early
            x.extend(k + v)
            y.extend([IGNORE] * (len(k) - 1) + (list(v) if k in shown else [IGNORE] * len(v)) + [IGNORE])
            shown.add(k)

        while True:
            if probe[0] not in shown and len(x) >= at:
                put(probe[0])
                continue
            if len(x) + longest + (0 if probe[0] in shown else probe_len) > room:
                break
            k = key()
            bound.setdefault(k, value())
            put(k)
        if probe[0] not in shown:
            put(probe[0])
        put(probe[0])
        return x, y
