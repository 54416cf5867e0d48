"""In-memory `BatchSource`s: whole examples for fine-tuning (`ExampleBatches`), and random next-token windows from
a tensor of token ids (`TokenBatches`: for tokens a program made, as tests and benchmarks do).

Pretraining draws random windows from prepared token files (`pretrain.LMBatches`). Fine-tuning instead walks a
list of examples — classified texts, instruction records, preference pairs — in epochs: each epoch is a
fresh seeded permutation, and a `collate` function turns the chosen examples into tensors. The data position
(epoch, offset into the permutation) is the state `--resume` restores, so a resumed run sees the very next
batch.
"""

from __future__ import annotations

import abc
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


class WindowBatches(abc.ABC):
    """Random next-token windows, x (B, T) and y = x shifted by one, in seeded streams: the base of `TokenBatches`
    (tokens in memory) and `pretrain.LMBatches` (prepared token files), which say where windows come from
    (`_draw`).

    `next("train")` draws from the "train" tokens with a generator seeded with `seed`, whose state is the data
    position (`state_dict`), so a resumed run sees the very next batch. `next("eval_train")` and
    `next("eval_val")` draw from the "train" and "val" tokens with generators of their own that restart at
    `reset_eval()`, so evaluations see the same windows every time."""

    def __init__(self, batch_size: int, context_length: int, seed: int = 0, device: str | torch.device = "cpu"):
        self.batch_size, self.context_length, self.seed = batch_size, context_length, seed
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.reset_eval()

    @abc.abstractmethod
    def _draw(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` windows of the `split` ("train" | "val") tokens at starts drawn from `generator`."""

    def reset_eval(self) -> None:
        self.eval_generators = {name: torch.Generator().manual_seed(self.seed + 1 + i)
                                for i, name in enumerate(("train", "val"))}

    def next(self, split: str):
        if split == "train":
            return self._draw("train", self.generator)
        name = split.removeprefix("eval_")
        return self._draw(name, self.eval_generators[name])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class TokenBatches(WindowBatches):
    """Random windows from 1-D tensors of token ids held in memory (`WindowBatches`' streams): "train" windows come
    from `tokens`, "val" ones from `val` (default: `tokens`); batches are moved to `device`."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, context_length: int, seed: int = 0,
                 device: str | torch.device = "cpu", val: torch.Tensor | None = None):
        self.data = {"train": tokens.long().flatten(), "val": (val if val is not None else tokens).long().flatten()}
        for name, data in self.data.items():
            if len(data) < context_length + 1:
                raise ValueError(f"{name} has {len(data)} tokens, fewer than one window of {context_length + 1}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        super().__init__(batch_size, context_length, seed, device)

    def _draw(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.data[split]
        starts = torch.randint(len(data) - self.context_length, (self.batch_size,), generator=generator)
        windows = data[starts[:, None] + torch.arange(self.context_length + 1)]  # (B, T + 1)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        return x.to(self.device), y.to(self.device)
