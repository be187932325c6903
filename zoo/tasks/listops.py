"""ListOps (Nangia & Bowman 2018; Long Range Arena, Tay et al. 2021).

Nested expressions such as ``[MAX 4 3 [MIN 2 3 ] 1 0 ]`` over digits with the operators MAX,
MIN, MED (median, rounded down) and SM (sum modulo 10); the label is the value, 0-9. Generated
with bounded depth and arity, padded to ``seq_len`` after a leading CLS token that the
classification head reads. Bidirectional.
"""

from __future__ import annotations

import random
import statistics

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import Task

PAD, CLS, CLOSE = 0, 1, 2
OPS = {"MAX": max, "MIN": min, "MED": lambda xs: int(statistics.median_low(xs)), "SM": lambda xs: sum(xs) % 10}
OP_TOKEN = {name: 3 + i for i, name in enumerate(OPS)}  # "[MAX" etc. are single tokens
DIGIT0 = 3 + len(OPS)  # digits 0..9 follow


def evaluate(tokens: list[int]) -> int:
    """The value of a token list written by ``ListOps.expression`` (a small solver, used by the tests)."""
    stack: list[tuple[str, list[int]]] = []
    names = {v: k for k, v in OP_TOKEN.items()}
    result = None
    for t in tokens:
        if t in names:
            stack.append((names[t], []))
        elif t == CLOSE:
            name, args = stack.pop()
            value = OPS[name](args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif DIGIT0 <= t < DIGIT0 + 10:
            if not stack:
                return t - DIGIT0
            stack[-1][1].append(t - DIGIT0)
    if result is None:
        raise ValueError("not a complete expression")
    return result


class ListOps(Task):
    head = "classify"
    causal = False

    def __init__(self, *, seq_len: int = 128, max_depth: int = 4, max_args: int = 5, train_size: int = 4096,
                 test_size: int = 512, **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        if seq_len < 8 or max_depth < 1 or max_args < 2:
            raise ZooConfigError(f"listops needs seq_len >= 8, max_depth >= 1, max_args >= 2; got {seq_len}, "
                                 f"{max_depth}, {max_args}")
        self.max_depth, self.max_args = max_depth, max_args

    @property
    def vocab_size(self) -> int:
        return DIGIT0 + 10

    @property
    def n_classes(self) -> int:
        return 10

    def expression(self, rng: random.Random, depth: int, budget: int) -> tuple[list[int], int]:
        """Tokens and value of a random expression of at most ``budget`` tokens."""
        if depth >= self.max_depth or budget < 4 or rng.random() < 0.25 * depth:
            d = rng.randrange(10)
            return [DIGIT0 + d], d
        name = rng.choice(list(OPS))
        tokens, values = [OP_TOKEN[name]], []
        budget -= 2  # the operator and the closing bracket
        for _ in range(rng.randint(2, self.max_args)):
            if budget < 1:
                break
            sub, value = self.expression(rng, depth + 1, budget)
            tokens += sub
            values.append(value)
            budget -= len(sub)
        return tokens + [CLOSE], OPS[name](values)

    def generate(self, n: int, seed: int, split: str):
        rng = random.Random(seed)
        tokens = torch.full((n, self.seq_len), PAD, dtype=torch.long)
        labels = torch.empty(n, dtype=torch.long)
        for i in range(n):
            expr, value = self.expression(rng, 0, self.seq_len - 1)
            tokens[i, 0] = CLS
            tokens[i, 1 : 1 + len(expr)] = torch.tensor(expr)
            labels[i] = value
        return tokens, labels
