"""Shared tokenizer fixtures: a small BPE trained in-process, and GPT-2's files when they are present."""

import os

# Set before anything imports huggingface_hub, so that nothing can wait on the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest

#: OpenAI's encoder.json + vocab.bpe in the `shared` folder beside the repository (absent on most machines).
GPT2_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpt2"
SHARED_DATA = GPT2_DIR.parent

# Unicode classes, emoji (multi-codepoint, skin tone, ZWJ), CJK, RTL, combining marks, whitespace runs,
# CRLF, digits, contractions, and special-token look-alikes: what a tokenizer most often gets wrong.
VARIED_TEXTS = [
    "",
    "Hello, world! Is this-- a test?",
    "naïve café — Ünïcödé façade; Ελληνικά, русский, עברית, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ e\u0301 \u200b zero-width",
    "tabs\tand\t\ttabs\n\n\nnewlines   spaces    \r\n\r\nCRLF  \u00a0nbsp\u3000ideographic ",
    "   leading and trailing   ",
    "numbers 3.14159 1,000,000 ٣٤٥ 12345678901234567890",
    "I'm we're they've she'll he'd it's DON'T 'quoted' \"double\"",
    "code: def f(x):\n    return x**2  # comment\n\tif a<=b: pass",
    "<|endoftext|>between<|endoftext|><|endoftext|> and <|endof text|> <|endoftext",
    "\x00\x01\x7f\x80 control chars and \ufffd replacement \U0010ffff",
]


@pytest.fixture(scope="session")
def varied_texts() -> list[str]:
    return list(VARIED_TEXTS)


@pytest.fixture(scope="session")
def corpus(tiny_corpus: Path) -> str:
    """~40 KB of stdlib docstrings plus a little multilingual text, so merges also cover multi-byte chars."""
    return tiny_corpus.read_text(encoding="utf-8") + "\n".join(VARIED_TEXTS * 3)


@pytest.fixture(scope="session")
def trained(corpus: str):
    from llmscratch.tokenizer import BPETokenizer

    return BPETokenizer.train(corpus, vocab_size=400, progress=False)


@pytest.fixture(scope="session")
def trained_tiktoken(trained):
    return trained.to_tiktoken()


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    if not (GPT2_DIR / "encoder.json").is_file() or not (GPT2_DIR / "vocab.bpe").is_file():
        pytest.skip(f"GPT-2's encoder.json + vocab.bpe not found in {GPT2_DIR}")
    return GPT2_DIR
