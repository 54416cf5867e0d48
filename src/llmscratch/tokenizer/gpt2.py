"""OpenAI's GPT-2 BPE: its pre-tokenization regex, its file format, and where to find the files.

GPT-2 (Radford et al. 2019, released as `encoder.py` with `encoder.json` + `vocab.bpe`) is a byte-level BPE.
Its files store tokens as *text*: each byte is drawn as a printable Unicode character so that the merges
file stays whitespace-separated and readable. `gpt2_byte_to_unicode` rebuilds that drawing so the files can be
turned back into `ranks: dict[bytes, int]`, the form both of our tokenizers use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmscratch.errors import UserError, read_json
from llmscratch.tokenizer.fast import TiktokenTokenizer
from llmscratch.tokenizer.vocab import check_vocab

# Splits text into "words" before BPE so merges never cross a word, number or punctuation boundary:
# English contractions, letters with one optional leading space, digits likewise, other symbols likewise,
# then whitespace. `\s+(?!\S)` leaves the last space of a run to prefix the next word (" world").
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

GPT2_FILES = ("encoder.json", "vocab.bpe")
HF_GPT2_FILES = ("vocab.json", "merges.txt")  # Hugging Face's names for the same two files
ENV_VAR = "LLMSCRATCH_GPT2_DIR"

# Keys of encoder.json shaped like this are special tokens (GPT-2 has one: <|endoftext|> = 50256).
_SPECIAL_KEY = re.compile(r"<\|[^|\s]+\|>")


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the character that stands for it in encoder.json / vocab.bpe.

    Printable Latin-1 bytes (!..~, ¡..¬, ®..ÿ) stand for themselves; the other 68 (controls, space, soft
    hyphen...) are shifted in byte order to U+0100, U+0101, ... so no token string contains whitespace.
    The printable bytes come first, which is why GPT-2's single-byte token ids are not the byte values.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def read_gpt2_files(
    encoder_json: str | Path, vocab_bpe: str | Path
) -> tuple[dict[bytes, int], dict[str, int]]:
    """`(ranks, special_tokens)` from GPT-2's `encoder.json` (token text -> id) and `vocab.bpe` (merges).

    encoder.json gives every id; vocab.bpe gives the merge order. tiktoken's encoder (which ours copies) merges
    by id, so the two files must agree that the merge on line i creates token 256 + i; this is checked.
    """
    encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
    for path in (encoder_json, vocab_bpe):
        if not path.is_file():
            raise UserError(f"{path} not found; GPT-2's BPE needs encoder.json and vocab.bpe side by side")
    encoder = read_json(encoder_json, "; fetch GPT-2's encoder.json again")
    if not isinstance(encoder, dict):
        raise UserError(
            f"{encoder_json} should hold a JSON object (token -> id); fetch GPT-2's encoder.json again"
        )

    char_to_byte = {c: b for b, c in gpt2_byte_to_unicode().items()}

    def to_bytes(token: str, where: str) -> bytes:
        try:
            return bytes(char_to_byte[c] for c in token)
        except KeyError as e:
            raise UserError(
                f"{where}: token {token!r} uses {e.args[0]!r}, which is not in GPT-2's byte map"
            ) from None

    ranks: dict[bytes, int] = {}
    special_tokens: dict[str, int] = {}
    for token, token_id in encoder.items():
        if _SPECIAL_KEY.fullmatch(token):
            special_tokens[token] = token_id
        else:
            ranks[to_bytes(token, str(encoder_json))] = token_id
    check_vocab(ranks, special_tokens, str(encoder_json))

    lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
    rank = 256
    for line_no, line in enumerate(lines, start=1):
        # Only the first line is a header; later lines such as "# #" are real merges of the "#" token.
        if not line.strip() or (line_no == 1 and line.startswith("#version")):
            continue
        where = f"{vocab_bpe} line {line_no}"
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{where}: expected two tokens separated by a space, got {line!r}")
        merged = to_bytes(parts[0], where) + to_bytes(parts[1], where)
        if ranks.get(merged) != rank:
            raise UserError(
                f"{where}: merge {line!r} should create id {rank} but {encoder_json.name} "
                f"gives {ranks.get(merged)}; use encoder.json and vocab.bpe from the same tokenizer"
            )
        rank += 1
    if rank != len(ranks):
        raise UserError(
            f"{vocab_bpe} has {rank - 256} merges but {encoder_json.name} has {len(ranks) - 256} merged tokens; "
            "use encoder.json and vocab.bpe from the same tokenizer"
        )
    return ranks, special_tokens


def gpt2_files_in(folder: str | Path) -> tuple[Path, Path] | None:
    """`(encoder.json, vocab.bpe)` inside `folder` — or Hugging Face's names for the same two files,
    `(vocab.json, merges.txt)` — or None when neither pair is complete."""
    folder = Path(folder)
    for names in (GPT2_FILES, HF_GPT2_FILES):
        paths = tuple(folder / name for name in names)
        if all(p.is_file() for p in paths):
            return paths  # type: ignore[return-value]
    return None


def _from_folder(folder: Path, origin: str) -> TiktokenTokenizer:
    if not folder.is_dir():
        raise UserError(
            f"{origin}: folder {folder} does not exist; point it at a folder with {' + '.join(GPT2_FILES)}"
        )
    files = gpt2_files_in(folder)
    if files is None:
        missing = [n for n in GPT2_FILES if not (folder / n).is_file()]
        raise UserError(
            f"{origin}: {folder} lacks {' and '.join(missing)}; GPT-2's BPE needs both files there"
        )
    # Parsed by our reader rather than tiktoken.load.data_gym_to_mergeable_bpe_ranks: that one copies local
    # files into a cache keyed by path, so an edited file at the same path would be silently ignored.
    ranks, special_tokens = read_gpt2_files(*files)
    return TiktokenTokenizer(ranks, special_tokens, GPT2_PATTERN, name="gpt2")


def gpt2_tokenizer(source: str | Path | None = None) -> TiktokenTokenizer:
    """GPT-2's tokenizer (ids identical to tiktoken's "gpt2"), found in this order:

    1. `source`: a folder holding `encoder.json` + `vocab.bpe`;
    2. the folder named by the environment variable ``LLMSCRATCH_GPT2_DIR``;
    3. ``tiktoken.get_encoding("gpt2")``, which reads ``TIKTOKEN_CACHE_DIR`` or downloads.

    An explicit folder (1 or 2) that is wrong raises at once rather than falling through to the network.
    """
    if source is not None:
        return _from_folder(Path(source), "gpt2 tokenizer source")
    env_folder = os.environ.get(ENV_VAR)
    if env_folder:
        return _from_folder(Path(env_folder), ENV_VAR)
    import tiktoken

    # Any failure here means "not available": requests' ConnectionError offline, ValueError for a corrupt
    # cache, ImportError without the plugin; none of them is a bug in the caller.
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"GPT-2's BPE is not available ({type(e).__name__} from tiktoken): pass a folder with "
            "encoder.json + vocab.bpe (e.g. --tokenizer path/to/folder), set LLMSCRATCH_GPT2_DIR to one, "
            "or populate TIKTOKEN_CACHE_DIR / go online"
        ) from None
    return TiktokenTokenizer.from_encoding(encoding)
