"""Suite-wide settings: never wait on the network, and point caches at a temp folder."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No compiled-ahead decoding steps (model/aot.py) built in the background by the CLI tests' `generate` and `chat`:
# each build compiles C++ for ~20 s on these cores. tests/model/test_aot.py turns them on where it tests them.
os.environ.setdefault("LLMSCRATCH_COMPILED_STEPS", "off")

#: ../shared/data beside the repository: real data sets for optional tests (absent on a user's machine).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (may be absent: tests using it skip with a reason)."""
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests must not read or write the user's ~/.cache/llmscratch; one cache per session.
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path_factory.getbasetemp() / "llmscratch-cache"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """~40 KB of real English (a few stdlib module docstrings), written once per session."""
    import importlib
    import inspect

    names = ["argparse", "collections", "csv", "json", "logging", "pathlib", "re", "string", "textwrap",
             "unittest", "zipfile", "tarfile", "statistics", "fractions", "decimal", "heapq", "bisect"]
    docs = [inspect.getdoc(importlib.import_module(n)) or "" for n in names]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_corpus) -> Path:
    """A 300-token BPE trained on `tiny_corpus` and the corpus prepared into train/val token files."""
    from llmscratch.tokenizer import BPETokenizer, load_tokenizer
    from llmscratch.train.pretrain import prepare

    root = tmp_path_factory.mktemp("prepared")
    BPETokenizer.train(tiny_corpus.read_text(), 300, progress=False).save(root / "tok")
    prepare(str(tiny_corpus), load_tokenizer(root / "tok"), root / "data", progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def byte_micro_checkpoint(tmp_path_factory) -> Path:
    """A random gpt-micro checkpoint (context 256: room for a prompt style) with a byte-level tokenizer (257 ids),
    for fine-tuning tests that need a base but not a trained one. Read-only: tests write elsewhere."""
    import torch

    from llmscratch.checkpoint import save_model
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["bytes"], 257, progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size, context_length=256))
    return save_model(tmp_path_factory.mktemp("byte-micro") / "micro", model, tok, {"model": "gpt-micro"})
