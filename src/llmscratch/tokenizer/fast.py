"""The run-time tokenizer: any byte-level BPE vocabulary executed by tiktoken's Rust encoder.

It gives the same ids as :class:`~llmscratch.tokenizer.bpe.BPETokenizer` (the readable pure-Python one, which
copies tiktoken's merge rule) at tens of times the speed; the tests check the two agree.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import tiktoken

from llmscratch.tokenizer.base import RankedBPE
from llmscratch.tokenizer.vocab import ids_to_list, resolve_allowed_special, unknown_id_error


class TiktokenTokenizer(RankedBPE):
    """A :class:`Tokenizer` backed by a ``tiktoken.Encoding`` built from `ranks`, `special_tokens`, `pattern`.

    ranks: token bytes -> id, which is also the merge priority (lower merges first).
    special_tokens: string -> id; recognised in text by `encode` when allowed.
    pattern: pre-tokenization regex (``regex`` module syntax), e.g. ``GPT2_PATTERN``.
    """

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        special_tokens: Mapping[str, int] | None,
        pattern: str,
        name: str = "llmscratch-bpe",
    ) -> None:
        super().__init__(ranks, special_tokens, pattern, f"tokenizer {name!r}")
        self._name = name
        self._special_tokens_changed()

    def _special_tokens_changed(self) -> None:
        # tiktoken's Encoding is immutable: a new set of special tokens means a new encoder (~0.1 s for GPT-2).
        self.encoding = tiktoken.Encoding(
            self._name, pat_str=self.pattern, mergeable_ranks=self.ranks, special_tokens=self.special_tokens
        )
        self._vocab_size = self.encoding.n_vocab
        n_ids = len(self.ranks) + len(self.special_tokens)
        # Normally empty; only a hand-made vocabulary with unused ids has gaps, and tiktoken panics on those.
        self._gaps = (
            frozenset(range(self._vocab_size)).difference(self.ranks.values(), self.special_tokens.values())
            if n_ids != self._vocab_size
            else frozenset()
        )

    @classmethod
    def from_encoding(cls, encoding: tiktoken.Encoding) -> TiktokenTokenizer:
        """Wrap an existing ``tiktoken.Encoding`` (e.g. ``tiktoken.get_encoding("gpt2")``)."""
        # tiktoken has no public accessor for these three; its own pickling (__getstate__) reads the same fields.
        return cls(encoding._mergeable_ranks, encoding._special_tokens, encoding._pat_str, name=encoding.name)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, allowed_special: str | Collection[str] = "all") -> list[int]:
        allowed = resolve_allowed_special(allowed_special, self.special_tokens)
        if not allowed:
            return self.encoding.encode_ordinary(text)
        # disallowed_special=() makes special strings that are not allowed plain text instead of an error.
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids) -> str:
        ids = ids_to_list(ids, self._vocab_size)
        if self._gaps:
            bad = next((i for i in ids if i in self._gaps), None)
            if bad is not None:
                raise unknown_id_error(bad, self._vocab_size)
        # Bytes first, then a lenient UTF-8 decode: a sequence cut inside a character must not raise.
        return self.encoding.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.encoding.name!r}, vocab_size={self._vocab_size})"
