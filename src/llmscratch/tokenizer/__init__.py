"""Text <-> token ids: a from-scratch byte-level BPE, its tiktoken-backed fast twin, and GPT-2's vocabulary.

``BPETokenizer`` is the readable one (train it, step through `encode`); ``TiktokenTokenizer`` runs the same
vocabulary in Rust and is what the pipeline uses. Both save to one ``tokenizer.json`` format, and
``load_tokenizer`` reads it back as either.
"""

from __future__ import annotations

from pathlib import Path

from llmscratch.errors import UserError
from llmscratch.tokenizer.base import Tokenizer
from llmscratch.tokenizer.bpe import BPETokenizer
from llmscratch.tokenizer.fast import TiktokenTokenizer
from llmscratch.tokenizer.gpt2 import GPT2_PATTERN, gpt2_files_in, gpt2_tokenizer
from llmscratch.tokenizer.hf import HFTokenizer, is_hf_tokenizer_json
from llmscratch.tokenizer.storage import TOKENIZER_FILE, read_tokenizer_json

__all__ = [
    "GPT2_PATTERN",
    "BPETokenizer",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "gpt2_tokenizer",
    "load_tokenizer",
]


def load_tokenizer(path_or_name: str | Path, fast: bool = True) -> Tokenizer:
    """A tokenizer from a folder or a name, as ``TiktokenTokenizer`` (`fast`) or ``BPETokenizer`` (pure Python).

    Accepts: a folder (or its ``tokenizer.json``) written by ``Tokenizer.save``; a Hugging Face model's folder
    with its ``tokenizer.json`` (Llama 3, Qwen3: an ``HFTokenizer``); a folder holding GPT-2's
    ``encoder.json`` + ``vocab.bpe``; or the name ``"gpt2"`` (resolved by :func:`gpt2_tokenizer`). An existing
    path wins over the name.
    """
    path = Path(path_or_name)
    if not path.exists():
        if str(path_or_name) == "gpt2":
            tokenizer = gpt2_tokenizer()
            return (
                tokenizer
                if fast
                else BPETokenizer(tokenizer.ranks, tokenizer.special_tokens, tokenizer.pattern)
            )
        raise UserError(
            f"tokenizer {str(path_or_name)!r} not found: pass a folder written by Tokenizer.save(), "
            "a folder with GPT-2's encoder.json + vocab.bpe, or the name 'gpt2'"
        )
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            path = path / TOKENIZER_FILE
        elif gpt2_files_in(path) is not None:
            if fast:
                return gpt2_tokenizer(path)
            return BPETokenizer.from_gpt2_files(*gpt2_files_in(path))  # type: ignore[misc]
        else:
            raise UserError(
                f"{path} holds neither {TOKENIZER_FILE} nor GPT-2's encoder.json + vocab.bpe; "
                "pass the folder a tokenizer was saved to"
            )
    if is_hf_tokenizer_json(path):  # a Hugging Face model's tokenizer (Llama 3, Qwen3), same file name as ours
        return HFTokenizer(path.parent)
    ranks, special_tokens, pattern = read_tokenizer_json(path)
    cls = TiktokenTokenizer if fast else BPETokenizer
    return cls(ranks, special_tokens, pattern)
