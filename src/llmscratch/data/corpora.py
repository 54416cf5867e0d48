"""Raw text in: the embedded stdlib corpus, named downloads (sha256-checked, cached) and local files.

Every corpus comes out as a list of documents (strings). Documents stay separate so the token stage can put
an end-of-text token between them; a single file is one document.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llmscratch.errors import UserError
from llmscratch.fileio import atomic_write_bytes, sha256_of

__all__ = [
    "CORPORA",
    "NAMED_DOWNLOADS",
    "NamedCorpus",
    "cache_dir",
    "download",
    "fetch_corpus",
    "load_corpus",
    "pydocs_documents",
    "pydocs_text",
    "read_text_file",
    "resolve_source",
]


def cache_dir() -> Path:
    """Folder for downloads and built corpora: $LLMSCRATCH_CACHE, else $XDG_CACHE_HOME/llmscratch, else
    ~/.cache/llmscratch. Not created here; writers create what they need."""
    if env := os.environ.get("LLMSCRATCH_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "llmscratch"
    return Path.home() / ".cache" / "llmscratch"


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



def _one_line(reason: object) -> str:
    return " ".join(str(reason).split()) or "unknown error"


class _ConnectTimeout:
    """Mixin for urllib's HTTP(S) handlers: connect within `connect_timeout`, then allow the request's own
    (longer) timeout for each read. Without network a download fails in seconds, while a slow mirror is
    still given time between blocks."""

    def __init__(self, connect_timeout: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.connect_timeout = connect_timeout

    def do_open(self, http_class, req, **kwargs):
        connect_timeout = self.connect_timeout

        class Connection(http_class):
            def connect(self) -> None:
                read_timeout, self.timeout = self.timeout, connect_timeout
                super().connect()  # TCP (and for HTTPS the TLS handshake) under the connect timeout
                self.timeout = read_timeout
                self.sock.settimeout(read_timeout)

        return super().do_open(Connection, req, **kwargs)


class _HTTPHandler(_ConnectTimeout, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_ConnectTimeout, urllib.request.HTTPSHandler):
    pass


class _RecordingRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib's own handler, and also keeps each redirect response's headers (a file
    host such as the Hugging Face hub states the file's sha256 and size on its redirect to the CDN).

    An Authorization header goes only to the host it was meant for: urllib does not copy an "unredirected"
    header to the next request, and this handler puts it back only when the redirect stays on that host.
    """

    def __init__(self) -> None:
        self.headers: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and urllib.parse.urlsplit(newurl).netloc == urllib.parse.urlsplit(
                req.full_url).netloc:
            new.add_unredirected_header("Authorization", auth)
        return new


def _open(url: str, headers: dict[str, str], token: str | None, timeout: float, connect_timeout: float,
          redirects: _RecordingRedirects):
    """The response to a GET of `url`; `redirects.headers` collects the headers of each redirect on the way."""
    opener = urllib.request.build_opener(_HTTPHandler(connect_timeout), _HTTPSHandler(connect_timeout), redirects)
    request = urllib.request.Request(url, headers={"User-Agent": "llmscratch", **headers})
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return opener.open(request, timeout=timeout)


def _stated_sha256(chain: list) -> str | None:
    """The sha256 a server states for the file, if any: `X-Linked-Etag` on a redirect (the Hugging Face hub's
    LFS object id), else the first response's `ETag` when it is 64 hex digits. Other ETags (git blob ids,
    MD5s, mtime-size pairs) are not content hashes of this kind and are ignored."""
    values = [h.get("X-Linked-Etag") for h in chain] + [chain[0].get("ETag") if chain else None]
    for value in values:
        if value:
            value = value.strip().removeprefix("W/").strip('"').lower()
            if re.fullmatch(r"[0-9a-f]{64}", value):
                return value
    return None


def _stated_size(chain: list) -> int | None:
    for h in chain:
        value = (h.get("X-Linked-Size") or "").strip()
        if value.isdigit():
            return int(value)
    return None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a `Content-Range: bytes first-last/total` (or `bytes */total`) header."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


@dataclass
class _Fetched:
    sha256: str  # of the whole .part file
    size: int  # bytes in it
    stated_sha256: str | None  # what the server said the file's sha256 is
    stated_size: int | None  # what the server said its size is
    resumed: bool  # True when earlier bytes of the .part were kept


def _fetch(part, url: str, name: str, token: str | None, timeout: float, connect_timeout: float,
           progress: bool) -> _Fetched:
    """Bring the open `.part` file up to the full content of `url`, continuing from its current length with an
    HTTP Range request; a server that ignores Range (200 instead of 206) makes it start over."""
    have = part.seek(0, os.SEEK_END)
    redirects = _RecordingRedirects()
    try:
        response = _open(url, {"Range": f"bytes={have}-"} if have else {}, token, timeout, connect_timeout,
                         redirects)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:
            raise
        # Range not satisfiable: the .part is already whole (a crash just before the rename) or longer than the
        # file now is. The former is checked by the caller's hash; the latter starts over.
        _, total = _content_range(exc.headers.get("Content-Range"))
        exc.close()
        if total != have:
            part.seek(0)
            part.truncate()
            return _fetch(part, url, name, token, timeout, connect_timeout, progress)
        chain = [*redirects.headers, exc.headers]
        return _Fetched(_sha256_of_file(part, have), have, _stated_sha256(chain), _stated_size(chain) or total, True)
    with response:
        status = getattr(response, "status", None)  # None for file:// URLs
        start, total = _content_range(response.headers.get("Content-Range"))
        if status == 206 and start != have:  # a part we did not ask for: start over without Range
            response.close()
            part.seek(0)
            part.truncate()
            return _fetch(part, url, name, token, timeout, connect_timeout, progress)
        if have and status != 206:
            have = 0  # the server ignored Range: the body is the whole file
            part.seek(0)
            part.truncate()
        if status != 206:
            length = (response.headers.get("Content-Length") or "").strip()
            total = int(length) if length.isdigit() else None
        digest = hashlib.sha256()
        if have:
            digest = _sha256_of_file(part, have, digest)
        part.seek(have)
        with tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"downloading {name}", disable=not progress) as bar:
            while block := response.read(1 << 20):
                part.write(block)
                digest.update(block)
                bar.update(len(block))
        part.flush()
        size = part.tell()
    if total is not None and size < total:  # urllib returns a short body without raising: keep it, resume later
        raise ConnectionError(f"connection closed after {size:,} of {total:,} bytes")
    chain = [*redirects.headers, response.headers]
    return _Fetched(digest.hexdigest(), size, _stated_sha256(chain), _stated_size(chain) or total, have > 0)


def _sha256_of_file(f, length: int, digest=None):
    """sha256 of the first `length` bytes of the open binary file `f` (a hashlib object if `digest` is given,
    updated in place; else the hex digest)."""
    own = digest is None
    digest = digest or hashlib.sha256()
    f.seek(0)
    left = length
    while left and (block := f.read(min(1 << 20, left))):
        digest.update(block)
        left -= len(block)
    return digest.hexdigest() if own else digest


def _lock(f, part: Path, name: str) -> None:
    """Exclusive lock on the .part file: two processes appending to it would interleave garbage."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent downloads of one file are the user's risk
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{part}: another process is downloading {name} into this file; wait for it to "
                        "finish, then run again") from None


def download(
    url: str,
    dest: str | Path,
    sha256: str | None,
    *,
    name: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    size: int | None = None,
    connect_timeout: float | None = None,
    token: str | None = None,
    server_hash: bool = False,
    hint: str | None = None,
) -> Path:
    """Fetch `url` to `dest` unless `dest` already holds the right bytes; returns `dest`.

    Bytes go to `dest` + ".part" and are renamed into place only once they pass the checks, so a file under
    the real name is always whole. The .part file survives a dropped connection or Ctrl-C, and the next call
    continues it with an HTTP `Range: bytes=N-` request (a server that ignores Range sends the whole file
    and the download starts over).

    Checks: `sha256` (hex digest) and `size` (bytes) when given; with `server_hash`, a sha256 the server
    states (see `_stated_sha256`) stands in for a missing `sha256`; a size the server states (Content-Length,
    Content-Range, X-Linked-Size) must be met too. A mismatch removes the .part file.

    `timeout` bounds each read, `connect_timeout` (default: `timeout`) the connection. `token` is sent as
    `Authorization: Bearer` to the URL's host only, never to a host it redirects to. Failures raise UserError
    naming `name` (default: the file name) and the URL, followed by `hint` (what to do instead; default:
    the advice for corpora).
    """
    dest = Path(dest)
    name = name or dest.name
    hint = hint or f"pass a local file with --data PATH, or place the file at {dest}"

    def cached() -> bool:
        return (dest.is_file() and (size is None or dest.stat().st_size == size)
                and (sha256 is None or sha256_of(dest) == sha256))

    if cached():
        return dest
    part_path = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = open(part_path, "a+b")
    except OSError as exc:
        raise UserError(f"cannot write {part_path} ({_one_line(exc.strerror or exc)}); set LLMSCRATCH_CACHE to "
                        "a writable folder") from None

    def discard() -> None:  # remove the .part file, unless it is no longer ours (renamed, or replaced)
        try:
            if os.path.samestat(os.fstat(part.fileno()), os.stat(part_path)):
                part_path.unlink()
        except OSError:
            pass

    # A crash or Ctrl-C keeps the .part file: the next call continues from its bytes.
    try:
        _lock(part, part_path, name)
        if cached():  # another process finished it while this one was starting
            discard()
            return dest
        problem = None
        for _attempt in range(2):
            fetched = None
            try:
                fetched = _fetch(part, url, name, token, timeout, connect_timeout or timeout, progress)
            except urllib.error.HTTPError as exc:
                reason = f"HTTP {exc.code} {exc.reason}"
            except urllib.error.URLError as exc:
                reason = exc.reason
            except (OSError, http.client.HTTPException, ValueError) as exc:  # timeouts, resets, bad URLs
                reason = f"{type(exc).__name__}: {exc}"
            if fetched is None:
                have = part.seek(0, os.SEEK_END)
                if not have:
                    discard()
                kept = (f"; the {have:,} bytes received are kept in {part_path} and the next run continues "
                        "from there") if have else ""
                raise UserError(f"could not download {name} from {url} ({_one_line(reason)}){kept}; {hint}")
            want_sha = sha256 or (fetched.stated_sha256 if server_hash else None)
            if size is not None and fetched.size != size:
                problem = f"it has {fetched.size:,} bytes, expected {size:,}"
            elif fetched.stated_size is not None and fetched.size != fetched.stated_size:
                problem = f"it has {fetched.size:,} bytes but the server said {fetched.stated_size:,}"
            elif want_sha is not None and fetched.sha256 != want_sha:
                problem = f"its sha256 is {fetched.sha256}, expected {want_sha}"
            else:
                os.replace(part_path, dest)
                return dest
            part.seek(0)
            part.truncate()
            if not fetched.resumed:  # bytes kept from an earlier run may belong to an older file: retry afresh
                break
        discard()
        raise UserError(f"downloaded {name} from {url} but {problem}; the file may be truncated or changed "
                        f"upstream: retry, or {hint}")
    finally:
        part.close()


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


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_source(src: str | Path) -> str | list[Path]:
    """What `src` names: a corpus name from `CORPORA` (returned as is) or the sorted list of files to read.

    A bare corpus name wins over a file of the same name in the working directory; write ./pydocs to mean
    the path. A folder contributes its *.txt and *.md files, recursively, skipping hidden ones; a glob
    (``data/*.txt``, ``books/**/*.md``) contributes the files it matches.
    """
    text = str(src)
    if isinstance(src, str) and text in CORPORA:
        return text
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in _TEXT_SUFFIXES and p.is_file() and not _hidden(p, path)
        )
        if not files:
            raise UserError(
                f"{path}: folder has no .txt or .md files; put the training text in such files or pass "
                "a file or glob with --data"
            )
        return files
    if _is_glob(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise UserError(f"{text}: glob matches no files; check the pattern (quote it in the shell)")
        return files
    raise UserError(
        f"{text}: no such file or folder, and not a corpus name; pass an existing path or glob, or one "
        f"of {', '.join(CORPORA)}"
    )


def read_text_file(path: Path) -> str:
    """The file's text as UTF-8 (a leading BOM dropped, CRLF turned into LF); UserError if it is not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({_one_line(exc.strerror or exc)})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); convert it, e.g. "
            f"iconv -f LATIN1 -t UTF-8, or leave it out"
        ) from None
    return text.replace("\r\n", "\n")


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
