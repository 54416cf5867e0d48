"""Checks and argument normalisation shared by both tokenizers (pure-Python BPE and tiktoken-backed).

A byte-level BPE vocabulary is three things: `ranks` (token bytes -> id; the id is also the merge priority,
lower merges first), `special_tokens` (string -> id, never produced by merging) and the pre-tokenization
regex `pattern`. Both tokenizer classes hold exactly these, so they share one file format and one validator.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from llmscratch.errors import UserError


def check_vocab(ranks: Mapping[bytes, int], special_tokens: Mapping[str, int], source: str) -> None:
    """Raise UserError (prefixed with `source`, e.g. a file name) unless the vocabulary is usable."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # Byte-level BPE encodes any text only if every single byte is a token.
        raise UserError(
            f"{source}: {len(missing)} of the 256 single-byte tokens are missing (first: byte {missing[0]}); "
            "a byte-level BPE needs all of them - re-create the tokenizer"
        )
    seen: dict[int, str] = {}
    for token, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise UserError(f"{source}: token {token!r} has rank {rank!r}; ranks must be integers >= 0")
        if rank in seen:
            raise UserError(
                f"{source}: tokens {seen[rank]} and {token!r} share id {rank}; ids must be unique"
            )
        seen[rank] = repr(token)
    for name, token_id in special_tokens.items():
        if not name:
            raise UserError(
                f"{source}: a special token is the empty string; give it a name like <|endoftext|>"
            )
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise UserError(
                f"{source}: special token {name!r} has id {token_id!r}; ids must be integers >= 0"
            )
        if token_id in seen:
            raise UserError(
                f"{source}: special token {name!r} reuses id {token_id} of {seen[token_id]}; "
                "special tokens need ids of their own"
            )
        seen[token_id] = repr(name)


def resolve_allowed_special(
    allowed_special: str | Collection[str], special_tokens: Mapping[str, int]
) -> frozenset[str]:
    """The special-token strings `encode` should recognise: "all", "none", or an explicit collection."""
    if isinstance(allowed_special, str):
        if allowed_special == "all":
            return frozenset(special_tokens)
        if allowed_special == "none":
            return frozenset()
        raise UserError(
            f"allowed_special={allowed_special!r} is not understood; use 'all', 'none' or a set of token strings"
        )
    allowed = frozenset(allowed_special)
    unknown = sorted(allowed.difference(special_tokens))
    if unknown:
        raise UserError(
            f"allowed_special names {unknown} which this tokenizer does not have; "
            f"its special tokens are {sorted(special_tokens)}"
        )
    return allowed


def ids_to_list(ids, vocab_size: int) -> list[int]:
    """`ids` (list, tuple, 1-D tensor or array) as a list of ints, each checked to lie in [0, vocab_size)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        raise UserError(
            f"decode takes a 1-D sequence of token ids, got the single id {ids}; wrap it in a list"
        )
    try:
        out = [int(i) for i in ids]
    except TypeError:
        raise UserError(
            "decode takes a 1-D sequence of token ids (a list or a 1-D tensor); "
            "decode a batch one row at a time"
        ) from None
    if out and (min(out) < 0 or max(out) >= vocab_size):
        bad = next(i for i in out if i < 0 or i >= vocab_size)
        raise UserError(
            f"token id {bad} is out of range for this tokenizer (vocab_size {vocab_size}); "
            "check that the model and tokenizer belong together"
        )
    return out


def unknown_id_error(token_id: int, vocab_size: int) -> UserError:
    """Error for an id inside [0, vocab_size) that no token owns (a gap in a loaded vocabulary)."""
    return UserError(
        f"token id {token_id} belongs to no token in this tokenizer (vocab_size {vocab_size}, ids have gaps); "
        "check that the model and tokenizer belong together"
    )
