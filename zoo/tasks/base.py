"""What every task is: a LightningDataModule of (tokens, targets) generated from a seed.

Targets are -100 (``IGNORE``) wherever nothing is scored, so the loss and the accuracy count the
scored positions only. A task declares how the model must look (``model_overrides``: vocabulary,
head, causal, number of classes) and its chance level (``chance``).

Training batches are a function of (seed, step, rank) alone (``train_batch``): the batch of
optimizer step s is the same whether the run got there uninterrupted or resumed from a
checkpoint at any step, mid-epoch included, and DDP ranks take disjoint slices. With
``train_size: 0`` every batch is drawn fresh and none repeats; with ``train_size: n`` they come
from n fixed examples, reshuffled each pass. Validation and test sets are fixed.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from zoo.errors import ZooConfigError

IGNORE = -100


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from named parts, e.g. (seed, "train", step, rank): distinct parts give
    unrelated streams (never seed + 1 colliding with another split's seed)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class StepBatches(IterableDataset):
    """The training stream: ``task.train_batch(step)`` for step = the trainer's global step when
    iteration starts (so a resumed run continues where it stopped), then step + 1, ..."""

    def __init__(self, task: Task):
        self.task = task

    def __iter__(self):
        trainer = getattr(self.task, "trainer", None)
        step = trainer.global_step if trainer is not None else 0
        while True:
            yield self.task.train_batch(step)
            step += 1


class Task(L.LightningDataModule):
    """Base of the zoo's tasks: subclasses implement ``generate(n, seed, split)``."""

    #: "lm": a target per position (IGNORE where unscored); "classify": one label per sequence
    head: ClassVar[str] = "lm"
    causal: ClassVar[bool] = True

    def __init__(self, *, seq_len: int, train_size: int, test_size: int, batch_size: int = 32,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        if seq_len < 1 or train_size < 0 or test_size < 1 or batch_size < 1:
            raise ZooConfigError(
                f"{type(self).__name__.lower()} needs seq_len >= 1, train_size >= 0 (0: fresh data every step), "
                f"test_size >= 1 and batch_size >= 1; got seq_len={seq_len}, train_size={train_size}, "
                f"test_size={test_size}, batch_size={batch_size}")
        self.seq_len, self.train_size, self.test_size = seq_len, train_size, test_size
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.data: dict[str, TensorDataset] = {}
        self._perms: dict[int, torch.Tensor] = {}

    # -- what subclasses define ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The token alphabet's size: ``self.vocab`` where a task keeps its vocabulary there."""
        if not hasattr(self, "vocab"):
            raise NotImplementedError(f"{type(self).__name__} sets neither self.vocab nor vocab_size")
        return self.vocab

    @property
    def n_classes(self) -> int:
        return 0

    @property
    def chance(self) -> float:
        """Test accuracy of a model that knows the answer's alphabet but nothing else."""
        return 1.0 / (self.n_classes or self.vocab_size)

    @property
    def floor(self) -> float:
        """Test accuracy reachable without the skill the task tests (e.g. recall without binding
        keys to values); the chance level where the task has no such shortcut."""
        return self.chance

    def generate(self, n: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples (tokens, targets) drawn from ``seed`` for ``split`` ("train", "val" or a
        test name). Synthetic tasks need only the seed (each split already has its own, from
        :func:`derived_seed`); a task that reads files picks its source by ``split`` (``text``)."""
        raise NotImplementedError

    def test_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Named test sets; the default is one, 'test'."""
        return {"test": self.generate(self.test_size, derived_seed(self.seed, "test"), "test")}

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One training example (for checks before training)."""
        return self.generate(1, derived_seed(self.seed, "example"), "train")

    # -- shared --------------------------------------------------------------------------
    def model_overrides(self) -> dict:
        out = {"vocab_size": self.vocab_size, "head": self.head, "causal": self.causal}
        if self.head == "classify":
            out.update(n_classes=self.n_classes, pool="first")
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        if self.train_size:
            pool = self.generate(self.train_size, derived_seed(self.seed, "train"), "train")
            self.data["train"] = TensorDataset(*pool)
        self.data["val"] = TensorDataset(*self.generate(self.test_size, derived_seed(self.seed, "val"), "val"))
        for name, tensors in self.test_splits().items():
            self.data[name] = TensorDataset(*tensors)

    def train_batch(self, step: int, rank: int | None = None, world: int | None = None):
        """The (tokens, targets) batch of optimizer step ``step`` on DDP rank ``rank`` of ``world``
        (default: the attached trainer's, else 0 of 1): a function of (seed, step, rank) alone."""
        trainer = getattr(self, "trainer", None)
        rank = rank if rank is not None else (trainer.global_rank if trainer is not None else 0)
        world = world if world is not None else (trainer.world_size if trainer is not None else 1)
        B = self.batch_size
        if not self.train_size:  # fresh examples, never repeated
            return self.generate(B, derived_seed(self.seed, "train", step, rank), "train")
        self.setup()
        N = self.train_size
        first = (step * world + rank) * B  # position in the endless sequence of shuffled passes
        idx = torch.tensor([self._perm(g // N)[g % N] for g in range(first, first + B)])
        return tuple(t[idx] for t in self.data["train"].tensors)

    def _perm(self, n_pass: int) -> torch.Tensor:
        if n_pass not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= n_pass - 1}  # keep the last two
            g = torch.Generator().manual_seed(derived_seed(self.seed, "pass", n_pass))
            self._perms[n_pass] = torch.randperm(self.train_size, generator=g)
        return self._perms[n_pass]

    def train_dataloader(self) -> DataLoader:
        # batches come whole from StepBatches (batch_size=None); generated in the main process
        return DataLoader(StepBatches(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data["val"], batch_size=self.batch_size, num_workers=self.num_workers)

    def test_names(self) -> list[str]:
        return [n for n in self.data if n not in ("train", "val")]

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.data[n], batch_size=self.batch_size, num_workers=self.num_workers)
                for n in self.test_names()]
