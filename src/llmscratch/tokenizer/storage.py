"""The one on-disk format for tokenizers: ``tokenizer.json`` in a checkpoint folder.

Layout (plain JSON, one rank per line so a diff or a pager shows the merges in order)::

    {"format": "llmscratch-bpe", "version": 1,
     "pattern": "<pre-tokenization regex>",
     "special_tokens": {"<|endoftext|>": 4095},
     "ranks": [
      ["IA==", 32, " "],
      ...
     ]}

Each rank entry is ``[base64 of the token bytes, id, readable text]``. Base64 (as in tiktoken's ``.tiktoken``
files) is authoritative because tokens are bytes and may split a UTF-8 character; the third field is only a
hint for human readers and is ignored on load.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from llmscratch.errors import UserError, read_json
from llmscratch.fileio import atomic_write_text
from llmscratch.runs import TOKENIZER
from llmscratch.tokenizer.vocab import check_vocab

TOKENIZER_FILE = TOKENIZER  # the name the checkpoint folder layout (llmscratch.runs) gives it
FORMAT = "llmscratch-bpe"
VERSION = 1


def write_tokenizer_json(
    directory: str | Path, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str
) -> Path:
    """Write ``directory/tokenizer.json`` atomically (temp file + rename); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = (
        f'{{"format": {json.dumps(FORMAT)}, "version": {VERSION},\n'
        f' "pattern": {json.dumps(pattern)},\n'
        f' "special_tokens": {json.dumps(special_tokens, ensure_ascii=False)},\n'
        ' "ranks": [\n'
    )
    rows = ",\n".join(
        "  "
        + json.dumps(
            [base64.b64encode(token).decode("ascii"), rank, token.decode("utf-8", errors="backslashreplace")],
            ensure_ascii=False,
        )
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    )
    path = directory / TOKENIZER_FILE
    atomic_write_text(path, header + rows + "\n ]}\n")
    return path


def read_tokenizer_json(path: str | Path) -> tuple[dict[bytes, int], dict[str, int], str]:
    """`(ranks, special_tokens, pattern)` from a ``tokenizer.json``; every problem is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; save a tokenizer there first (Tokenizer.save(folder))")
    data = read_json(path, "; re-save the tokenizer")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(
            f"{path}: format is {found!r}, expected {FORMAT!r}; pass a folder written by Tokenizer.save() "
            "or one with GPT-2's encoder.json + vocab.bpe"
        )
    version = data.get("version")
    if version != VERSION:
        raise UserError(
            f"{path}: version {version!r} is not supported (this llmscratch reads {VERSION}); upgrade"
        )
    pattern = data.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise UserError(f"{path}: 'pattern' must be a non-empty regex string")
    try:
        import regex

        regex.compile(pattern)
    except regex.error as e:
        raise UserError(f"{path}: 'pattern' is not a valid regex ({e})") from None
    special_tokens = data.get("special_tokens", {})
    if not isinstance(special_tokens, dict):
        raise UserError(f"{path}: 'special_tokens' must be an object mapping token strings to ids")
    rows = data.get("ranks")
    if not isinstance(rows, list):
        raise UserError(f"{path}: 'ranks' must be a list of [base64 token, id] entries")
    ranks: dict[bytes, int] = {}
    for index, row in enumerate(rows):
        try:
            token_b64, rank = row[0], row[1]
            token = base64.b64decode(token_b64, validate=True)
        except (TypeError, IndexError, KeyError, ValueError, binascii.Error):
            raise UserError(f"{path}: ranks[{index}] = {row!r} is not a [base64 token, id] entry") from None
        if token in ranks:
            raise UserError(f"{path}: ranks[{index}] repeats token {token!r}; each token may appear once")
        ranks[token] = rank
    check_vocab(ranks, special_tokens, str(path))
    return ranks, special_tokens, pattern
