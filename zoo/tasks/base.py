"""What every task is: a LightningDataModule of (tokens, targets) generated from a seed.

Targets are -100 (``IGNORE``) wherever nothing is scored, so the loss and the accuracy count the
scored positions only. A task declares how the model must look (``model_overrides``: vocabulary,
head, causal, number of classes) and how it is scored (``metrics``).
"""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

IGNORE = -100


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): a resumed run sees the same order as an
    uninterrupted one. Lightning calls ``set_epoch`` before every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class Task(L.LightningDataModule):
    """Base of the zoo's tasks: subclasses implement ``generate(n, seed, split)``."""

    #: "lm": a target per position (IGNORE where unscored); "classify": one label per sequence
    head: ClassVar[str] = "lm"
    causal: ClassVar[bool] = True
    #: what the report shows: accuracy always; perplexity and bits/char for language modelling
    metrics: ClassVar[tuple[str, ...]] = ("accuracy",)

    def __init__(self, *, seq_len: int, train_size: int, test_size: int, batch_size: int = 32,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.seq_len, self.train_size, self.test_size = seq_len, train_size, test_size
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.data: dict[str, TensorDataset] = {}

    # -- what subclasses define ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def n_classes(self) -> int:
        return 0

    def generate(self, n: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def test_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Named test sets; the default is one, 'test'."""
        return {"test": self.generate(self.test_size, self.seed + 2, "test")}

    # -- shared --------------------------------------------------------------------------
    def model_overrides(self) -> dict:
        out = {"vocab_size": self.vocab_size, "head": self.head, "causal": self.causal}
        if self.head == "classify":
            out.update(n_classes=self.n_classes, pool="first")
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        self.data["train"] = TensorDataset(*self.generate(self.train_size, self.seed, "train"))
        self.data["val"] = TensorDataset(*self.generate(self.test_size, self.seed + 1, "val"))
        for name, tensors in self.test_splits().items():
            self.data[name] = TensorDataset(*tensors)

    def train_dataloader(self) -> DataLoader:
        ds = self.data["train"]
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochSeededSampler(len(ds), self.seed),
                          num_workers=self.num_workers, drop_last=len(ds) >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data["val"], batch_size=self.batch_size, num_workers=self.num_workers)

    def test_names(self) -> list[str]:
        return [n for n in self.data if n not in ("train", "val")]

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.data[n], batch_size=self.batch_size, num_workers=self.num_workers)
                for n in self.test_names()]
