"""Corpora: the embedded stdlib text, named downloads with their cache, and local files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import shutil
import socket
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscratch.data import corpora
from llmscratch.data.corpora import (
    CORPORA,
    NAMED_DOWNLOADS,
    Continuation,
    fetch_corpus,
    iter_corpus,
    load_corpus,
    pydocs_documents,
    pydocs_text,
    resolve_source,
)
from llmscratch.download import cache_dir, download
from llmscratch.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    # every urllib request, urlopen's or a custom opener's, goes through OpenerDirector.open
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", refuse)


@pytest.fixture
def http_root(tmp_path):
    """A folder served over http://127.0.0.1:<port>/ for the duration of a test."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- cache folder -----------------------------------------------------------------------------------------


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMSCRATCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "llmscratch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "llmscratch"


# --- pydocs ----------------------------------------------------------------------------------------------


def test_pydocs_is_a_deterministic_deduplicated_english_corpus(isolated_cache, capfd):
    cold = pydocs_documents()
    cached_files = list((isolated_cache / "pydocs").glob("pydocs-*.json"))
    assert len(cached_files) == 1, "the built corpus is cached"
    assert pydocs_documents() == cold  # from the cache
    cached_files[0].unlink()
    assert pydocs_documents() == cold  # rebuilt from scratch: same documents, same order

    # importing the stdlib happens in a child process whose output the caller never sees
    out, err = capfd.readouterr()
    assert out == "" and err == ""

    assert len(cold) == len(set(cold)), "no document repeats"
    paragraphs = [" ".join(p.split()) for doc in cold for p in re.split(r"\n[ \t]*\n", doc)]
    assert len(paragraphs) == len(set(paragraphs)), "no paragraph repeats"
    text = pydocs_text()
    assert text == "\n\n".join(cold)
    assert len(text.encode("utf-8")) > 500_000
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert {"the", "function", "return", "which", "argument", "because"} <= words
    assert "The Zen of Python" not in text  # `this` is never imported
    assert load_corpus("pydocs") == cold


def test_pydocs_rebuilds_a_damaged_cache(isolated_cache, monkeypatch):
    monkeypatch.setattr(corpora, "_build_pydocs", lambda: ["rebuilt"])
    path = corpora._pydocs_cache_file()
    path.parent.mkdir(parents=True)
    path.write_text("{ truncated")
    assert pydocs_documents() == ["rebuilt"]
    assert pydocs_documents() == ["rebuilt"]  # and the repaired cache is used


def test_dedup_drops_repeated_paragraphs_and_empty_documents():
    raw = [["A b.\n\nSame  text.", "Other."], ["Same text."], ["same text.", "A b."]]
    assert corpora._dedup_documents(raw) == ["A b.\n\nSame  text.\n\nOther.", "same text."]


# --- downloads -------------------------------------------------------------------------------------------


def test_download_file_url_caches_and_skips_the_network(tmp_path, monkeypatch):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello corpus\n")
    dest = tmp_path / "cache" / "out.txt"
    assert download(src.as_uri(), dest, _sha(b"hello corpus\n"), progress=False) == dest
    assert dest.read_bytes() == b"hello corpus\n"

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", lambda *a, **k: pytest.fail("network used"))
    assert download("http://127.0.0.1:9/never", dest, _sha(b"hello corpus\n")) == dest


def test_download_over_http(http_root):
    root, base = http_root
    data = b"x" * 200_000
    (root / "big.txt").write_bytes(data)
    dest = root.parent / "dl" / "big.txt"
    download(f"{base}/big.txt", dest, _sha(data), progress=False)
    assert dest.read_bytes() == data


def test_download_bad_hash_leaves_nothing(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"tampered")
    dest = tmp_path / "dl" / "corpus.txt"
    with pytest.raises(UserError, match="sha256") as info:
        download(src.as_uri(), dest, "0" * 64, name="mycorpus", progress=False)
    assert "mycorpus" in str(info.value) and "--data PATH" in str(info.value)
    assert list(dest.parent.iterdir()) == []


def test_download_replaces_a_cached_file_with_the_wrong_hash(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"good")
    dest = tmp_path / "dl" / "corpus.txt"
    dest.parent.mkdir()
    dest.write_bytes(b"stale")
    download(src.as_uri(), dest, _sha(b"good"), progress=False)
    assert dest.read_bytes() == b"good"


def test_download_unreachable_is_one_line_suggesting_data(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/the-verdict.txt"
    dest = tmp_path / "dl" / "the-verdict.txt"
    with pytest.raises(UserError) as info:
        download(url, dest, "0" * 64, name="the-verdict", timeout=5, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"could not download the-verdict from {url} (")
    assert "pass a local file with --data PATH" in message and str(dest) in message
    assert list(dest.parent.iterdir()) == []


def test_download_http_error_names_the_status(http_root):
    _, base = http_root
    with pytest.raises(UserError, match="HTTP 404"):
        download(f"{base}/missing.txt", http_root[0].parent / "dl" / "x.txt", None, progress=False)


class _RangeServer:
    """An HTTP server on 127.0.0.1 serving byte strings from `files` (path → bytes), with `Range: bytes=N-`
    support that tests can switch off, redirects (`redirects`: path → (location, extra headers)), a
    connection cut after `cut_after` bytes of one response, and a log of each request's path and headers."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, tuple[str, dict]] = {}
        self.honour_range = True
        self.cut_after: int | None = None
        self.requests: list[tuple[str, dict]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, dict(self.headers)))
                if self.path in outer.redirects:
                    location, extra = outer.redirects[self.path]
                    self.send_response(302)
                    self.send_header("Location", location)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = int(m[1]) if m and outer.honour_range else 0
                if start >= len(data) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if m and outer.honour_range else 200)
                if m and outer.honour_range:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if outer.cut_after is not None:  # drop the connection mid-body, once
                    body, outer.cut_after = body[: outer.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def range_server():
    server = _RangeServer()
    try:
        yield server
    finally:
        server.close()


def test_download_resumes_a_partial_file_with_a_range_request(range_server, tmp_path):
    data = bytes(range(256)) * 1000
    range_server.files["/f.bin"] = data
    dest = tmp_path / "dl" / "f.bin"
    dest.parent.mkdir()
    (tmp_path / "dl" / "f.bin.part").write_bytes(data[:100_000])
    download(f"{range_server.base}/f.bin", dest, _sha(data), progress=False)
    assert dest.read_bytes() == data and not (tmp_path / "dl" / "f.bin.part").exists()
    assert [h.get("Range") for _, h in range_server.requests] == ["bytes=100000-"]


def test_download_dropped_connection_keeps_the_part_file_and_the_next_call_continues(range_server, tmp_path):
    data = b"0123456789" * 50_000
    range_server.files["/f.bin"] = data
    range_server.cut_after = 123_456
    dest = tmp_path / "dl" / "f.bin"
    with pytest.raises(UserError) as info:
        download(f"{range_server.base}/f.bin", dest, _sha(data), name="f", progress=False, hint="try X")
    message = str(info.value)
    assert "\n" not in message and "123,456 bytes received are kept" in message and message.endswith("; try X")
    assert (tmp_path / "dl" / "f.bin.part").read_bytes() == data[:123_456] and not dest.exists()
    download(f"{range_server.base}/f.bin", dest, _sha(data), progress=False)
    assert dest.read_bytes() == data
    assert range_server.requests[-1][1].get("Range") == "bytes=123456-"


def test_download_starts_over_when_the_server_ignores_range(range_server, tmp_path):
    data = b"abcdef" * 10_000
    range_server.files["/f.bin"] = data
    range_server.honour_range = False
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"garbage that must not stay in front")
    download(f"{range_server.base}/f.bin", dest, None, size=len(data), progress=False)
    assert dest.read_bytes() == data
    assert range_server.requests[0][1].get("Range") == "bytes=35-"


def test_download_stale_part_of_another_file_is_discarded_after_the_hash_check(range_server, tmp_path):
    old, new = b"old version " * 5000, b"new version!" * 5000
    range_server.files["/f.bin"] = new
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(old[:20_000])  # resumes, fails the hash, then fetches afresh
    download(f"{range_server.base}/f.bin", dest, _sha(new), progress=False)
    assert dest.read_bytes() == new
    assert [h.get("Range") for _, h in range_server.requests] == ["bytes=20000-", None]


def test_download_complete_part_file_is_taken_after_a_416(range_server, tmp_path):
    data = b"whole" * 1000
    range_server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data)  # a crash between the last byte and the rename
    download(f"{range_server.base}/f.bin", tmp_path / "f.bin", _sha(data), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data and not (tmp_path / "f.bin.part").exists()


@pytest.mark.parametrize("pinned", ["sha256", "size"])
def test_download_mismatch_removes_everything(range_server, tmp_path, pinned):
    range_server.files["/f.bin"] = b"tampered" * 100
    dest = tmp_path / "dl" / "f.bin"
    kwargs = {"sha256": "0" * 64} if pinned == "sha256" else {"sha256": None, "size": 5}
    with pytest.raises(UserError, match="sha256 is" if pinned == "sha256" else "800 bytes, expected 5"):
        download(f"{range_server.base}/f.bin", dest, progress=False, **kwargs)
    assert list(dest.parent.iterdir()) == []


def test_download_checks_the_sha256_and_size_a_redirect_states(range_server, tmp_path):
    data = b"lfs object" * 3000
    good = {"X-Linked-Etag": f'"{_sha(data)}"', "X-Linked-Size": str(len(data)), "ETag": '"abc123"'}
    range_server.files["/cdn/blob"] = data
    range_server.redirects["/resolve/good"] = (f"{range_server.base}/cdn/blob", good)
    range_server.redirects["/resolve/bad"] = (f"{range_server.base}/cdn/blob", {**good, "X-Linked-Etag": "f" * 64})
    download(f"{range_server.base}/resolve/good", tmp_path / "good", None, server_hash=True, progress=False)
    assert (tmp_path / "good").read_bytes() == data
    with pytest.raises(UserError, match=f"expected {'f' * 64}"):
        download(f"{range_server.base}/resolve/bad", tmp_path / "bad", None, server_hash=True, progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.part").exists()
    download(f"{range_server.base}/resolve/bad", tmp_path / "unchecked", None, progress=False)  # opt-in only


def test_download_sends_the_token_to_the_first_host_only(range_server, tmp_path):
    range_server.files["/cdn/blob"] = b"x" * 10
    other_host = range_server.base.replace("127.0.0.1", "localhost")
    range_server.redirects["/resolve/a"] = ("/resolve/b", {})  # same host: keeps the token
    range_server.redirects["/resolve/b"] = (f"{other_host}/cdn/blob", {})  # elsewhere: drops it
    download(f"{range_server.base}/resolve/a", tmp_path / "f", None, token="secret", progress=False)
    auth = [(path, h.get("Authorization")) for path, h in range_server.requests]
    assert auth == [("/resolve/a", "Bearer secret"), ("/resolve/b", "Bearer secret"), ("/cdn/blob", None)]


def test_download_connect_timeout_is_separate_from_the_read_timeout(monkeypatch, tmp_path):
    seen = []
    real = socket.create_connection

    def spy(address, timeout=None, *args, **kwargs):
        seen.append(timeout)
        return real(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    url = f"http://127.0.0.1:{_closed_port()}/x"
    with pytest.raises(UserError, match="could not download"):
        download(url, tmp_path / "x", None, timeout=60, connect_timeout=2.5, progress=False)
    assert seen == [2.5]


@pytest.mark.parametrize("name", ["the-verdict", "tinyshakespeare"])
def test_named_corpus_uses_the_cache_without_network(name, isolated_cache, no_network):
    shared = SHARED_DATA / NAMED_DOWNLOADS[name].filename
    if not shared.is_file():
        pytest.skip(f"{shared} is absent")
    target = isolated_cache / "corpora" / NAMED_DOWNLOADS[name].filename
    target.parent.mkdir(parents=True)
    shutil.copyfile(shared, target)
    assert fetch_corpus(name) == target
    documents = load_corpus(name)
    assert documents == [shared.read_text(encoding="utf-8")]


def test_named_corpus_offline_error_says_where_to_put_the_file(isolated_cache, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/the-verdict.txt"
    verdict = NAMED_DOWNLOADS["the-verdict"]
    monkeypatch.setitem(
        NAMED_DOWNLOADS,
        "the-verdict",
        corpora.NamedCorpus(verdict.name, url, verdict.sha256, verdict.filename, verdict.description),
    )
    with pytest.raises(UserError) as info:
        load_corpus("the-verdict", progress=False)
    message = str(info.value)
    assert "could not download the-verdict" in message and "--data PATH" in message
    assert str(isolated_cache / "corpora" / "the-verdict.txt") in message


def test_registry_names():
    assert CORPORA == ("pydocs", "the-verdict", "tinyshakespeare", "gutenberg")
    assert all(len(c.sha256) == 64 and c.url.startswith("https://") for c in NAMED_DOWNLOADS.values())


# --- local files -----------------------------------------------------------------------------------------


def test_load_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffline one\r\nline two\n".encode())
    assert load_corpus(str(path)) == ["line one\nline two\n"]
    assert load_corpus(path) == ["line one\nline two\n"]


def test_load_folder_recursive_sorted_text_only(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("ay")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "tokens.bin").write_bytes(b"\xff\xfe")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("hidden")
    assert resolve_source(tmp_path) == [
        tmp_path / "a.txt",
        tmp_path / "b.txt",
        tmp_path / "empty.txt",
        tmp_path / "sub" / "a.md",
    ]
    assert load_corpus(tmp_path) == ["a", "bee", "ay"]


def test_load_glob(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    assert load_corpus(str(tmp_path / "x*.txt")) == ["x1.txt", "x2.txt"]


def _self_linked_tree(root: Path) -> Path:
    """root/d: a.txt, sub/b.md, a file link to a.txt, and two folder links back to d (a loop, twice over)."""
    d = root / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha")
    (d / "sub" / "b.md").write_text("beta")
    (d / "alias.txt").symlink_to(d / "a.txt")
    (d / "loop").symlink_to(d, target_is_directory=True)
    (d / "sub" / "up").symlink_to(d, target_is_directory=True)
    return d


@pytest.mark.parametrize(("pattern", "texts"), [("d/**/*.txt", ["alpha"]), ("d/**", ["alpha", "beta"]),
                                               ("**/*.md", ["beta"]), ("d/*/*.txt", ["alpha"]),
                                               ("d/**/sub/*.md", ["beta"])])
def test_globs_through_self_links_read_each_file_once(tmp_path, monkeypatch, pattern, texts):
    """Folders linked into themselves: the standard `**` walks such a loop ~40 levels deep, and two of them
    for ever; a file and a link to it are one document."""
    monkeypatch.chdir(tmp_path)
    _self_linked_tree(tmp_path)
    assert load_corpus(pattern) == texts


def test_folder_with_self_links_reads_each_file_once_and_follows_other_linked_folders(tmp_path):
    d = _self_linked_tree(tmp_path)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "c.txt").write_text("gamma")
    (d / "more").symlink_to(tmp_path / "more", target_is_directory=True)
    assert resolve_source(d) == [d / "a.txt", d / "more" / "c.txt", d / "sub" / "b.md"]
    assert load_corpus(d) == ["alpha", "gamma", "beta"]


def test_corpus_name_wins_over_a_same_named_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("pydocs").write_text("local")
    assert resolve_source("pydocs") == "pydocs"
    assert load_corpus("./pydocs") == ["local"]


# --- streaming: JSONL, large files in pieces, laziness, parquet -------------------------------------------


def _jsonl(path: Path, *records) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_jsonl_gives_one_document_per_record_of_the_text_field(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", {"text": "first", "id": 1}, "", {"text": "  "}, {"text": "sec\r\nond"},
               {"body": "x", "text": "third"})
    assert load_corpus(f) == ["first", "sec\r\nond", "third"]  # a record's text is its content, CR and all
    g = _jsonl(tmp_path / "e.ndjson", {"body": "b1", "text": "t"}, {"body": "b2", "text": "u"})
    assert load_corpus(g, text_field="body") == ["b1", "b2"]
    (tmp_path / "notes.txt").write_text("plain")
    assert load_corpus(tmp_path) == ["first", "sec\r\nond", "third", "t", "u", "plain"]  # folders take JSONL too
    assert load_corpus(str(tmp_path / "*.jsonl")) == ["first", "sec\r\nond", "third"]


@pytest.mark.parametrize(("lines", "field", "expected"), [
    ([{"text": "a"}, '{"text": "b"'], "text", r"d\.jsonl:2: not valid JSON .*one complete object per line"),
    ([["a list"]], "text", r"d\.jsonl:1: expected a JSON object, got list"),
    ([{"text": "a"}, {"body": "b"}], "text",
     r"d\.jsonl:2: missing key 'text'; name the field that holds the text with --text-field \(keys: body\)"),
    ([{"text": 3}], "text", r"d\.jsonl:1: 'text' must be a string, got int"),
    ([{"text": " "}, {"text": ""}], "text", r"d\.jsonl: no record has text in 'text'; name the field"),
])
def test_jsonl_mistakes_name_the_file_and_line(tmp_path, lines, field, expected):
    f = _jsonl(tmp_path / "d.jsonl", *lines)
    with pytest.raises(UserError, match=expected) as info:
        load_corpus(f, text_field=field)
    assert "\n" not in str(info.value)


def test_jsonl_line_that_is_not_utf8(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not UTF-8 text \(byte 13 of the line is 0xe9\)"):
        load_corpus(f)


def _big_text(n_bytes: int) -> str:
    """Prose over `n_bytes`, with what a cut must respect: CRLF and LF lines, blank lines, runs of spaces,
    multi-byte characters, punctuation before newlines, contractions and numbers."""
    lines = ["It's 12,345 km from Zürich to 東京 — isn't it?", "  indented  line  ", "", "end.", "a\tb ( c )",
             "ünïcödé  ", "x"]
    out, size, i = [], 0, 0
    while size < n_bytes:
        line = f"{lines[i % len(lines)]} {i}" + ("\r\n" if i % 3 == 0 else "\n")
        out.append(line)
        size += len(line.encode())
        i += 1
    return "".join(out)


def test_a_large_file_comes_in_pieces_that_join_to_its_text(tmp_path):
    text = _big_text(int(2.6 * (1 << 20)))
    f = tmp_path / "big.txt"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode())
    pieces = list(iter_corpus(f))
    assert len(pieces) >= 2
    assert type(pieces[0]) is str and all(type(p) is Continuation for p in pieces[1:])
    assert all(len(p) < 2 * (1 << 20) for p in pieces)  # characters: a read adds at most 1 MiB of them
    whole = text.replace("\r\n", "\n")
    assert "".join(pieces) == whole
    for left, right in zip(pieces, pieces[1:]):  # each cut: before " x" or after "x\n", x not a space
        assert not left[-1].isspace() or (left[-1] == "\n" and not left[-2].isspace())
        assert not right[0].isspace() or (right[0] == " " and not right[1].isspace())
    assert load_corpus(f) == [whole]  # load_corpus joins the pieces: one document per file, as ever
    assert load_corpus(tmp_path) == [whole]


def test_a_large_file_that_is_not_utf8_names_the_byte(tmp_path):
    data = bytearray(_big_text(3 << 20).encode())
    bad = data.index(b"end.", 1_500_000)  # an ASCII byte in the second read
    data[bad] = 0xFF
    f = tmp_path / "big.txt"
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"big\.txt: not UTF-8 text \(byte {bad} is 0xff\)"):
        list(iter_corpus(f))
    f.write_bytes(bytes(data[:bad]) + "é".encode()[:1])  # a character cut off by the end of the file
    with pytest.raises(UserError, match=rf"big\.txt: not UTF-8 text \(byte {bad} is 0xc3\)"):
        list(iter_corpus(f))


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_complete_utf8_holds_back_a_cut_character(size):
    char = {1: "a", 2: "é", 3: "東", 4: "😀"}[size].encode()
    data = b"xy" + char
    assert corpora._complete_utf8(data) == len(data)
    for keep in range(1, size):
        assert corpora._complete_utf8(data[:2 + keep]) == 2


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_ALPHABET = st.sampled_from(list("ab Z9'.,-(\n\n  \t\r") + ["é", "東", "\u00a0", "\u3000", "\u2028", "'s", "\x1c"])


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(_ALPHABET, min_size=2, max_size=40))
def test_every_cut_is_a_word_boundary_for_gpt2_and_llama3(parts):
    """BPE merges never cross a pre-tokenizer "word", so pieces cut where the words of the whole text start
    (and end the same way alone) tokenize to the whole text's ids: checked on the words, for every cut."""
    from llmscratch.tokenizer.gpt2 import GPT2_PATTERN as OURS
    from llmscratch.tokenizer.llama3 import LLAMA3_PATTERN as LLAMA3

    assert (OURS, LLAMA3) == (GPT2_PATTERN, LLAMA3_PATTERN)
    text = "".join(parts)
    for pattern in (GPT2_PATTERN, LLAMA3_PATTERN):
        for match in corpora._CUT.finditer(text):
            cut = match.start()
            assert regex.findall(pattern, text[:cut]) + regex.findall(pattern, text[cut:]) == \
                regex.findall(pattern, text), (pattern, text, cut)


def test_iter_corpus_opens_each_file_only_when_it_is_reached(tmp_path):
    for i, text in enumerate(["one", "two", "three"]):
        (tmp_path / f"f{i}.txt").write_text(text)
    documents = iter(iter_corpus(str(tmp_path / "f*.txt")))
    assert next(documents) == "one"
    (tmp_path / "f1.txt").write_text("two, changed after the first was read")
    (tmp_path / "f2.txt").unlink()
    assert next(documents) == "two, changed after the first was read"
    with pytest.raises(UserError, match=r"f2\.txt: cannot read"):
        next(documents)


def test_iter_corpus_resolves_the_source_at_once_and_sizes_it(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        iter_corpus(tmp_path / "nope.txt")  # before any iteration
    (tmp_path / "a.txt").write_text("abc")
    _jsonl(tmp_path / "b.jsonl", {"text": "de"})
    corpus = iter_corpus(tmp_path)
    assert corpus.files == [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    assert corpus.nbytes == 3 + len('{"text": "de"}\n')
    assert list(corpus) == list(corpus) == ["abc", "de"]  # each iteration reads afresh


def test_parquet_without_pyarrow_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    for src in (tmp_path / "b.parquet", tmp_path, str(tmp_path / "*")):
        with pytest.raises(UserError, match=r"b\.parquet: reading parquet needs pyarrow: pip install pyarrow") as info:
            iter_corpus(src)
        assert "\n" not in str(info.value)


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional; without it a .parquet file is refused")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["first", None, "third"]}), tmp_path / "d.parquet")
    assert load_corpus(tmp_path / "d.parquet", text_field="content") == ["first", "third"]
    with pytest.raises(UserError, match=r"d\.parquet: no column 'text' \(columns: id, content\)"):
        load_corpus(tmp_path / "d.parquet")


def _missing(d: Path) -> str:
    return str(d / "nope.txt")


def _glob_without_match(d: Path) -> str:
    return str(d / "*.nothing")


def _empty_file(d: Path) -> str:
    (d / "empty.txt").write_text("")
    return str(d / "empty.txt")


def _latin1_file(d: Path) -> str:
    (d / "latin.txt").write_bytes(b"caf\xe9")
    return str(d / "latin.txt")


def _folder_without_text(d: Path) -> str:
    (d / "f").mkdir()
    (d / "f" / "data.csv").write_text("a,b")
    return str(d / "f")


def _folder_of_empty_files(d: Path) -> str:
    (d / "g").mkdir()
    (d / "g" / "a.txt").write_text(" \n")
    return str(d / "g")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            _missing,
            r"nope\.txt: no such file or folder, and not a corpus name.*pydocs, the-verdict, tinyshakespeare",
        ),
        (_glob_without_match, r"\*\.nothing: glob matches no files"),
        (_empty_file, r"empty\.txt: file is empty"),
        (_latin1_file, r"latin\.txt: not UTF-8 text \(byte 3 is 0xe9\)"),
        (_folder_without_text, r"/f: folder has no \.txt, \.md, \.jsonl or \.parquet files"),
        (_folder_of_empty_files, r"/g: all 1 matching files are empty"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_bad_sources(tmp_path, make, expected):
    src = make(tmp_path)
    with pytest.raises(UserError, match=expected) as info:
        load_corpus(src)
    assert "\n" not in str(info.value)


def test_download_refuses_a_part_file_another_process_is_writing(range_server, tmp_path):
    fcntl = pytest.importorskip("fcntl", reason="advisory file locks are POSIX-only")
    range_server.files["/f.bin"] = b"data"
    part = tmp_path / "f.bin.part"
    with open(part, "ab") as other:  # a second open file description, as another process would hold
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another process is downloading"):
            download(f"{range_server.base}/f.bin", tmp_path / "f.bin", None, progress=False)
    assert range_server.requests == [] and part.exists()
    download(f"{range_server.base}/f.bin", tmp_path / "f.bin", None, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == b"data"


def test_download_full_length_part_of_other_bytes_fails_the_stated_hash_and_is_fetched_again(range_server,
                                                                                               tmp_path):
    data = b"the right bytes!" * 100
    range_server.files["/cdn/blob"] = data
    range_server.redirects["/resolve/f"] = (f"{range_server.base}/cdn/blob", {"X-Linked-Etag": _sha(data)})
    (tmp_path / "f.part").write_bytes(b"x" * len(data))  # whole length, wrong content: the server answers 416
    download(f"{range_server.base}/resolve/f", tmp_path / "f", None, server_hash=True, progress=False)
    assert (tmp_path / "f").read_bytes() == data
    assert [h.get("Range") for p, h in range_server.requests if p == "/cdn/blob"] == [f"bytes={len(data)}-", None]


# --- hf:NAME: a Hugging Face data set streamed from the hub (the `datasets` library faked: no network here) ----
class _FakeDatasets:
    """Stands in for the `datasets` module: records what load_dataset was asked and streams fixed records."""

    def __init__(self, records):
        self.records, self.calls = records, []

    def load_dataset(self, name, config=None, split=None, streaming=False):
        self.calls.append((name, config, split, streaming))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub")
        return iter(self.records)


def test_hub_dataset_is_streamed_record_by_record(monkeypatch, tmp_path):
    import sys

    from llmscratch.data import iter_corpus, prepare_tokens
    from llmscratch.tokenizer import BPETokenizer

    fake = _FakeDatasets([{"text": "first document", "id": 1}, {"text": ""}, {"text": "second one", "id": 2}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = iter_corpus("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train")
    assert list(corpus) == ["first document", "second one"]  # empty records skipped
    assert fake.calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert list(iter_corpus("hf:some/set")) and fake.calls[-1] == ("some/set", None, "train", True)
    tok = BPETokenizer.train("first document second one " * 20, 270, progress=False)
    meta = prepare_tokens(iter_corpus("hf:some/set"), tok, tmp_path / "data", val_fraction=0.0, progress=False)
    joined_by_eos = tok.eos_id is not None
    assert meta.train_tokens == len(tok.encode("first document")) + len(tok.encode("second one")) + joined_by_eos


@pytest.mark.parametrize("spec, records, field, needle", [
    ("hf:missing/set", [], "text", "--data hf:missing/set: cannot stream it"),
    ("hf:some/set", [{"body": "x"}], "text", "record 1 has no string 'text' (it has: body); name the text column"),
    ("hf:", [], "text", "name the data set"),
])
def test_hub_dataset_mistakes_are_one_line(monkeypatch, spec, records, field, needle):
    import sys

    from llmscratch.data import iter_corpus

    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets(records))
    with pytest.raises(UserError) as info:
        list(iter_corpus(spec, text_field=field))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_hub_dataset_without_the_library_says_what_to_install(monkeypatch):
    import sys

    from llmscratch.data import iter_corpus

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(UserError, match=r"pip install 'llmscratch\[datasets\]'"):
        iter_corpus("hf:some/set")


# --- gutenberg: the book's recipe (headers stripped, English kept), fetched from a local mirror ----------------
def _book(title: str, body: str) -> str:
    return (f"The Project Gutenberg eBook of {title}\nThis eBook is for the use of anyone anywhere...\n\n"
            f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n{body}\n\n"
            f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n\nSection 1. General Terms of Use...\n")


def test_gutenberg_corpus_from_a_mirror(http_root, monkeypatch):
    from llmscratch.data import gutenberg, load_corpus

    root, url = http_root
    books = {1: _book("One", "It was a bright cold day in April."), 2: _book("Deux", "Ça été très, très été " * 20),
             3: _book("Three", "Call me Ishmael.")}
    for i, text in books.items():
        (root / f"pg{i}.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(gutenberg, "BOOKS", (1, 2, 3))
    monkeypatch.setenv(gutenberg.MIRROR_ENV, url + "/pg{id}.txt")
    docs = load_corpus("gutenberg", progress=False)
    assert docs == ["It was a bright cold day in April.\n", "Call me Ishmael.\n"]  # headers gone; French dropped
    (root / "pg1.txt").unlink()  # cached: no second download
    assert load_corpus("gutenberg", progress=False) == docs


def test_gutenberg_filters_and_mistakes(http_root, monkeypatch):
    from llmscratch.data import gutenberg, load_corpus

    assert gutenberg.strip_headers(_book("X", "body text")) == "body text"
    assert gutenberg.strip_headers("no markers here") == "no markers here"
    assert gutenberg.is_english("plain words")
    assert not gutenberg.is_english("日本語のテキスト") and not gutenberg.is_english("")
    root, url = http_root
    (root / "pg7.txt").write_text("<html>not a book</html>")
    monkeypatch.setattr(gutenberg, "BOOKS", (7,))
    monkeypatch.setenv(gutenberg.MIRROR_ENV, url + "/pg{id}.txt")
    with pytest.raises(UserError, match="not a Project Gutenberg text"):
        load_corpus("gutenberg", progress=False)
    monkeypatch.setenv(gutenberg.MIRROR_ENV, url + "/book.txt")
    with pytest.raises(UserError, match=r"URL template with \{id\}"):
        load_corpus("gutenberg", progress=False)
