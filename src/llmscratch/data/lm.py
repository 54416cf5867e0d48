"""Language-model data: next-token (input, target) pairs from a token stream.

Two forms of the same idea. `SlidingWindowDataset` is the book's chapter-2 dataset: windows over an
in-memory list of ids, walked in order by a DataLoader. `prepare_tokens` + `TokenMemmap` is the form that
scales (as in nanoGPT): the corpus is tokenized once into flat binary files and training samples random
windows straight from a memory map, so a corpus larger than RAM costs nothing to open.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from llmscratch.data.corpora import Continuation
from llmscratch.errors import UserError
from llmscratch.runs import TOKEN_SPLITS, TOKENS_META, token_file
from llmscratch.tokenizer.base import Tokenizer

__all__ = [
    "SPLITS",
    "SlidingWindowDataset",
    "TokenMemmap",
    "TokenMeta",
    "create_dataloader",
    "prepare_tokens",
    "read_meta",
]

SPLITS = TOKEN_SPLITS  # ("train", "val")


# ---------------------------------------------------------------------------------------------------------
# the book's sliding window


def _as_id_tensor(token_ids) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        return token_ids.reshape(-1).to(torch.long)
    return torch.as_tensor(np.asarray(token_ids, dtype=np.int64).reshape(-1))


class SlidingWindowDataset(Dataset):
    """Windows of `max_length` ids starting every `stride` ids; the target is the input shifted by one.

    ``stride == max_length`` gives non-overlapping windows (the book's training setting); a smaller stride
    overlaps them. Windows are views into one tensor, made on access rather than stored like the book's
    lists, so memory stays one copy of the ids.
    """

    def __init__(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise UserError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.ids = _as_id_tensor(token_ids)
        self.max_length = max_length
        self.stride = stride
        n = len(self.ids)
        if n < max_length + 1:
            raise UserError(
                f"the corpus has {n} tokens but one window of context {max_length} needs {max_length + 1} "
                "(inputs plus the shifted target); use a smaller context length or more text"
            )
        # the book's range(0, n - max_length, stride): every start whose target still fits
        self._count = len(range(0, n - max_length, stride))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(f"window {index} out of range for {self._count} windows")
        start = index * self.stride
        chunk = self.ids[start : start + self.max_length + 1]
        return chunk[:-1], chunk[1:]  # (T,), (T,)


def create_dataloader(
    token_ids: Sequence[int] | np.ndarray | torch.Tensor,
    batch_size: int,
    max_length: int,
    stride: int,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader over `SlidingWindowDataset` yielding (inputs, targets), each (batch_size, max_length).

    `generator` seeds the shuffle order, so a run can be repeated exactly.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    dataset = SlidingWindowDataset(token_ids, max_length, stride)
    if drop_last and len(dataset) < batch_size:
        # with drop_last the loader would silently yield nothing and training would do zero steps
        raise UserError(
            f"only {len(dataset)} windows (context {max_length}, stride {stride}) fit in {len(dataset.ids)} "
            f"tokens, fewer than batch_size {batch_size}; lower the batch size, stride or context, or add text"
        )
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                      generator=generator)


# ---------------------------------------------------------------------------------------------------------
# token files: prepare once, sample windows from a memory map


@dataclass
class TokenMeta:
    """The `meta.json` beside `train.bin` / `val.bin`: how to read them and where they came from."""

    dtype: str  # numpy dtype of the .bin files: "uint16", or "uint32" when ids do not fit in 16 bits
    vocab_size: int  # tokenizer vocabulary size; every id is below it
    train_tokens: int  # length of train.bin in tokens
    val_tokens: int  # length of val.bin in tokens
    eos_id: int | None  # id put between documents, None when the tokenizer has no end-of-text token
    chunk_tokens: int  # the stream was cut into chunks of this many tokens before the train/val draw
    val_fraction: float  # requested share of chunks sent to val
    seed: int  # seed of the chunk draw
    documents: int  # number of non-empty documents tokenized
    source: str | None = None  # free text naming the corpus, e.g. the --data value
    tokenizer: str | None = None  # tokenizer class name, as a hint when the files are reused

    def num_tokens(self, split: str) -> int:
        return self.train_tokens if split == "train" else self.val_tokens


def _dtype_for(vocab_size: int) -> np.dtype:
    # ids run 0..vocab_size-1; 16 bits halve the files and the page-cache footprint for GPT-2's 50257
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_meta(directory: str | Path) -> TokenMeta:
    """Parse and check `directory/meta.json`; UserError naming the file and field on any problem."""
    path = Path(directory) / TOKENS_META
    redo = "re-run the token preparation to rewrite it"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; prepare the corpus into {path.parent} first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); {redo}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}); {redo}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object; {redo}")
    known = {f.name for f in fields(TokenMeta)}
    required = {f.name for f in fields(TokenMeta) if f.default is not None}
    missing = sorted(required - raw.keys())
    if missing:
        raise UserError(f"{path}: missing field(s) {', '.join(missing)}; {redo}")
    meta = TokenMeta(**{k: v for k, v in raw.items() if k in known})
    if meta.dtype not in ("uint16", "uint32"):
        raise UserError(f"{path}: field dtype is {meta.dtype!r}, expected 'uint16' or 'uint32'; {redo}")
    for name in ("vocab_size", "train_tokens", "val_tokens", "chunk_tokens"):
        value = getattr(meta, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{path}: field {name} must be a non-negative integer, got {value!r}; {redo}")
    return meta


class _Encoder:
    """Per-process tokenizing state: a pool worker gets its own copy of the tokenizer once, not per task."""

    tokenizer: Tokenizer | None = None
    dtype: np.dtype = np.dtype(np.uint16)
    tasks: int = 0


def _init_worker(tokenizer: Tokenizer, dtype: np.dtype) -> None:
    _Encoder.tokenizer = tokenizer
    _Encoder.dtype = dtype


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None under another C library."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


# Tasks between two `_release_free_memory` calls: each costs a few page faults later, every task ~5% of the speed.
_TRIM_EVERY = 4


def _release_free_memory() -> None:
    """Hand the heap's free memory back to the OS. Tokenizing churns through megabyte-sized strings and arrays;
    glibc keeps much of what they free inside the heap, where it still counts as resident, and over a gigabyte of
    text that grows by a few hundred megabytes per process (benchmarks/prepare_memory.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _encode_many(texts: list[str]) -> tuple[list[np.ndarray], int]:
    """The ids of each text, and the texts' total UTF-8 bytes (for the progress bar)."""
    _Encoder.tasks += 1
    if _Encoder.tasks % _TRIM_EVERY == 0:
        _release_free_memory()  # what the previous tasks freed
    tokenizer = _Encoder.tokenizer
    out = []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            bad = int(ids.max() if ids.max() >= tokenizer.vocab_size else ids.min())
            raise ValueError(
                f"{type(tokenizer).__name__} produced id {bad} outside [0, {tokenizer.vocab_size})"
            )
        out.append(ids.astype(_Encoder.dtype))
    # surrogatepass: a lone surrogate (from a JSON "\ud800" escape) is text the tokenizers accept
    return out, sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


# The most text sent to a worker as one task: about the size of a large file's pieces (corpora._PIECE_BYTES).
_TASK_CHARS = 1 << 20


def _tasks(documents: Iterable[str], target: int) -> Iterator[list[str]]:
    """Consecutive documents grouped until a group holds `target` characters (order kept), read as needed."""
    group, size = [], 0
    for document in documents:
        group.append(document)
        size += len(document)
        if size >= target:
            yield group
            group, size = [], 0
    if group:
        yield group


def _auto_workers(documents: Iterable[str], size: int | None, num_workers: int | None) -> int:
    """`num_workers`, else all cores, or one for a corpus known to be under ~1 MB; at most one per document of a
    list."""
    if num_workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # under ~1 MB, starting processes costs more than tokenizing (tiktoken does several MB/s per core)
        num_workers = 1 if size is not None and size < 1_000_000 else cpus
    if isinstance(documents, Sequence):
        num_workers = min(num_workers, len(documents))
    return max(1, num_workers)


def _usable_workers(tokenizer: Tokenizer, workers: int) -> int:
    """`workers`, or 1 when the tokenizer cannot be pickled to send to other processes."""
    if workers > 1:
        try:
            pickle.dumps(tokenizer)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means: no pool
            warnings.warn(f"{type(tokenizer).__name__} cannot be pickled ({exc}); tokenizing in one process",
                          stacklevel=3)
            return 1
    return workers


def _continues(task: list[str]) -> list[bool]:
    return [isinstance(text, Continuation) for text in task]


def _in_order(pool, tasks: Iterator[list[str]], depth: int) -> Iterator[tuple[list[bool], tuple]]:
    """(`_continues(task)`, `_encode_many(task)`) for each task, run by `pool` with at most `depth` tasks in
    flight. `Pool.imap` would not do: its feeder thread reads the whole iterator ahead, the corpus into memory."""
    pending: deque = deque()
    for task in tasks:
        pending.append((_continues(task), pool.apply_async(_encode_many, (task,))))
        if len(pending) >= depth:
            flags, result = pending.popleft()
            yield flags, result.get()
    while pending:
        flags, result = pending.popleft()
        yield flags, result.get()


@contextmanager
def _encoded(tasks: Iterator[list[str]], tokenizer: Tokenizer, dtype: np.dtype, workers: int) -> Iterator:
    """Yield the tasks' (continues flags, (ids arrays, bytes)) in order: from a pool of `workers` processes, two
    tasks each in flight (stopped at once if the caller fails), or from this process."""
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context().Pool(workers, _init_worker, (tokenizer, dtype))
        results = _in_order(pool, tasks, 2 * workers)
    else:
        _init_worker(tokenizer, dtype)
        results = ((_continues(task), _encode_many(task)) for task in tasks)
    try:
        yield results
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    else:
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        _Encoder.tokenizer = None


class _StreamWriter:
    """Appends documents' ids to the stream file, the eos id between documents when there is one (none before a
    `Continuation`); an empty document is skipped, as it would leave two eos ids in a row."""

    def __init__(self, stream, eos: np.ndarray | None):
        self.stream, self.eos = stream, eos
        self.documents = 0  # documents with tokens
        self.seen = 0  # documents read, empty ones included
        self.tokens = 0  # ids in the stream, eos ids included
        self.open = False  # the current document has tokens in the stream

    def write(self, continues: bool, ids: np.ndarray) -> None:
        if not continues:
            self.seen += 1
            self.open = False
        if ids.size == 0:
            return
        if not self.open:
            if self.documents and self.eos is not None:
                self.eos.tofile(self.stream)
                self.tokens += 1
            self.documents += 1
            self.open = True
        ids.tofile(self.stream)
        self.tokens += ids.size


def _write_stream(documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype, workers: int, path: Path,
                  size: int | None, progress: bool) -> _StreamWriter:
    """Tokenize `documents` into one stream of ids at `path` (see `_StreamWriter`), reading them as the workers
    need them; `size`: their estimated UTF-8 bytes, for the task size and the progress bar."""
    eos = np.array([tokenizer.eos_id], dtype=dtype) if tokenizer.eos_id is not None else None
    target = _TASK_CHARS if size is None else max(1, min(_TASK_CHARS, size // (4 * workers)))
    with (open(path, "wb") as stream,
          tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
               disable=not progress) as bar,
          _encoded(_tasks(documents, target), tokenizer, dtype, workers) as results):
        writer = _StreamWriter(stream, eos)
        start = time.perf_counter()
        for task, (flags, (arrays, nbytes)) in enumerate(results, 1):
            for continues, ids in zip(flags, arrays):
                writer.write(continues, ids)
            if task % _TRIM_EVERY == 0:
                del arrays
                _release_free_memory()
            rate = writer.tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{tqdm.format_sizeof(writer.tokens)} tokens, {tqdm.format_sizeof(rate)} tok/s",
                                refresh=False)
            bar.update(nbytes)
        if bar.total is not None:  # `size` was an estimate: end the bar at what was read
            bar.total = bar.n
    return writer


def _val_chunks(n_tokens: int, chunk: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which chunks of `chunk` tokens go to val: a seeded draw of round(val_fraction * chunks), at least one
    when val_fraction > 0, never all."""
    n_chunks = math.ceil(n_tokens / chunk)
    n_val = 0
    if val_fraction > 0 and n_chunks > 1:
        n_val = min(n_chunks - 1, max(1, round(val_fraction * n_chunks)))
    is_val = np.zeros(n_chunks, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_chunks, size=n_val, replace=False)] = True
    return is_val


def _write_splits(stream_path: Path, dtype: np.dtype, chunk: int, is_val: np.ndarray, folder: Path) -> dict:
    """Copy the stream's chunks into the split files in `folder`; returns {split: tokens}.

    The stream is read once, in order, a few megabytes at a time: plain reads leave it in the page cache, where a
    memory map of it would count its every page in this process's resident memory."""
    chunk_bytes = chunk * dtype.itemsize
    per_read = max(1, (4 << 20) // chunk_bytes)  # chunks per read
    with (open(stream_path, "rb") as stream, open(folder / token_file("train"), "wb") as train,
          open(folder / token_file("val"), "wb") as val):
        for first in range(0, len(is_val), per_read):
            block = memoryview(stream.read(per_read * chunk_bytes))
            for j, to_val in enumerate(is_val[first:first + per_read]):
                (val if to_val else train).write(block[j * chunk_bytes:(j + 1) * chunk_bytes])
        return {"train": train.tell() // dtype.itemsize, "val": val.tell() // dtype.itemsize}


def _publish(tmp: Path, out_dir: Path, meta: TokenMeta) -> None:
    """Move the split files from `tmp` into `out_dir` with their meta file, which goes first (removed) and last
    (written), so a reader never pairs old meta with new token files."""
    (tmp / TOKENS_META).write_text(json.dumps(asdict(meta), indent=2) + "\n", encoding="utf-8")
    (out_dir / TOKENS_META).unlink(missing_ok=True)
    for name in (*map(token_file, SPLITS), TOKENS_META):
        os.replace(tmp / name, out_dir / name)


def prepare_tokens(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1,
                   seed: int = 0, num_workers: int | None = None, chunk_tokens: int | None = None,
                   source: str | None = None, progress: bool = True, size_bytes: int | None = None) -> TokenMeta:
    """Tokenize `documents` into `out_dir/train.bin`, `val.bin` and `meta.json`; returns the meta.

    `documents`: a list, or any iterable read once and lazily (`corpora.iter_corpus`): they are tokenized a
    megabyte at a time, so memory stays bounded whatever the corpus's size. They are encoded in order, joined by
    the tokenizer's eos id when it has one (none before a `corpora.Continuation`, the next piece of the same
    file), into one stream. The stream is cut into chunks of `chunk_tokens` (default: ~1% of the stream,
    clamped to 64..4096) and a seeded draw sends round(val_fraction * chunks) of them, at least one, to val.
    Random chunks rather than the tail: on a small corpus the tail is one topic (the stdlib corpus ends with the
    language reference), so a tail split measures a different distribution from the one trained on.

    `num_workers` processes tokenize in parallel (None: all cores, or one when the corpus is known to be under
    ~1 MB); the tokenizer is sent to each once, so it must pickle, else the work runs in this process.
    `size_bytes`: the corpus's estimated size (a list's is measured), for that choice and the progress bar
    (MB/s and tokens/s). The files appear only when complete: they are written to a temporary folder inside
    `out_dir` and renamed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise UserError(f"chunk_tokens must be positive, got {chunk_tokens}")
    out_dir = Path(out_dir)
    dtype = _dtype_for(tokenizer.vocab_size)
    if size_bytes is None and isinstance(documents, Sequence):
        size_bytes = sum(len(d) for d in documents)
    workers = _usable_workers(tokenizer, _auto_workers(documents, size_bytes, num_workers))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        stream = tmp / "stream.bin"  # all documents' ids, before the split
        written = _write_stream(documents, tokenizer, dtype, workers, stream, size_bytes, progress)
        n_tokens = written.tokens
        if n_tokens == 0:
            raise UserError(f"the corpus for {out_dir} tokenized to no tokens ({written.seen} documents, all "
                            "empty); pass text with content")
        chunk = chunk_tokens or min(4096, max(64, n_tokens // 100))
        counts = _write_splits(stream, dtype, chunk, _val_chunks(n_tokens, chunk, val_fraction, seed), tmp)
        meta = TokenMeta(dtype=dtype.name, vocab_size=tokenizer.vocab_size, train_tokens=counts["train"],
                         val_tokens=counts["val"], eos_id=tokenizer.eos_id, chunk_tokens=chunk,
                         val_fraction=val_fraction, seed=seed, documents=written.documents, source=source,
                         tokenizer=type(tokenizer).__name__)
        _publish(tmp, out_dir, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


class TokenMemmap:
    """One split of a prepared token folder, memory-mapped; samples random training windows.

    `TokenMemmap("out/tokens", "train").get_batch(8, 256, generator)` gives x, y of shape (8, 256) with
    y[:, t] == x[:, t + 1]: the next-token targets.
    """

    def __init__(self, directory: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.directory = Path(directory)
        self.split = split
        self.meta = read_meta(self.directory)
        self.path = self.directory / token_file(split)
        dtype = np.dtype(self.meta.dtype)
        expected = self.meta.num_tokens(split)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(
                f"{self.path}: not found; prepare the corpus into {self.directory} again"
            ) from None
        if size != expected * dtype.itemsize:
            raise UserError(
                f"{self.path}: {size} bytes, but {TOKENS_META} says {expected} {dtype.name} tokens "
                f"({expected * dtype.itemsize} bytes); the files are from different runs: prepare again"
            )
        # numpy cannot map an empty file; an empty split is legal until someone samples from it
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def get_batch(
        self,
        batch_size: int,
        context_length: int,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        pin: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` windows at uniformly random starts: x (B, T) int64 and y = x shifted by one.

        Start indices come from `torch.randint(..., generator=generator)`, so restoring the generator's
        state (`generator.set_state`) replays the exact batch sequence, e.g. after resuming a run.
        `pin` page-locks the batch first so a copy to a CUDA device can overlap compute.
        """
        n = self.num_tokens
        if n < context_length + 1:
            raise UserError(
                f"{self.path}: the {self.split} split has {n} tokens but a window of context "
                f"{context_length} needs {context_length + 1}; use a smaller context length, more text, or "
                "(for val) a larger val_fraction"
            )
        starts = torch.randint(n - context_length, (batch_size,), generator=generator)  # (B,)
        rows = starts.numpy()[:, None] + np.arange(context_length + 1)  # (B, T+1) positions
        window = torch.from_numpy(self.tokens[rows].astype(np.int64))  # (B, T+1), one gather from the map
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T) each
        device = torch.device(device)
        if device.type == "cuda":
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            return x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
        return x.to(device), y.to(device)
