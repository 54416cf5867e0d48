"""Raw text in: the embedded stdlib corpus, named downloads (sha256-checked, cached by `llmscratch.download`) and
local files.

Every corpus comes out as documents (strings), read lazily by `iter_corpus` or all at once by `load_corpus`.
Documents stay separate so the token stage can put an end-of-text token between them: a text file is one
document, a JSONL or parquet file one per record. `iter_corpus` hands a large text file over in pieces of about
a megabyte, the later ones marked `Continuation` so that no end-of-text token goes between them.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmscratch.data.files import JSONL_SUFFIXES, _loads, read_text_file, string_field
from llmscratch.download import cache_dir, download
from llmscratch.errors import UserError, one_line
from llmscratch.fileio import atomic_write_bytes

__all__ = [
    "CORPORA",
    "NAMED_DOWNLOADS",
    "Continuation",
    "Corpus",
    "NamedCorpus",
    "fetch_corpus",
    "HubCorpus",
    "iter_corpus",
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
CORPORA: tuple[str, ...] = ("pydocs", *NAMED_DOWNLOADS, "gutenberg")  # gutenberg: data/gutenberg.py



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


# Only text and record files are taken from folders: a data folder often also holds archives, images or .bin
# token files that would otherwise fail the UTF-8 check.
_TEXT_SUFFIXES = (".txt", ".md")
_PARQUET_SUFFIX = ".parquet"
_FOLDER_SUFFIXES = (*_TEXT_SUFFIXES, *JSONL_SUFFIXES, _PARQUET_SUFFIX)


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
    the path. A folder contributes its .txt, .md, .jsonl, .ndjson and .parquet files, recursively, skipping
    hidden ones; a glob
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
                           if Path(p).suffix.lower() in _FOLDER_SUFFIXES)
        if not files:
            raise UserError(
                f"{path}: folder has no .txt, .md, .jsonl or .parquet files; put the training text in such files "
                "or pass a file or glob with --data"
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


# ---------------------------------------------------------------------------------------------------------
# reading lazily: text files in pieces, JSONL and parquet records


class Continuation(str):
    """A piece of text that continues the document before it (the second and later pieces of a large file):
    whoever joins documents with an end-of-text token puts none before it."""

    __slots__ = ()


# Text is read and handed on in pieces of about this many bytes: big enough that a worker process spends its
# time tokenizing rather than receiving, small enough that a few in flight cost a few megabytes.
_PIECE_BYTES = 1 << 20
# A file with no place to cut (see _CUT) is cut anyway once this much of it is held, at a newline if it has one.
_MAX_PIECE_CHARS = 1 << 25

# Where a text may be cut without changing its tokens: before a space or after a newline that has a non-space
# character on both sides. GPT-2's and Llama 3's pre-tokenizers always start a new "word" there (the space
# opens the next word, " world"; a lone newline is a word of its own or ends a run of punctuation), and BPE
# merges never cross a word, so the pieces' ids joined are the whole text's ids. `re`'s \s is str.isspace, a
# superset of the Unicode White_Space that those patterns' \s means: no cut lands next to what they call space.
_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")


def _last_cut(text: str) -> int:
    """The last place `text` may be cut (see `_CUT`), 0 if there is none; searched from the end."""
    window = 1 << 16
    while True:
        start = max(0, len(text) - window)
        last = 0
        for match in _CUT.finditer(text, start):
            last = match.start()
        if last or not start:
            return last
        window *= 4


def _complete_utf8(data: bytes) -> int:
    """The length of `data` without a UTF-8 character cut off at its end (held back until the next read)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            needs = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if back < needs else len(data)
    return len(data)  # four continuation bytes: not UTF-8, which the decoding reports


def _decode(data: bytes, path: Path, offset: int) -> str:
    """`data`, read from `path` at byte `offset`, as UTF-8; UserError naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {offset + exc.start} is 0x{data[exc.start]:02x}); convert it, e.g. "
            f"iconv -f LATIN1 -t UTF-8, or leave it out"
        ) from None


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({one_line(exc.strerror or exc)})") from None


def _text_pieces(path: Path) -> Iterator[str]:
    """The text of `path` (BOM dropped, CRLF as LF), nothing when it is only whitespace: whole when it is small,
    else in pieces of ~`_PIECE_BYTES` cut by `_last_cut`, the later ones `Continuation`s."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({one_line(exc.strerror or exc)})") from None
    if size <= _PIECE_BYTES:
        text = read_text_file(path)
        if text.strip():
            yield text
        return
    pending, carry, offset, pieces = "", b"", 0, 0
    with _open_binary(path) as f:
        while block := f.read(_PIECE_BYTES):
            data = carry + block
            if offset == 0 and data.startswith(b"\xef\xbb\xbf"):
                data, offset = data[3:], 3
            end = _complete_utf8(data)
            # A CR that ends one read and the LF that starts the next join in `pending` and are replaced later.
            pending = (pending + _decode(data[:end], path, offset)).replace("\r\n", "\n")
            carry, offset = data[end:], offset + end
            cut = _last_cut(pending)
            if not cut and len(pending) >= _MAX_PIECE_CHARS:
                cut = pending.rfind("\n", 0, -1) + 1 or len(pending)  # the ids may differ at this one place
            if cut:
                yield Continuation(pending[:cut]) if pieces else pending[:cut]
                pending, pieces = pending[cut:], pieces + 1
    if carry:
        _decode(carry, path, offset)  # a character cut off by the end of the file: reported
    if pieces:
        yield Continuation(pending)  # never empty: a cut is followed by a non-space character
    elif pending.strip():
        yield pending


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    """The `field` string of each record of the JSONL file `path`, read a line at a time; blank lines and records
    whose text is only whitespace are skipped."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{number}: not UTF-8 text (byte {exc.start} of the line is "
                                f"0x{raw[exc.start]:02x}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            record = _loads(line, path, number, "; JSONL needs one complete object per line")
            where = f"{path}:{number}"
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
            keys = ", ".join(list(record)[:8]) or "none"
            text = string_field(record, field, where,
                                missing=f"name the field that holds the text with --text-field (keys: {keys})")
            if text.strip():
                yield text


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The `field` column of the parquet file `path`, a row group batch at a time; nulls and whitespace-only
    texts are skipped. Needs pyarrow (checked by `iter_corpus` before anything is read)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow reports any unreadable file its own way
        raise UserError(f"{path}: cannot read it as parquet ({one_line(exc)})") from None
    names = table.schema_arrow.names
    if field not in names:
        raise UserError(f"{path}: no column {field!r} (columns: {', '.join(names[:8])}); name the column that "
                        "holds the text with --text-field")
    for batch in table.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise UserError(f"{path}: column {field!r} holds {type(value).__name__} values, not text; name "
                                "the column that holds the text with --text-field")
            if value and value.strip():
                yield value


def _file_documents(path: Path, field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_texts(path, field)
    if suffix == _PARQUET_SUFFIX:
        return _parquet_texts(path, field)
    return _text_pieces(path)


def _check_readers(files: list[Path]) -> None:
    """Fail before anything is read when a file needs a reader that is not installed."""
    parquet = next((p for p in files if p.suffix.lower() == _PARQUET_SUFFIX), None)
    if parquet is not None:
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UserError(f"{parquet}: reading parquet needs pyarrow: pip install pyarrow (or convert the file "
                            "to JSONL, one {\"text\": ...} object a line)") from None


class Corpus:
    """The documents of a corpus, read lazily and in order each time it is iterated (see `iter_corpus`).

    `files`: the files read, in order ([] for pydocs). `nbytes`: their total size on disk, the size of the text
    for sizing the work before it starts (JSONL and parquet files also hold keys and other fields).
    """

    def __init__(self, src: str | Path, *, text_field: str = "text", progress: bool = True):
        self.src, self.text_field = src, text_field
        resolved = resolve_source(src)
        self._documents: list[str] | None = None
        if resolved == "pydocs":
            self._documents, self.files = pydocs_documents(), []
            self.nbytes = sum(len(d) for d in self._documents)  # ~all ASCII
            return
        self._single = isinstance(resolved, str) or Path(str(src)).expanduser().is_file()
        if resolved == "gutenberg":
            from llmscratch.data.gutenberg import fetch_gutenberg

            self._single = False
            self.files = fetch_gutenberg(cache_dir() / "corpora" / "gutenberg", progress=progress)
        else:
            self.files = [fetch_corpus(resolved, progress=progress)] if isinstance(resolved, str) else resolved
        _check_readers(self.files)
        self.nbytes = sum(p.stat().st_size for p in self.files)

    def __iter__(self) -> Iterator[str]:
        if self._documents is not None:
            yield from self._documents
            return
        found = False
        for path in self.files:
            empty = True
            for document in _file_documents(path, self.text_field):
                empty, found = False, True
                yield document
            if empty and self._single:
                raise UserError(
                    f"{path}: file is empty; put training text in it or pass another --data"
                    if path.suffix.lower() not in (*JSONL_SUFFIXES, _PARQUET_SUFFIX)
                    else f"{path}: no record has text in {self.text_field!r}; name the field that holds the text "
                    "with --text-field or pass another --data"
                )
        if not found:
            raise UserError(f"{self.src}: all {len(self.files)} matching files are empty; add text to them")


def iter_corpus(src: str | Path, *, text_field: str = "text", progress: bool = True) -> Corpus:
    """The documents of a corpus name, file, folder or glob (see `resolve_source`), read as they are consumed.

    A .jsonl/.ndjson file gives one document per record (its `text_field` string; one JSON object a line), a
    .parquet file one per row of its `text_field` column (needs pyarrow); any other file is text and one
    document, handed over in ~1 MB pieces when larger (later pieces are `Continuation`s, cut where the ids do
    not change). A file named on its own must have text; empty ones inside a folder or glob are skipped, but at
    least one must have text. The source is resolved (and a named download fetched) now, so a bad --data fails
    before any work; a file's problems are reported when it is reached.

    `hf:NAME[:CONFIG][@SPLIT]` streams a Hugging Face `datasets` data set from the hub instead (its
    `text_field` column; split `train` by default), e.g. `hf:HuggingFaceFW/fineweb-edu:sample-10BT`.
    """
    if str(src).startswith(HUB_PREFIX):
        return HubCorpus(str(src), text_field)
    return Corpus(src, text_field=text_field, progress=progress)


HUB_PREFIX = "hf:"


class HubCorpus:
    """A Hugging Face `datasets` data set streamed from the hub, record by record (never downloaded whole): what
    `--data hf:NAME[:CONFIG][@SPLIT]` names. Needs the `datasets` extra."""

    files: list[Path] = []
    nbytes: int | None = None  # unknown until streamed

    def __init__(self, spec: str, text_field: str = "text"):
        rest = spec[len(HUB_PREFIX):]
        rest, _, split = rest.partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise UserError(f"--data {spec}: name the data set, e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT@train")
        self.spec, self.name, self.config, self.split = spec, name, config or None, split or "train"
        self.text_field = text_field
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise UserError(f"--data {spec}: streaming from the Hugging Face hub needs the datasets library: "
                            "pip install 'llmscratch[datasets]'") from None

    def __iter__(self) -> Iterator[str]:
        import datasets

        try:
            records = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as exc:  # an unknown name, config or split; no network; a gated set
            raise UserError(f"--data {self.spec}: cannot stream it ({one_line(exc)[:300]})") from None
        for i, record in enumerate(records, 1):
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"--data {self.spec}: record {i} has no string {self.text_field!r} (it has: {keys}); "
                                "name the text column with --text-field")
            if text:
                yield text


def load_corpus(src: str | Path, *, text_field: str = "text", progress: bool = True) -> list[str]:
    """`iter_corpus` read into a list, each document whole (its pieces joined): one per text file, one per record
    of a JSONL or parquet file. For corpora larger than memory, iterate `iter_corpus` instead."""
    documents: list[str] = []
    parts: list[str] = []
    for document in iter_corpus(src, text_field=text_field, progress=progress):
        if parts and not isinstance(document, Continuation):
            documents.append("".join(parts))
            parts = []
        parts.append(document)
    if parts:
        documents.append("".join(parts))
    return documents
