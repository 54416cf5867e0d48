"""The one tokenizer interface every stage of the pipeline talks to, and the byte-level BPE vocabulary its two BPE
implementations (`bpe`, `fast`) share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

from llmscratch.errors import UserError
from llmscratch.tokenizer.storage import write_tokenizer_json
from llmscratch.tokenizer.vocab import check_vocab


def prompt_ids(tokenizer, text: str) -> list[int]:
    """`tokenizer.encode_prompt(text)` (the ids of a prompt to continue, with what the model's own tokenizer
    puts before every input); `encode(text)` for an object that has only that."""
    encode_prompt = getattr(tokenizer, "encode_prompt", None)
    return encode_prompt(text) if encode_prompt is not None else tokenizer.encode(text)


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

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt to continue: `encode(text)`, plus what the model's own tokenizer puts before every
        input (a beginning-of-sequence token for Gemma and Llama 3; nothing for ours, GPT-2's or Qwen3's). A chat
        template writes that token itself, so rendered conversations use `encode`."""
        return self.encode(text)

    @abstractmethod
    def decode(self, ids) -> str:
        """Text for `ids` (a list or 1-D tensor). Byte sequences that split a UTF-8 character decode to
        U+FFFD; an id outside [0, vocab_size) raises UserError."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's files into `directory` (created if missing); `load_tokenizer` reads them."""

    def token_id(self, text: str | None) -> int | None:
        """The id of `text` when the vocabulary has it as one token (special or ordinary), else None. This
        general version encodes it: one id that decodes back to `text`; tokenizers with a table look it up."""
        if not text:
            return None
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 and self.decode(ids) == text else None

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Make each string of `tokens` one special token — recognised in text by `encode`, written out by
        `decode` — and return their ids, in order. New tokens take the next ids (vocab_size, vocab_size + 1, ...),
        so every old id keeps its meaning; a string the vocabulary already holds as one token keeps its id and
        is not added again. The tokenizer changes in place; `save` writes the grown vocabulary."""
        tokens = list(tokens)
        bad = next((t for t in tokens if not isinstance(t, str) or not t), None)
        if bad is not None:
            raise UserError(f"special token {bad!r}: tokens must be non-empty strings")
        new = list(dict.fromkeys(t for t in tokens if self.token_id(t) is None))
        if new:
            self._append_special_tokens(new)
        return [self.token_id(t) for t in tokens]  # type: ignore[misc]

    def _append_special_tokens(self, tokens: list[str]) -> None:
        """Give `tokens` (all new, distinct) the ids after the current ones; `add_special_tokens` checked them."""
        raise UserError(f"{type(self).__name__} cannot grow its vocabulary")


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

    def token_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        special = self.special_tokens.get(text)
        return special if special is not None else self.ranks.get(text.encode("utf-8"))

    def _append_special_tokens(self, tokens: list[str]) -> None:
        first = self.vocab_size
        self.special_tokens.update({t: first + i for i, t in enumerate(tokens)})
        self._special_tokens_changed()

    @abstractmethod
    def _special_tokens_changed(self) -> None:
        """Rebuild what each implementation derives from `special_tokens` (its id table, its encoder)."""
