"""Batches of whole examples (fine-tuning): one `BatchSource` over in-memory train/val lists.

Pretraining draws random windows from a token stream (`pretrain.LMBatches`). Fine-tuning instead walks a
list of examples — classified texts, instruction records, preference pairs — in epochs: each epoch is a
fresh seeded permutation, and a `collate` function turns the chosen examples into tensors. The data position
(epoch, offset into the permutation) is the state `--resume` restores, so a resumed run sees the very next
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class ExampleBatches:
    """`next("train")` walks `train` in seeded shuffled epochs; `next("eval_train"|"eval_val")` walks the first
    examples of `train`/`val` in order, restarting after `reset_eval()` so evaluations are comparable.

    `collate(examples) -> batch` builds the tensors (on `device` if it cares); `drop_last` skips a short final
    training batch, as the book's DataLoaders do.
    """

    def __init__(self, train: Sequence[Any], val: Sequence[Any], collate: Callable[[list], Any], batch_size: int,
                 seed: int = 0, drop_last: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(train) < batch_size if drop_last else not train:
            raise ValueError(f"{len(train)} training examples are fewer than one batch of {batch_size}")
        self.data = {"train": train, "val": val or train}
        self.collate, self.batch_size, self.seed, self.drop_last = collate, batch_size, seed, drop_last
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)
        self.reset_eval()

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.data["train"])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.data["train"]), generator=g).tolist()

    def reset_eval(self) -> None:
        self.eval_offset = {"train": 0, "val": 0}

    def next(self, split: str):
        if split == "train":
            n = len(self._order)
            if self.offset + (self.batch_size if self.drop_last else 1) > n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            ids = self._order[self.offset:self.offset + self.batch_size]
            self.offset += len(ids)
            return self.collate([self.data["train"][i] for i in ids])
        name = split.removeprefix("eval_")
        data, start = self.data[name], self.eval_offset[name]
        if start >= len(data):  # fewer examples than eval batches ask for: wrap around
            start = 0
        chunk = list(data[start:start + self.batch_size])
        self.eval_offset[name] = start + len(chunk)
        return self.collate(chunk)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
