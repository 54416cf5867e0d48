"""The one tokenizer interface every stage of the pipeline talks to, and the byte-level BPE vocabulary its two BPE
implementations (`bpe`, `fast`) share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

from llmscratch.tokenizer.storage import write_tokenizer_json
from llmscratch.tokenizer.vocab import check_vocab


class Tokenizer(ABC):
    """Text <-> token ids.

    Implementations: :class:`llmscratch.tokenizer.bpe.BPETokenizer` (trained from scratch, pure Python) and
    :class:`llmscratch.tokenizer.fast.TiktokenTokenizer` (tiktoken-backed; GPT-2's BPE or any exported ranks).
    """

    #: special token string -> id, e.g. {"<|endoftext|>": 50256}
    special_tokens: dict[str, int]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (ordinary + special); every id the tokenizer emits is below it."""

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-text token, or None when the tokenizer has none."""
        return self.special_tokens.get("<|endoftext|>")

    @abstractmethod
    def encode(self, text: str, allowed_special: str | set[str] = "all") -> list[int]:
        """Token ids for `text`. Special-token strings in the text map to their ids when allowed."""

    @abstractmethod
    def decode(self, ids) -> str:
        """Text for `ids` (a list or 1-D tensor). Byte sequences that split a UTF-8 character decode to
        U+FFFD; an id outside [0, vocab_size) raises UserError."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's files into `directory` (created if missing); `load_tokenizer` reads them."""


class RankedBPE(Tokenizer):
    """A byte-level BPE given as `ranks` (token bytes -> id, which is also the merge priority), `special_tokens`
    (string -> id) and `pattern` (the pre-tokenization regex): what both BPE implementations hold, checked once
    here (`source` names the tokenizer in errors) and saved as the one ``tokenizer.json`` format."""

    def __init__(self, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int] | None, pattern: str,
                 source: str) -> None:
        self.ranks: dict[bytes, int] = dict(ranks)
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self.pattern = pattern
        check_vocab(self.ranks, self.special_tokens, source)

    def save(self, directory: str | Path) -> None:
        write_tokenizer_json(directory, self.ranks, self.special_tokens, self.pattern)
