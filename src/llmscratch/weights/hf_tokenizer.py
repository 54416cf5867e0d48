"""Our byte-level BPE → GPT-2's tokenizer files (`vocab.json` + `merges.txt`, alias `encoder.json` + `vocab.bpe`),
plus the two small JSON files with which `transformers.AutoTokenizer` loads them.

Our tokenizers store only `ranks` (token bytes → id, the id doubling as merge priority); GPT-2's files store
the merges explicitly, one pair per line in priority order. The pair behind each merged token is recovered by
running BPE on the token's own bytes with only the tokens of lower id: in a vocabulary BPE built, that stops at
exactly two parts — the pair whose merge created the token. Lines in id order then give Hugging Face's BPE
(lowest merge line first) the same priorities as tiktoken's (lowest id first).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmscratch.errors import UserError
from llmscratch.fileio import atomic_write_text
from llmscratch.tokenizer.gpt2 import GPT2_PATTERN, gpt2_byte_to_unicode

EOT = "<|endoftext|>"


def _bpe_parts(word: bytes, known: dict[bytes, int]) -> list[bytes]:
    """`word` split by BPE over the `known` tokens: fuse the adjacent pair of lowest id (leftmost on a tie)
    until no adjacent pair is a known token."""
    parts = [word[i : i + 1] for i in range(len(word))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            rank = known.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in priority order, that BPE-encodes like `ranks`; UserError when some multi-byte token
    cannot be built from two lower-id tokens (the vocabulary was not made by BPE merges)."""
    known = {token: i for token, i in ranks.items() if len(token) == 1}
    merges = []
    for token, i in sorted(((t, i) for t, i in ranks.items() if len(t) > 1), key=lambda item: item[1]):
        parts = _bpe_parts(token, known)
        if len(parts) != 2:
            raise UserError(f"token {token!r} (id {i}) is not the merge of two earlier tokens; this vocabulary "
                            "cannot be written as GPT-2 merges")
        merges.append((parts[0], parts[1]))
        known[token] = i
    return merges


def gpt2_vocab_and_merges(tokenizer) -> tuple[dict[str, int], list[str]]:
    """(vocab.json mapping, merges.txt lines without the header) for a byte-level BPE tokenizer of ours."""
    if getattr(tokenizer, "pattern", None) != GPT2_PATTERN:
        raise UserError("the tokenizer does not split words with GPT-2's regex, so GPT-2's tokenizer files "
                        "cannot reproduce it")
    draw = gpt2_byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(draw[b] for b in token)

    vocab = {text(token): i for token, i in tokenizer.ranks.items()}
    vocab.update(tokenizer.special_tokens)
    merges = [f"{text(a)} {text(b)}" for a, b in merges_from_ranks(tokenizer.ranks)]
    return dict(sorted(vocab.items(), key=lambda item: item[1])), merges


def write_gpt2_files(tokenizer, folder: str | Path, names: tuple[str, str] = ("vocab.json", "merges.txt")) -> None:
    """Write GPT-2's two tokenizer files for `tokenizer` into `folder` (Hugging Face's names by default;
    ("encoder.json", "vocab.bpe") gives OpenAI's)."""
    vocab, merges = gpt2_vocab_and_merges(tokenizer)
    folder = Path(folder)
    atomic_write_text(folder / names[0], json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(folder / names[1], "#version: 0.2\n" + "\n".join(merges) + "\n")


def write_hf_tokenizer(tokenizer, folder: str | Path, model_max_length: int) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, as the hub's GPT-2 has them:
    `AutoTokenizer.from_pretrained(folder)` then gives our ids."""
    write_gpt2_files(tokenizer, folder)
    specials = dict(sorted(tokenizer.special_tokens.items(), key=lambda item: item[1]))
    roles = {role: EOT for role in ("bos_token", "eos_token", "unk_token")} if EOT in specials else {}
    extra = [name for name in specials if name != EOT]
    special_map = {**roles, **({"additional_special_tokens": extra} if extra else {})}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        **special_map,
        "added_tokens_decoder": {
            str(i): {"content": name, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
                     "special": True}
            for name, i in specials.items()
        },
    }
    folder = Path(folder)
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
