"""Language-model data: the book's sliding window and the prepared token memmaps."""

from __future__ import annotations

import json
import pickle
import re
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscratch.data.lm import (
    SlidingWindowDataset,
    TokenMemmap,
    TokenMeta,
    create_dataloader,
    prepare_tokens,
    read_meta,
)
from llmscratch.errors import UserError
from llmscratch.tokenizer.base import Tokenizer

EOT = "<|endoftext|>"


class ByteTokenizer(Tokenizer):
    """Stand-in tokenizer: one id per UTF-8 byte, plus <|endoftext|> = 256. `offset` shifts the byte ids
    (offset 65536 forces ids past 16 bits)."""

    def __init__(self, offset: int = 0):
        self.offset = offset
        self.special_tokens = {EOT: offset + 256}

    @property
    def vocab_size(self) -> int:
        return self.offset + 257

    def encode(self, text: str, allowed_special: str | set[str] = "all") -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(EOT) if allowed_special else [text]):
            if i:
                ids.append(self.offset + 256)
            ids.extend(self.offset + b for b in part.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if int(i) - self.offset < 256).decode(
            "utf-8", "replace"
        )

    def save(self, directory) -> None:
        raise NotImplementedError


class NoEosTokenizer(ByteTokenizer):
    def __init__(self):
        super().__init__()
        self.special_tokens = {}


class BrokenTokenizer(ByteTokenizer):
    def encode(self, text, allowed_special="all"):
        if "boom" in text:
            raise RuntimeError("tokenizer failed")
        return super().encode(text, allowed_special)


DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7) for i in range(40)] + [
    ""
]


def _stream(documents, tokenizer) -> list[int]:
    """What prepare_tokens should store: the non-empty documents' ids joined by eos."""
    out: list[int] = []
    for doc in filter(None, (tokenizer.encode(d) for d in documents)):
        if out and tokenizer.eos_id is not None:
            out.append(tokenizer.eos_id)
        out.extend(doc)
    return out


def _chunks(ids, size) -> Counter:
    ids = list(map(int, ids))
    return Counter(tuple(ids[i : i + size]) for i in range(0, len(ids), size))


def _split_ids(directory: Path, split: str) -> np.ndarray:
    meta = read_meta(directory)
    return np.fromfile(directory / f"{split}.bin", dtype=meta.dtype)


# --- sliding window --------------------------------------------------------------------------------------


def _book_windows(ids, max_length, stride):
    """Chapter 2's GPTDatasetV1 loop, for reference."""
    return [
        (ids[i : i + max_length], ids[i + 1 : i + max_length + 1])
        for i in range(0, len(ids) - max_length, stride)
    ]


def test_sliding_window_shapes_stride_and_shift():
    ids = list(range(20))
    ds = SlidingWindowDataset(ids, max_length=4, stride=4)
    assert len(ds) == 4
    x, y = ds[1]
    assert x.dtype == torch.long and x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]
    assert ds[-1][0].tolist() == [12, 13, 14, 15]
    with pytest.raises(IndexError):
        ds[4]
    assert len(SlidingWindowDataset(ids, max_length=4, stride=1)) == 16


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), max_length=st.integers(1, 12), stride=st.integers(1, 12))
def test_sliding_window_matches_the_book(n, max_length, stride):
    ids = list(range(100, 100 + n))
    if n < max_length + 1:
        with pytest.raises(UserError):
            SlidingWindowDataset(ids, max_length, stride)
        return
    ds = SlidingWindowDataset(np.array(ids), max_length, stride)
    got = [(x.tolist(), y.tolist()) for x, y in ds]
    assert got == _book_windows(ids, max_length, stride)


def test_sliding_window_too_short_says_how_many_tokens():
    with pytest.raises(UserError, match=r"has 4 tokens but one window of context 4 needs 5.*smaller context"):
        SlidingWindowDataset([1, 2, 3, 4], max_length=4, stride=1)


def test_dataloader_batches_and_reproducible_shuffle():
    ids = torch.arange(1000)
    loader = create_dataloader(ids, batch_size=8, max_length=16, stride=16, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(loader) == len(range(0, 1000 - 16, 16)) // 8

    def order(seed):
        gen = torch.Generator().manual_seed(seed)
        return [x[:, 0].tolist() for x, _ in create_dataloader(ids, 4, 8, 8, shuffle=True, generator=gen)]

    assert order(1) == order(1) != order(2)


def test_dataloader_with_fewer_windows_than_a_batch():
    with pytest.raises(UserError, match=r"only 2 windows .* fewer than batch_size 4"):
        create_dataloader(list(range(20)), batch_size=4, max_length=8, stride=8)
    loader = create_dataloader(list(range(20)), batch_size=4, max_length=8, stride=8, drop_last=False)
    assert [x.shape[0] for x, _ in loader] == [2]


# --- prepare_tokens --------------------------------------------------------------------------------------


def test_prepare_round_trip(tmp_path):
    tok = ByteTokenizer()
    meta = prepare_tokens(
        DOCS,
        tok,
        tmp_path,
        val_fraction=0.2,
        seed=3,
        chunk_tokens=64,
        source="unit",
        num_workers=1,
        progress=False,
    )
    stream = _stream(DOCS, tok)
    assert meta.dtype == "uint16" and meta.vocab_size == 257 and meta.eos_id == 256
    assert meta.train_tokens + meta.val_tokens == len(stream)
    assert meta.documents == 40 and meta.source == "unit" and meta.chunk_tokens == 64
    assert read_meta(tmp_path) == meta
    train, val = _split_ids(tmp_path, "train"), _split_ids(tmp_path, "val")
    assert (len(train), len(val)) == (meta.train_tokens, meta.val_tokens)
    assert _chunks(train, 64) + _chunks(val, 64) == _chunks(stream, 64)
    n_chunks = -(-len(stream) // 64)
    assert sum(_chunks(val, 64).values()) == round(0.2 * n_chunks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_val_chunks_are_drawn_at_random_not_the_tail(tmp_path):
    tok = ByteTokenizer()
    vals = set()
    for seed in range(4):
        prepare_tokens(
            DOCS, tok, tmp_path / str(seed), seed=seed, chunk_tokens=32, num_workers=1, progress=False
        )
        vals.add(_split_ids(tmp_path / str(seed), "val").tobytes())
    stream = np.array(_stream(DOCS, tok), dtype=np.uint16)
    assert len(vals) == 4
    assert stream[-len(stream) // 10 :].tobytes() not in vals


def test_prepare_without_eos_and_default_chunks(tmp_path):
    tok = NoEosTokenizer()
    meta = prepare_tokens(["ab", "cd"], tok, tmp_path, progress=False)
    assert meta.eos_id is None
    assert meta.train_tokens + meta.val_tokens == 4  # no separator
    # a stream shorter than two chunks cannot give val anything without leaving train empty
    assert meta.val_tokens == 0 and meta.chunk_tokens == 64


def test_prepare_uses_uint32_for_large_vocabularies(tmp_path):
    tok = ByteTokenizer(offset=1 << 16)
    meta = prepare_tokens(DOCS, tok, tmp_path, chunk_tokens=64, progress=False)
    assert meta.dtype == "uint32"
    assert (tmp_path / "train.bin").stat().st_size == 4 * meta.train_tokens
    ids = np.concatenate([_split_ids(tmp_path, "train"), _split_ids(tmp_path, "val")])
    assert ids.min() >= 1 << 16
    assert sorted(ids.tolist()) == sorted(_stream(DOCS, tok))


def test_multiprocess_equals_single_process(tmp_path):
    tok = ByteTokenizer()
    pickle.dumps(tok)  # so the pool is really used
    one = prepare_tokens(DOCS, tok, tmp_path / "one", num_workers=1, chunk_tokens=50, progress=False)
    two = prepare_tokens(DOCS, tok, tmp_path / "two", num_workers=2, chunk_tokens=50, progress=False)
    assert one == two
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_prepare_empty_stream_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenized to no tokens"):
        prepare_tokens(["", ""], ByteTokenizer(), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_prepare_keeps_the_previous_files(tmp_path, workers):
    prepare_tokens(DOCS, ByteTokenizer(), tmp_path, chunk_tokens=64, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        prepare_tokens([*DOCS, "boom"], BrokenTokenizer(), tmp_path, num_workers=workers, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp folder left either


def test_prepare_rejects_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="val_fraction"):
        prepare_tokens(DOCS, ByteTokenizer(), tmp_path, val_fraction=1.0)
    with pytest.raises(UserError, match="chunk_tokens"):
        prepare_tokens(DOCS, ByteTokenizer(), tmp_path, chunk_tokens=0)


# --- TokenMemmap -----------------------------------------------------------------------------------------


def _write_counting_folder(directory: Path, n_train: int, n_val: int = 0) -> None:
    """Token files whose ids are their positions, so every window is recognisable."""
    directory.mkdir(parents=True, exist_ok=True)
    np.arange(n_train, dtype=np.uint16).tofile(directory / "train.bin")
    np.arange(n_val, dtype=np.uint16).tofile(directory / "val.bin")
    meta = TokenMeta(
        dtype="uint16",
        vocab_size=65536,
        train_tokens=n_train,
        val_tokens=n_val,
        eos_id=None,
        chunk_tokens=64,
        val_fraction=0.0,
        seed=0,
        documents=1,
    )
    (directory / "meta.json").write_text(json.dumps(asdict(meta)))


def test_get_batch_windows_and_shift(tmp_path):
    _write_counting_folder(tmp_path, 5000)
    data = TokenMemmap(tmp_path, "train")
    assert data.num_tokens == 5000
    x, y = data.get_batch(6, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # next-token targets
    assert torch.equal(x - x[:, :1], torch.arange(32).expand(6, 32))  # each row is one contiguous window
    assert int(y.max()) <= 4999


def test_get_batch_replays_from_a_saved_generator_state(tmp_path):
    _write_counting_folder(tmp_path, 5000)
    data = TokenMemmap(tmp_path)
    gen = torch.Generator().manual_seed(123)
    data.get_batch(4, 16, gen)
    state = gen.get_state()
    first = [data.get_batch(4, 16, gen) for _ in range(3)]
    gen.set_state(state)
    again = [data.get_batch(4, 16, gen) for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], first[1][0])


def test_get_batch_exact_fit_and_too_long(tmp_path):
    _write_counting_folder(tmp_path, 17, n_val=0)
    x, y = TokenMemmap(tmp_path).get_batch(3, 16, torch.Generator().manual_seed(0))
    assert x[:, 0].tolist() == [0, 0, 0] and y[:, -1].tolist() == [16, 16, 16]
    with pytest.raises(UserError, match=r"train split has 17 tokens but a window of context 17 needs 18"):
        TokenMemmap(tmp_path).get_batch(1, 17)
    with pytest.raises(UserError, match=r"val split has 0 tokens"):
        TokenMemmap(tmp_path, "val").get_batch(1, 4)


def test_prepared_folder_feeds_get_batch(tmp_path):
    tok = ByteTokenizer()
    prepare_tokens(DOCS, tok, tmp_path, chunk_tokens=64, progress=False)
    x, y = TokenMemmap(tmp_path, "val").get_batch(2, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) <= 256


def test_memmap_bad_folders(tmp_path):
    with pytest.raises(UserError, match=r"meta\.json: not found"):
        TokenMemmap(tmp_path)
    _write_counting_folder(tmp_path, 100)
    with pytest.raises(UserError, match="split must be one of train, val"):
        TokenMemmap(tmp_path, "test")
    (tmp_path / "meta.json").write_text('{"dtype": "uint16", ')
    with pytest.raises(UserError, match=r"meta\.json: not valid JSON \(line 1, column 21\)"):
        TokenMemmap(tmp_path)
    (tmp_path / "meta.json").write_text('{"dtype": "uint16"}')
    with pytest.raises(UserError, match=r"meta\.json: missing field\(s\) chunk_tokens, documents, eos_id"):
        TokenMemmap(tmp_path)
    _write_counting_folder(tmp_path, 100)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "dtype": "int8"}))
    with pytest.raises(UserError, match=r"field dtype is 'int8'"):
        TokenMemmap(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "train_tokens": 99}))
    with pytest.raises(UserError, match=r"train\.bin: 200 bytes, but meta\.json says 99 uint16 tokens"):
        TokenMemmap(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "train.bin").unlink()
    with pytest.raises(UserError, match=r"train\.bin: not found"):
        TokenMemmap(tmp_path)


# --- streaming prepare: any iterable, pieces of a file, bounded reading, progress, --text-field -----------------


def _files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_generator_of_documents_gives_the_same_files_as_the_list(tmp_path, workers):
    tok = ByteTokenizer()
    prepare_tokens(DOCS, tok, tmp_path / "list", num_workers=1, chunk_tokens=50, progress=False)
    prepare_tokens((d for d in DOCS), tok, tmp_path / "gen", num_workers=workers, chunk_tokens=50, progress=False)
    assert _files(tmp_path / "gen") == _files(tmp_path / "list")


def test_a_continuation_joins_its_document_without_eos(tmp_path):
    from llmscratch.data.corpora import Continuation

    docs = ["ab", Continuation("cd"), "", Continuation(""), "ef", Continuation("g")]
    meta = prepare_tokens(docs, ByteTokenizer(), tmp_path, val_fraction=0.0, progress=False)
    assert meta.documents == 2
    assert _split_ids(tmp_path, "train").tolist() == [*b"abcd", 256, *b"efg"]


def _bpe(pattern: str):
    from llmscratch.tokenizer import BPETokenizer, TiktokenTokenizer

    sample = "It's 12,345 km from Zürich to 東京 — isn't it? The quick brown fox.\n" * 50
    trained = BPETokenizer.train(sample, 300, progress=False)
    return TiktokenTokenizer(trained.ranks, trained.special_tokens, pattern)


@pytest.mark.parametrize("pattern", ["gpt2", "llama3"])
def test_a_file_read_in_pieces_gives_the_ids_of_the_whole_file(tmp_path, pattern):
    from llmscratch.data.corpora import Continuation, iter_corpus
    from llmscratch.tokenizer.gpt2 import GPT2_PATTERN
    from llmscratch.tokenizer.llama3 import LLAMA3_PATTERN

    tok = _bpe(GPT2_PATTERN if pattern == "gpt2" else LLAMA3_PATTERN)
    lines = ["It's 12,345 km from Zürich to 東京 — isn't it?", "  indented,  spaced  ", "", "end.\r", "x y"]
    text = "".join(f"{lines[i % 5]} {i}\n" for i in range(48_000))  # ~1.4 MB
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    corpus = iter_corpus(tmp_path / "big.txt")
    assert any(isinstance(piece, Continuation) for piece in corpus)
    prepare_tokens(corpus, tok, tmp_path / "pieces", num_workers=2, progress=False, size_bytes=corpus.nbytes)
    prepare_tokens([text], tok, tmp_path / "whole", num_workers=1, progress=False)
    assert _files(tmp_path / "pieces") == _files(tmp_path / "whole")
    assert read_meta(tmp_path / "pieces").documents == 1


class CountingByteTokenizer(ByteTokenizer):
    """Bytes as ids (fast: no Python loop), recording how many documents the source had given at each call."""

    def __init__(self, source_state: dict):
        super().__init__()
        self.state = source_state
        self.encoded = 0

    def encode(self, text, allowed_special="all"):
        self.state["ahead"] = max(self.state["ahead"], self.state["pulled"] - self.encoded)
        self.encoded += 1
        return list(text.encode())


@pytest.mark.parametrize("size", [100_000, 200_000, 300_000])
def test_documents_are_read_as_the_tokenizer_needs_them(tmp_path, size):
    import math

    from llmscratch.data.lm import _TASK_CHARS

    state = {"pulled": 0, "ahead": 0}

    def documents():
        for i in range(40):
            state["pulled"] += 1
            yield chr(ord("a") + i % 26) * size

    tok = CountingByteTokenizer(state)
    meta = prepare_tokens(documents(), tok, tmp_path / "lazy", num_workers=1, progress=False)
    assert state["pulled"] == 40 and meta.documents == 40
    # exactly one task (~1 MiB of text) is read ahead of the tokenizer — the documents that fill it: 11 of 100 KB,
    # 6 of 200 KB, 4 of 300 KB — never all 40
    lazy_ahead = state["ahead"]
    assert lazy_ahead == math.ceil(_TASK_CHARS / size) < 40
    # the measurement sees read-ahead when there is some: the same documents drawn in full first count as 40 ahead
    state.update(pulled=0, ahead=0)
    prepare_tokens(list(documents()), CountingByteTokenizer(state), tmp_path / "eager", num_workers=1,
                   progress=False)
    assert state["ahead"] == 40 > lazy_ahead


def test_the_progress_bar_shows_megabytes_and_tokens_per_second(tmp_path, capsys):
    text = "héllo wörld " * 2000
    prepare_tokens([text], ByteTokenizer(), tmp_path, num_workers=1, progress=True)
    bar = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]
    nbytes = len(text.encode())
    assert bar.startswith("tokenizing: 100%"), bar
    assert f"{nbytes / 1000:.1f}k/{nbytes / 1000:.1f}k" in bar, bar  # UTF-8 bytes, not characters
    assert re.search(r"[\d.]+[kMG]?B/s", bar) and re.search(rf"{nbytes / 1000:.1f}k tokens, [\d.]+[kMG]? tok/s",
                                                            bar), bar


def test_prepare_cli_reads_the_text_field_of_jsonl(tmp_path, capsys):
    from clitools import run

    from llmscratch.tokenizer import BPETokenizer

    BPETokenizer.train("hello world, the body of a record\n" * 20, 280, progress=False).save(tmp_path / "tok")
    records = [{"body": f"record {i}: hello world", "text": "not this"} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    code, out, err = run(["prepare", "--data", tmp_path / "d.jsonl", "--tokenizer", tmp_path / "tok", "--out",
                          tmp_path / "data", "--text-field", "body"], capsys)
    assert code == 0, err
    meta = read_meta(tmp_path / "data")
    assert meta.documents == 30 and meta.source == str(tmp_path / "d.jsonl")
    ids = np.concatenate([_split_ids(tmp_path / "data", "train"), _split_ids(tmp_path / "data", "val")])
    eos = meta.eos_id
    assert (ids == eos).sum() == 29  # one between each two records


def test_prepare_cli_refuses_parquet_without_pyarrow_in_one_line(tmp_path, capsys, monkeypatch):
    from clitools import assert_user_error, run

    from llmscratch.tokenizer import BPETokenizer

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    BPETokenizer.train("hello world\n" * 20, 270, progress=False).save(tmp_path / "tok")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    code, _, err = run(["prepare", "--data", tmp_path / "d.parquet", "--tokenizer", tmp_path / "tok", "--out",
                        tmp_path / "data"], capsys)
    assert_user_error(code, err, "d.parquet", "pip install pyarrow")
    assert not (tmp_path / "data").exists()
