"""Raw text in: the embedded stdlib corpus, named downloads (sha256-checked, cached by `llmscratch.download`) and
local files.

Every corpus comes out as a list of documents (strings). Documents stay separate so the token stage can put
an end-of-text token between them; a single file is one document.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmscratch.data.files import read_text_file
from llmscratch.download import cache_dir, download
from llmscratch.errors import UserError
from llmscratch.fileio import atomic_write_bytes

__all__ = [
    "CORPORA",
    "NAMED_DOWNLOADS",
    "NamedCorpus",
    "fetch_corpus",
    "load_corpus",
    "pydocs_documents",
    "pydocs_text",
    "resolve_source",
]


# ---------------------------------------------------------------------------------------------------------
# pydocs: English prose that ships with every Python


# Bump when the extraction or dedup rules change, so stale cache files are not reused.
_PYDOCS_FORMAT = 1


def _pydocs_cache_file() -> Path:
    # Keyed by interpreter: the set of importable modules and their docstrings change between versions.
    v = sys.version_info
    key = f"{sys.implementation.name}{v.major}.{v.minor}.{v.micro}-{sys.platform}-v{_PYDOCS_FORMAT}"
    return cache_dir() / "pydocs" / f"pydocs-{key}.json"


def _normalize(paragraph: str) -> str:
    return " ".join(paragraph.split())


def _dedup_documents(raw_documents: list[list[str]]) -> list[str]:
    """Drop every paragraph already seen anywhere earlier (whitespace-insensitive), then empty documents.

    Inherited and boilerplate docstrings ("Return self==value.", one per class) repeat hundreds of times; a
    model would learn to recite them and the validation loss would reward it.
    """
    seen: set[str] = set()
    documents = []
    for texts in raw_documents:
        kept = []
        for text in texts:
            for paragraph in re.split(r"\n[ \t]*\n", text):
                paragraph = paragraph.strip("\n").rstrip()
                key = _normalize(paragraph)
                if key and key not in seen:
                    seen.add(key)
                    kept.append(paragraph)
        if kept:
            documents.append("\n\n".join(kept))
    return documents


def _build_pydocs() -> list[str]:
    worker = Path(__file__).with_name("_stdlib_docs.py")
    # -I: isolated (no user site, no cwd on sys.path, no PYTHON* env); -B: no .pyc writes into the stdlib.
    # DISPLAY is dropped so nothing imported can reach a window system.
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    with tempfile.TemporaryDirectory(prefix="llmscratch-pydocs-") as tmp:
        out = Path(tmp) / "docs.json"
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-B", str(worker), str(out)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                timeout=600,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise UserError(
                f"building the pydocs corpus with {worker} timed out after {exc.timeout:.0f} s; "
                "pass a local text file with --data PATH instead"
            ) from None
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise UserError(
                f"building the pydocs corpus with {worker} failed (exit {proc.returncode}: {tail[0]}); "
                "pass a local text file with --data PATH instead"
            )
        collected = json.loads(out.read_text(encoding="utf-8"))
    raw = [texts for _, texts in collected["modules"]]
    raw += [[text] for _, text in collected["topics"]]
    return _dedup_documents(raw)


def pydocs_documents() -> list[str]:
    """The standard library's documentation as a list of documents, deduplicated and in a fixed order.

    One document per module (its docstring, then its public classes, methods and functions) followed by one
    per `pydoc_data.topics` entry (the language reference texts behind `help("if")`). Built once per Python
    version in a child interpreter (about a second) and cached as JSON under `cache_dir()/pydocs`.
    """
    path = _pydocs_cache_file()
    try:
        documents = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(documents, list) and documents and all(isinstance(d, str) for d in documents):
            return documents
    except (OSError, ValueError):
        pass  # missing or damaged cache: rebuild it
    documents = _build_pydocs()
    try:
        atomic_write_bytes(path, json.dumps(documents).encode("utf-8"))
    except OSError:
        pass  # a read-only cache folder only costs a rebuild next time
    return documents


def pydocs_text() -> str:
    """`pydocs_documents()` joined by blank lines (~1.5 MB of English on CPython 3.11)."""
    return "\n\n".join(pydocs_documents())


# ---------------------------------------------------------------------------------------------------------
# named downloads


@dataclass(frozen=True)
class NamedCorpus:
    """A text file the project knows how to fetch and verify."""

    name: str  # what users type: --data the-verdict
    url: str  # where a machine with internet gets it
    sha256: str  # hex digest the bytes must have; guards against truncated or changed files
    filename: str  # name under cache_dir()/corpora
    description: str  # one line for --help


NAMED_DOWNLOADS: dict[str, NamedCorpus] = {
    c.name: c
    for c in (
        NamedCorpus(
            "the-verdict",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/"
            "the-verdict.txt",
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            "the-verdict.txt",
            "Edith Wharton's short story, the book's chapter-2 text (20 KB)",
        ),
        NamedCorpus(
            "tinyshakespeare",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            "tinyshakespeare.txt",
            "40k lines of Shakespeare, the char-rnn corpus (1.1 MB)",
        ),
    )
}

#: Every name `load_corpus` accepts besides a path, for CLI help.
CORPORA: tuple[str, ...] = ("pydocs", *NAMED_DOWNLOADS)



def fetch_corpus(name: str, *, progress: bool = True) -> Path:
    """Path of the named download in the cache, fetching and verifying it first when needed."""
    try:
        corpus = NAMED_DOWNLOADS[name]
    except KeyError:
        raise UserError(f"unknown download {name!r}; choose one of {', '.join(NAMED_DOWNLOADS)}") from None
    dest = cache_dir() / "corpora" / corpus.filename
    return download(corpus.url, dest, corpus.sha256, name=corpus.name, progress=progress)


# ---------------------------------------------------------------------------------------------------------
# local files and the one entry point


# Only text-like files are taken from folders: a data folder often also holds archives, images or .bin
# token files that would otherwise fail the UTF-8 check.
_TEXT_SUFFIXES = (".txt", ".md")


def _is_glob(src: str) -> bool:
    return any(ch in src for ch in "*?[")


def _once_each(paths) -> list[Path]:
    """The files among `paths`, sorted, each file once: a symlink and its target (or two routes through a
    symlinked folder) name the same text, which would otherwise be trained on twice."""
    seen: set[Path] = set()
    files = []
    for p in sorted(paths):
        if p.is_file() and (real := p.resolve()) not in seen:
            seen.add(real)
            files.append(p)
    return files


def _walk_folders(root: str) -> list[str]:
    """`root` and every folder below it, hidden ones skipped, symlinked folders followed but each real folder
    entered once — a folder linked into itself is a loop that would never end."""
    seen: set[tuple[int, int]] = set()
    folders = []
    for here, subdirs, _ in os.walk(root, followlinks=True):
        st = os.stat(here)
        if (st.st_dev, st.st_ino) in seen:
            subdirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        folders.append(here)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return folders


def _visible_entries(folders: list[str]) -> list[str]:
    """The paths of the entries of `folders` whose names do not start with a dot."""
    entries = []
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError as exc:
            raise UserError(f"{folder}: cannot list the folder ({exc.strerror}); fix its permissions or leave it "
                            "out of --data") from None
        entries.extend(os.path.join(folder, name) for name in sorted(names) if not name.startswith("."))
    return entries


def _glob(pattern: str) -> list[str]:
    """`glob.glob(pattern, recursive=True)`, except that `**` enters each real folder once.

    The standard `**` follows symlinked folders without memory: a folder linked into itself is walked about 40
    levels deep (until the OS refuses the path), and two such links make that exponential. Here the part before
    the first `**` is globbed as usual (each `*` crosses one level, so it is finite), `**` becomes the folders
    `_walk_folders` finds, and the rest is matched in each of them.
    """
    parts = pattern.replace(os.altsep or os.sep, os.sep).split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    i = parts.index("**")
    head, rest = os.sep.join(parts[:i]), os.sep.join(parts[i + 1:])
    if i == 1 and not head:  # "/**/...": the head is the root folder
        head = os.sep
    roots = glob.glob(head) if _is_glob(head) else [head or os.curdir]
    matches = []
    for root in filter(os.path.isdir, roots):
        folders = _walk_folders(root)
        if not rest:
            matches.extend(_visible_entries(folders))
        else:
            for folder in folders:
                matches.extend(_glob(os.path.join(glob.escape(folder), rest)))
    return matches


def resolve_source(src: str | Path) -> str | list[Path]:
    """What `src` names: a corpus name from `CORPORA` (returned as is) or the sorted list of files to read.

    A bare corpus name wins over a file of the same name in the working directory; write ./pydocs to mean
    the path. A folder contributes its *.txt and *.md files, recursively, skipping hidden ones; a glob
    (``data/*.txt``, ``books/**/*.md``) contributes the files it matches. Each file is read once, however many
    symlinks lead to it, and a folder symlinked into itself is not a loop.
    """
    text = str(src)
    if isinstance(src, str) and text in CORPORA:
        return text
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _once_each(Path(p) for p in _visible_entries(_walk_folders(str(path)))
                           if Path(p).suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise UserError(
                f"{path}: folder has no .txt or .md files; put the training text in such files or pass "
                "a file or glob with --data"
            )
        return files
    if _is_glob(text):
        files = _once_each(Path(p) for p in _glob(os.path.expanduser(text)))
        if not files:
            raise UserError(f"{text}: glob matches no files; check the pattern (quote it in the shell)")
        return files
    raise UserError(
        f"{text}: no such file or folder, and not a corpus name; pass an existing path or glob, or one "
        f"of {', '.join(CORPORA)}"
    )


def load_corpus(src: str | Path, *, progress: bool = True) -> list[str]:
    """The documents of a corpus name, file, folder or glob (see `resolve_source`); one per file.

    A file named on its own must not be empty; empty files inside a folder or glob are skipped, but at
    least one must have text.
    """
    resolved = resolve_source(src)
    if resolved == "pydocs":
        return pydocs_documents()
    if isinstance(resolved, str):
        return [read_text_file(fetch_corpus(resolved, progress=progress))]
    named_file = Path(str(src)).expanduser().is_file()
    documents = []
    for path in resolved:
        text = read_text_file(path)
        if text.strip():
            documents.append(text)
        elif named_file:
            raise UserError(f"{path}: file is empty; put training text in it or pass another --data")
    if not documents:
        raise UserError(f"{src}: all {len(resolved)} matching files are empty; add text to them")
    return documents
