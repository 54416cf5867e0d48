"""BPE training and encoding speed: our pure-Python BPETokenizer against Hugging Face `tokenizers`.

Trains a 4096-token byte-level BPE (GPT-2 pre-tokenization, one special token) on the same text with both
trainers in the same run, then times encoding that text with our pure encoder, our tiktoken export and HF.
Times are the best of --repeat runs.

    .venv/bin/python benchmarks/bpe_train.py [--data PATH] [--vocab-size 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
SPECIAL = "<|endoftext|>"


def best_time(fn, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def train_hf(text: str, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Lines, as HF is normally fed (and as lets it spread pre-tokenization over threads).
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="UTF-8 text file to train on")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    args = parser.parse_args()

    if not args.data.is_file():
        if args.data != DEFAULT_DATA:
            print(f"error: data file {args.data} not found; pass --data PATH to a text file", file=sys.stderr)
            return 2
        # No ../shared beside the repo (a user's machine): the same corpus through llmscratch's download cache.
        from llmscratch.data.corpora import fetch_corpus
        from llmscratch.errors import UserError

        try:
            args.data = fetch_corpus("tinyshakespeare")
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        import tokenizers
    except ImportError:
        print(
            "error: Hugging Face `tokenizers` is not installed; pip install 'llmscratch[bench]'",
            file=sys.stderr,
        )
        return 2

    from llmscratch.tokenizer import BPETokenizer
    from llmscratch.tokenizer.gpt2 import gpt2_byte_to_unicode

    text = args.data.read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    print(f"data: {args.data} ({mb:.2f} MB), vocab_size {args.vocab_size}, best of {args.repeat}")

    ours_s, ours = best_time(
        lambda: BPETokenizer.train(text, args.vocab_size, special_tokens=(SPECIAL,), progress=False),
        args.repeat,
    )
    hf_s, hf = best_time(lambda: train_hf(text, args.vocab_size), args.repeat)

    # How much the two vocabularies agree (they differ in tie-breaking and in HF's per-line input).
    char_to_byte = {c: b for b, c in gpt2_byte_to_unicode().items()}
    hf_tokens = {bytes(char_to_byte[c] for c in t) for t in hf.get_vocab() if t != SPECIAL}
    shared = len(hf_tokens.intersection(ours.ranks))

    # A new instance has an empty word cache, so every word goes through the merge loop once.
    pure_s, pure_ids = best_time(
        lambda: BPETokenizer(ours.ranks, ours.special_tokens, ours.pattern).encode(text), args.repeat
    )
    ours.encode(text)
    warm_s, _ = best_time(lambda: ours.encode(text), args.repeat)
    encoding = ours.to_tiktoken()
    tik_s, tik_ids = best_time(lambda: encoding.encode(text, allowed_special="all"), args.repeat)
    lines = text.splitlines(keepends=True)
    hf_enc_s, _ = best_time(lambda: hf.encode_batch(lines), args.repeat)
    if pure_ids != tik_ids:
        print("error: pure and tiktoken encodings differ", file=sys.stderr)
        return 1

    rows = [
        ("BPETokenizer.train (ours, Python)", ours_s, f"{ours_s / hf_s:.1f}"),
        ("HF tokenizers BpeTrainer (Rust)", hf_s, "1.0"),
    ]
    print()
    print(f"| {'BPE training':<38} | seconds | ours / HF |")
    print(f"|{'-' * 40}|--------:|----------:|")
    for name, seconds, ratio in rows:
        print(f"| {name:<38} | {seconds:7.2f} | {ratio:>9} |")
    print(f"tokens in both vocabularies: {shared} of {len(ours.ranks)} (tokenizers {tokenizers.__version__})")
    print()
    print(f"| {f'encode {mb:.2f} MB ({len(tik_ids)} tokens)':<38} | seconds |   MB/s |")
    print(f"|{'-' * 40}|--------:|-------:|")
    for name, seconds in (
        ("BPETokenizer.encode, cold word cache", pure_s),
        ("BPETokenizer.encode, warm word cache", warm_s),
        ("to_tiktoken() encode (same ids)", tik_s),
        ("HF tokenizers encode_batch (own vocab)", hf_enc_s),
    ):
        print(f"| {name:<38} | {seconds:7.3f} | {mb / seconds:6.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
