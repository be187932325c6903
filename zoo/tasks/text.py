"""Character-level (byte-level) language modelling on a local text file.

``path`` names a UTF-8 or any text file; by default the corpus is the source of a few modules
of Python's own standard library (``argparse``, ``difflib``, ``textwrap``, ``inspect``), which
every Python installation has: no download. Bytes are the tokens (vocabulary 256). The last
``holdout`` fraction of the file is held out; training windows of ``seq_len`` bytes start at
seeded random offsets of the rest, validation and test windows tile the held-out part.
Reports bits per character (loss / ln 2) and perplexity. Causal.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import textwrap
from pathlib import Path

import torch

from zoo.errors import ZooConfigError
from zoo.tasks.base import Task

DEFAULT_MODULES = (argparse, difflib, textwrap, inspect)


def default_corpus() -> bytes:
    return b"\n".join(Path(m.__file__).read_bytes() for m in DEFAULT_MODULES)


class Text(Task):
    def __init__(self, *, path: str = "", seq_len: int = 128, holdout: float = 0.1, train_size: int = 4096,
                 test_size: int = 256, **common):
        super().__init__(seq_len=seq_len, train_size=train_size, test_size=test_size, **common)
        if path:
            p = Path(path).expanduser()
            if not p.is_file():
                raise ZooConfigError(f"text: corpus file {path!r} does not exist")
            raw = p.read_bytes()
        else:
            raw = default_corpus()
        if not 0 < holdout < 1:
            raise ZooConfigError(f"text: holdout must be in (0, 1), got {holdout}")
        split = int(len(raw) * (1 - holdout))
        if split < seq_len + 2 or len(raw) - split < 2 * (seq_len + 1):
            raise ZooConfigError(f"text: the corpus ({len(raw)} bytes) is too short for seq_len={seq_len} "
                                 f"with holdout={holdout}")
        self.path = path
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        self.train_bytes, self.held_bytes = data[:split], data[split:]

    @property
    def vocab_size(self) -> int:
        return 256

    def generate(self, n: int, seed: int, split: str):
        T = self.seq_len
        if split == "train":
            g = torch.Generator().manual_seed(seed)
            starts = torch.randint(0, len(self.train_bytes) - T - 1, (n,), generator=g)
            src = self.train_bytes
        else:  # tile the held-out bytes: first half validation, second half test
            half = len(self.held_bytes) // 2
            src = self.held_bytes[:half] if split == "val" else self.held_bytes[half:]
            starts = torch.arange(0, len(src) - T - 1, T)[:n]
        windows = torch.stack([src[s : s + T + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
