"""Llama 3's tokenizer from Meta's `tokenizer.model`: byte-level BPE ranks in tiktoken's text format.

The file has one line per token, `<base64 of the token's bytes> <rank>`; the ranks are also the ids and the
merge order (128,000 of them for Llama 3). After them come 256 special tokens (ids 128,000-128,255): the
conversation markers and reserved slots. Tokens are produced by tiktoken (`TiktokenTokenizer`) with Llama 3's
pre-tokenizer regex, which differs from GPT-2's in case-insensitive contractions and in digits grouped by at
most three.

Hugging Face folders also carry the same vocabulary as `tokenizer.json` (read by `HFTokenizer`, with the chat
template); this reader serves Meta's own `original/` folder.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from llmscratch.errors import UserError
from llmscratch.tokenizer.fast import TiktokenTokenizer

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
N_SPECIAL = 256
# The named special tokens at the start of the 256 (Llama 3.1/3.2); the rest are reserved slots.
NAMED_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """token bytes → rank from a tiktoken BPE file; a malformed line is reported with its number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read a tiktoken BPE file ({exc})") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(f"{path}, line {number}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    if not ranks:
        raise UserError(f"{path}: no tokens")
    return ranks


def llama3_special_tokens(n_ranks: int, folder: Path | None = None) -> dict[str, int]:
    """The 256 special tokens after the ranks: named as `tokenizer_config.json` says when the folder has one,
    else by Llama 3's standard list."""
    names = list(NAMED_SPECIAL) + [f"<|reserved_special_token_{i}|>"
                                   for i in range(2, 2 + N_SPECIAL - len(NAMED_SPECIAL))]
    specials = {name: n_ranks + i for i, name in enumerate(names)}
    config = folder / "tokenizer_config.json" if folder is not None else None
    if config is not None and config.is_file():
        try:
            decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            named = {v["content"]: int(k) for k, v in decoder.items() if isinstance(v, dict) and "content" in v}
        except (ValueError, AttributeError, TypeError) as exc:
            raise UserError(f"{config}: cannot read added_tokens_decoder ({exc})") from None
        if named:
            specials = named
    return specials


def llama3_tokenizer(path: str | Path) -> TiktokenTokenizer:
    """Llama 3's tokenizer from a `tokenizer.model` file or a folder holding one (or `original/tokenizer.model`)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.model", path / "original" / "tokenizer.model"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise UserError(f"{path}: no tokenizer.model (nor original/tokenizer.model)")
        folder, path = path, found
    else:
        folder = path.parent
    ranks = read_tiktoken_ranks(path)
    return TiktokenTokenizer(ranks, llama3_special_tokens(len(ranks), folder), LLAMA3_PATTERN, name="llama3")
