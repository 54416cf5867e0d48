"""The one HTTP downloader (corpora, data sets, pretrained weights) and the cache folder downloads go to.

`download(url, dest, sha256)` is resumable and checked: bytes go to `dest` + ".part" and are renamed into place
only once they pass the checks (sha256 and size given, or stated by the server), so a file under its real name is
always whole; the .part file survives a dropped connection or Ctrl-C and the next call continues it with an HTTP
`Range: bytes=N-` request. Standard library only (urllib), so it sits below both `data` and `weights`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llmscratch.errors import UserError, one_line
from llmscratch.fileio import sha256_of

__all__ = ["cache_dir", "download"]


def cache_dir() -> Path:
    """Folder for downloads and built corpora: $LLMSCRATCH_CACHE, else $XDG_CACHE_HOME/llmscratch, else
    ~/.cache/llmscratch. Not created here; writers create what they need."""
    if env := os.environ.get("LLMSCRATCH_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "llmscratch"
    return Path.home() / ".cache" / "llmscratch"


# ---------------------------------------------------------------------------------------------------------
# urllib: a separate connect timeout, and the headers of each redirect


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


# ---------------------------------------------------------------------------------------------------------
# what the server states


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


def _content_length(headers) -> int | None:
    length = (headers.get("Content-Length") or "").strip()
    return int(length) if length.isdigit() else None


# ---------------------------------------------------------------------------------------------------------
# one fetch into the .part file


@dataclass(frozen=True)
class _Request:
    """One `download` call's arguments, as its helpers need them."""

    url: str
    dest: Path
    sha256: str | None
    name: str
    size: int | None
    timeout: float
    connect_timeout: float
    token: str | None
    server_hash: bool
    hint: str
    progress: bool

    @property
    def part_path(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    def cached(self) -> bool:
        """`dest` already holds the right bytes (as far as `size` and `sha256` tell)."""
        dest = self.dest
        return (dest.is_file() and (self.size is None or dest.stat().st_size == self.size)
                and (self.sha256 is None or sha256_of(dest) == self.sha256))


@dataclass
class _Fetched:
    sha256: str  # of the whole .part file
    size: int  # bytes in it
    stated_sha256: str | None  # what the server said the file's sha256 is
    stated_size: int | None  # what the server said its size is
    resumed: bool  # True when earlier bytes of the .part were kept


def _open(req: _Request, headers: dict[str, str], redirects: _RecordingRedirects):
    """The response to a GET of the URL; `redirects.headers` collects the headers of each redirect on the way."""
    opener = urllib.request.build_opener(_HTTPHandler(req.connect_timeout), _HTTPSHandler(req.connect_timeout),
                                         redirects)
    request = urllib.request.Request(req.url, headers={"User-Agent": "llmscratch", **headers})
    if req.token:
        request.add_unredirected_header("Authorization", f"Bearer {req.token}")
    return opener.open(request, timeout=req.timeout)


def _truncate(part) -> int:
    """Empty the open .part file; returns its new length, 0."""
    part.seek(0)
    part.truncate()
    return 0


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


def _append_body(response, part, have: int, total: int | None, req: _Request):
    """Append the response body to the .part file after its first `have` bytes; returns (a hashlib sha256 of
    the whole file, its size)."""
    digest = _sha256_of_file(part, have, hashlib.sha256())
    part.seek(have)
    with tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"downloading {req.name}", disable=not req.progress) as bar:
        while block := response.read(1 << 20):
            part.write(block)
            digest.update(block)
            bar.update(len(block))
    part.flush()
    return digest, part.tell()


def _after_416(part, req: _Request, exc: urllib.error.HTTPError, have: int,
               redirects: _RecordingRedirects) -> _Fetched:
    """Range not satisfiable: the .part is already whole (a crash just before the rename) or longer than the
    file now is. The former is checked by the caller's hash; the latter starts over."""
    _, total = _content_range(exc.headers.get("Content-Range"))
    exc.close()
    if total != have:
        _truncate(part)
        return _fetch(part, req)
    chain = [*redirects.headers, exc.headers]
    return _Fetched(_sha256_of_file(part, have), have, _stated_sha256(chain), _stated_size(chain) or total, True)


def _fetch(part, req: _Request) -> _Fetched:
    """Bring the open `.part` file up to the full content of the URL, continuing from its current length with an
    HTTP Range request; a server that ignores Range (200 instead of 206) makes it start over."""
    have = part.seek(0, os.SEEK_END)
    redirects = _RecordingRedirects()
    try:
        response = _open(req, {"Range": f"bytes={have}-"} if have else {}, redirects)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:
            raise
        return _after_416(part, req, exc, have, redirects)
    with response:
        status = getattr(response, "status", None)  # None for file:// URLs
        start, total = _content_range(response.headers.get("Content-Range"))
        if status == 206 and start != have:  # a part we did not ask for: start over without Range
            response.close()
            _truncate(part)
            return _fetch(part, req)
        if status != 206:  # the whole file: no Range asked for, or the server ignored it
            have, total = _truncate(part), _content_length(response.headers)
        digest, size = _append_body(response, part, have, total, req)
    if total is not None and size < total:  # urllib returns a short body without raising: keep it, resume later
        raise ConnectionError(f"connection closed after {size:,} of {total:,} bytes")
    chain = [*redirects.headers, response.headers]
    return _Fetched(digest.hexdigest(), size, _stated_sha256(chain), _stated_size(chain) or total, have > 0)


# ---------------------------------------------------------------------------------------------------------
# the .part file's life: open and lock, fetch and check, rename or discard


def _open_part(req: _Request):
    try:
        req.dest.parent.mkdir(parents=True, exist_ok=True)
        return open(req.part_path, "a+b")
    except OSError as exc:
        raise UserError(f"cannot write {req.part_path} ({one_line(exc.strerror or exc)}); set LLMSCRATCH_CACHE "
                        "to a writable folder") from None


def _lock(part, req: _Request) -> None:
    """Exclusive lock on the .part file: two processes appending to it would interleave garbage."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent downloads of one file are the user's risk
        return
    try:
        fcntl.flock(part.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{req.part_path}: another process is downloading {req.name} into this file; wait for "
                        "it to finish, then run again") from None


def _discard(part, req: _Request) -> None:
    """Remove the .part file, unless it is no longer ours (renamed, or replaced by another process)."""
    try:
        if os.path.samestat(os.fstat(part.fileno()), os.stat(req.part_path)):
            req.part_path.unlink()
    except OSError:
        pass


def _fetch_or_fail(part, req: _Request) -> _Fetched:
    """`_fetch`, with a network or server failure turned into a UserError; the bytes received stay in the .part
    file for the next call (an empty one is removed)."""
    try:
        return _fetch(part, req)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = exc.reason
    except (OSError, http.client.HTTPException, ValueError) as exc:  # timeouts, resets, bad URLs
        reason = f"{type(exc).__name__}: {exc}"
    have = part.seek(0, os.SEEK_END)
    if not have:
        _discard(part, req)
    kept = (f"; the {have:,} bytes received are kept in {req.part_path} and the next run continues from there"
            if have else "")
    raise UserError(f"could not download {req.name} from {req.url} ({one_line(reason)}){kept}; {req.hint}")


def _problem(req: _Request, fetched: _Fetched) -> str | None:
    """What is wrong with the fetched bytes (size or sha256 not as given or stated), or None."""
    want_sha = req.sha256 or (fetched.stated_sha256 if req.server_hash else None)
    if req.size is not None and fetched.size != req.size:
        return f"it has {fetched.size:,} bytes, expected {req.size:,}"
    if fetched.stated_size is not None and fetched.size != fetched.stated_size:
        return f"it has {fetched.size:,} bytes but the server said {fetched.stated_size:,}"
    if want_sha is not None and fetched.sha256 != want_sha:
        return f"its sha256 is {fetched.sha256}, expected {want_sha}"
    return None


def _fetch_checked(part, req: _Request) -> None:
    """Fetch into the locked .part file until its bytes pass the checks, then rename it to `dest`. Bytes kept
    from an earlier run that fail them may belong to an older file: one retry starts afresh."""
    for _attempt in range(2):
        fetched = _fetch_or_fail(part, req)
        problem = _problem(req, fetched)
        if problem is None:
            os.replace(req.part_path, req.dest)
            return
        _truncate(part)
        if not fetched.resumed:
            break
    _discard(part, req)
    raise UserError(f"downloaded {req.name} from {req.url} but {problem}; the file may be truncated or changed "
                    f"upstream: retry, or {req.hint}")


def download(url: str, dest: str | Path, sha256: str | None, *, name: str | None = None, timeout: float = 30.0,
             progress: bool = True, size: int | None = None, connect_timeout: float | None = None,
             token: str | None = None, server_hash: bool = False, hint: str | None = None) -> Path:
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
    req = _Request(url, dest, sha256, name or dest.name, size, timeout, connect_timeout or timeout, token,
                   server_hash, hint or f"pass a local file with --data PATH, or place the file at {dest}", progress)
    if req.cached():
        return dest
    part = _open_part(req)
    try:  # a crash or Ctrl-C keeps the .part file: the next call continues from its bytes
        _lock(part, req)
        if req.cached():  # another process finished it while this one was starting
            _discard(part, req)
        else:
            _fetch_checked(part, req)
        return dest
    finally:
        part.close()
