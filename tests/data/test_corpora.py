"""Corpora: the embedded stdlib text, named downloads with their cache, and local files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import shutil
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from llmscratch.data import corpora
from llmscratch.data.corpora import (
    CORPORA,
    NAMED_DOWNLOADS,
    cache_dir,
    download,
    fetch_corpus,
    load_corpus,
    pydocs_documents,
    pydocs_text,
    resolve_source,
)
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

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


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

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
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
    assert CORPORA == ("pydocs", "the-verdict", "tinyshakespeare")
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


def test_corpus_name_wins_over_a_same_named_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("pydocs").write_text("local")
    assert resolve_source("pydocs") == "pydocs"
    assert load_corpus("./pydocs") == ["local"]


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
        (_folder_without_text, r"/f: folder has no \.txt or \.md files"),
        (_folder_of_empty_files, r"/g: all 1 matching files are empty"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_bad_sources(tmp_path, make, expected):
    src = make(tmp_path)
    with pytest.raises(UserError, match=expected) as info:
        load_corpus(src)
    assert "\n" not in str(info.value)
