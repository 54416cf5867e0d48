"""`--data gutenberg`: the book's Project Gutenberg pretraining recipe (chapter 5's bonus) as a named corpus.

The recipe: take public-domain books as plain text, cut Project Gutenberg's licence header and footer off each,
and keep only the English ones — the book's filter keeps a text when at least 90% of its characters are ASCII.
The book downloads the whole collection with a mirroring script; this corpus fetches a fixed list of well-known
English books (`BOOKS`, ~20 MB) one file each, resumable and cached, from `gutenberg.org` or the mirror named by
$LLMSCRATCH_GUTENBERG_MIRROR (a URL template with `{id}`). Gutenberg re-issues its files, so they carry no
pinned sha256: a file is checked for its header instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmscratch.errors import UserError

MIRROR_ENV = "LLMSCRATCH_GUTENBERG_MIRROR"
DEFAULT_MIRROR = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"

# Project Gutenberg ebook numbers: widely read English novels, stories and essays.
BOOKS = (1342, 84, 11, 1661, 2701, 98, 74, 345, 174, 76, 1952, 844, 1232, 43, 1260, 768, 158, 1400, 120, 16)

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def strip_headers(text: str) -> str:
    """The book's text between Project Gutenberg's `*** START OF ...` and `*** END OF ...` lines (all of it when
    a marker is missing)."""
    start, end = _START.search(text), _END.search(text)
    body = text[start.end() if start else 0:end.start() if end and (not start or end.start() > start.end()) else None]
    return body.strip()


def is_english(text: str, threshold: float = 0.9) -> bool:
    """The book's filter: at least `threshold` of the characters are ASCII."""
    return bool(text) and sum(ch.isascii() for ch in text) / len(text) >= threshold


def fetch_gutenberg(cache: Path, progress: bool = True, books: tuple[int, ...] | None = None) -> list[Path]:
    """The cleaned texts of `books` (default `BOOKS`) under `cache` (downloaded into `cache/raw` once, then
    stripped of their headers and kept when English): the files the `gutenberg` corpus reads."""
    from llmscratch.download import download
    from llmscratch.fileio import atomic_write_text

    template = os.environ.get(MIRROR_ENV, DEFAULT_MIRROR)
    if "{id}" not in template:
        raise UserError(f"${MIRROR_ENV}={template}: give a URL template with {{id}} where the book number goes")
    kept = []
    for book in BOOKS if books is None else books:
        clean = cache / "clean" / f"pg{book}.txt"
        if not clean.is_file():
            raw = download(template.format(id=book), cache / "raw" / f"pg{book}.txt", None,
                           name=f"Project Gutenberg book {book}", progress=progress,
                           hint=f"set ${MIRROR_ENV} to a reachable mirror, or pass local text files with --data")
            text = raw.read_text(encoding="utf-8", errors="replace")
            if not _START.search(text):
                raise UserError(f"{raw}: not a Project Gutenberg text (no '*** START OF' line); delete it and check "
                                f"${MIRROR_ENV}")
            body = strip_headers(text)
            if not is_english(body):
                continue
            atomic_write_text(clean, body + "\n")
        kept.append(clean)
    if not kept:
        raise UserError("gutenberg: none of the books passed the English filter")
    return kept
