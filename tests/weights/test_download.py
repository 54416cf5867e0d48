"""`llmscratch download` against a fake Hugging Face hub on 127.0.0.1: the real downloads cannot run here, so a
thread serves a tiny GPT-2 folder (made by transformers) the way the hub does — small files answered directly,
the LFS weights file by a redirect to a "CDN" host that states its sha256 and size — with HTTP Range support."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from clitools import run as _cli

from llmscratch import runs
from llmscratch.weights import hub

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency for parity")

REPO = "openai-community/gpt2"  # what gpt2-124m resolves to; served here by the fake hub


class FakeHub:
    """Serves `files` (URL path → bytes). Paths under /<repo>/resolve/main/ answer like the hub: LFS files
    (`lfs`) with a 302 to the CDN host (localhost instead of 127.0.0.1) carrying X-Linked-Etag/X-Linked-Size,
    others with their bytes and a git-blob-like ETag."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.lfs: set[str] = set()
        self.honour_range = True
        self.stated_sha256: dict[str, str] = {}  # override what a redirect states
        self.requests: list[tuple[str, dict]] = []
        hub_ = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub_.requests.append((self.path, dict(self.headers)))
                data = hub_.files.get(self.path.removeprefix("/cdn"))
                if data is None:
                    self.send_error(404)
                    return
                if self.path in hub_.lfs:
                    self.send_response(302)
                    port = self.server.server_address[1]
                    self.send_header("Location", f"http://localhost:{port}/cdn{self.path}")
                    sha = hub_.stated_sha256.get(self.path, hashlib.sha256(data).hexdigest())
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = int(m[1]) if m and hub_.honour_range else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def serve_folder(self, prefix: str, folder: Path, lfs: tuple[str, ...] = ()):
        for p in folder.iterdir():
            self.files[f"{prefix}/{p.name}"] = p.read_bytes()
        self.lfs |= {f"{prefix}/{name}" for name in lfs}

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, prepared, hf_gpt2):
    """(transformers model, a hub-like folder: config.json, model.safetensors, vocab.json, merges.txt)."""
    from llmscratch.tokenizer import load_tokenizer
    from llmscratch.weights.hf_tokenizer import write_gpt2_files

    tok = load_tokenizer(prepared)
    root = tmp_path_factory.mktemp("hub")
    model = hf_gpt2(root, n_layer=2, n_head=2, n_embd=32, vocab_size=tok.vocab_size, n_positions=32)
    write_gpt2_files(tok, root / "hf")
    return model, root / "hf"


@pytest.fixture
def fake_hub(hf_folder):
    server = FakeHub()
    server.serve_folder(f"/{REPO}/resolve/main", hf_folder[1], lfs=("model.safetensors",))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(autouse=True)
def _online_with_an_empty_cache(monkeypatch, tmp_path):
    # The suite sets HF_HUB_OFFLINE=1 so nothing waits on the real network; these tests talk to 127.0.0.1.
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _weights_part(name: str = "gpt2-124m") -> Path:
    return hub.cache_folder(name) / "model.safetensors.part"


def _assert_same_logits(theirs, folder: Path):
    from llmscratch.checkpoint import load

    ours, _ = load(folder)
    idx = torch.randint(0, theirs.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)


def test_download_converts_and_then_works_offline_from_the_cache(fake_hub, hf_folder, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    code, out, err = _cli(["download", "gpt2-124m", "--out", tmp_path / "gpt2", "--endpoint", fake_hub.base,
                           "--no-progress"], capsys)
    assert code == 0, err
    assert "downloaded gpt2-124m" in out
    _assert_same_logits(hf_folder[0], tmp_path / "gpt2")
    cache = hub.cache_folder("gpt2-124m")
    assert sorted(p.name for p in cache.iterdir()) == sorted(hub.HF_FILES)  # no .part left behind
    resolve = f"/{REPO}/resolve/main"
    assert fake_hub.paths() == [f"{resolve}/{f}" for f in hub.HF_FILES[:3]] + [
        f"{resolve}/model.safetensors", f"/cdn{resolve}/model.safetensors"]
    auth = {path: h.get("Authorization") for path, h in fake_hub.requests}
    assert auth[f"{resolve}/config.json"] == "Bearer hf_secret"
    assert auth[f"/cdn{resolve}/model.safetensors"] is None  # the token never leaves the hub's host
    assert "gpt2-124m" in (tmp_path / "gpt2" / "config.json").read_text()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", lambda *a, **k: pytest.fail("network used"))
    code, _, err = _cli(["download", "gpt2-124m", "--out", tmp_path / "again", "--no-progress"], capsys)
    assert code == 0, err
    _assert_same_logits(hf_folder[0], tmp_path / "again")


def test_hf_endpoint_environment_variable_is_the_default_server(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.base + "/")
    code, _, err = _cli(["download", "gpt2-124m", "--out", tmp_path / "m", "--no-progress"], capsys)
    assert code == 0, err
    assert fake_hub.requests


def test_download_resumes_a_truncated_part_file(fake_hub, hf_folder, tmp_path, capsys):
    weights = (hf_folder[1] / "model.safetensors").read_bytes()
    part = _weights_part()
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(weights[: len(weights) // 3])
    code, _, err = _cli(["download", "gpt2-124m", "--out", tmp_path / "m", "--endpoint", fake_hub.base,
                         "--no-progress"], capsys)
    assert code == 0, err
    cdn = [h for path, h in fake_hub.requests if path.startswith("/cdn")]
    assert [h.get("Range") for h in cdn] == [f"bytes={len(weights) // 3}-"]
    _assert_same_logits(hf_folder[0], tmp_path / "m")
    assert not part.exists()


def test_download_starts_over_when_the_server_ignores_range(fake_hub, hf_folder, tmp_path, capsys):
    fake_hub.honour_range = False
    part = _weights_part()
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"\xff" * 1000)  # not even the right bytes: must be thrown away, not prepended
    code, _, err = _cli(["download", "gpt2-124m", "--out", tmp_path / "m", "--endpoint", fake_hub.base,
                         "--no-progress"], capsys)
    assert code == 0, err
    _assert_same_logits(hf_folder[0], tmp_path / "m")


def test_hash_mismatch_is_an_error_and_leaves_no_file(fake_hub, tmp_path, capsys):
    fake_hub.stated_sha256[f"/{REPO}/resolve/main/model.safetensors"] = "0" * 64
    code, _, err = _cli(["download", "gpt2-124m", "--out", tmp_path / "m", "--endpoint", fake_hub.base,
                         "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "model.safetensors" in err and f"expected {'0' * 64}" in err
    cache = hub.cache_folder("gpt2-124m")
    assert not (cache / "model.safetensors").exists() and not _weights_part().exists()
    assert not (tmp_path / "m").exists()


def test_offline_fails_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", lambda *a, **k: pytest.fail("network used"))
    code, _, err = _cli(["download", "gpt2-355m", "--out", tmp_path / "m"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "HF_HUB_OFFLINE=1" in err and "llmscratch convert from-hf DIR OUT" in err
    assert not (tmp_path / "m").exists()


def test_unreachable_server_is_one_line_naming_the_local_alternative(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on: connection refused, as on a machine without network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = _cli(["download", "gpt2-774m", "--out", tmp_path / "m", "--endpoint", f"http://127.0.0.1:{port}"],
                        capsys)
    assert code == 2 and err.count("\n") == 1
    assert "could not download gpt2-774m config.json" in err and "llmscratch convert from-hf DIR OUT" in err
    assert not (tmp_path / "m").exists()


def test_unknown_model_lists_the_valid_names(tmp_path, capsys):
    code, _, err = _cli(["download", "gpt2-7b", "--out", tmp_path / "m"], capsys)
    assert code == 2 and "gpt2-124m, gpt2-355m, gpt2-774m, gpt2-1558m" in err


def test_used_out_folder_is_refused_before_downloading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", lambda *a, **k: pytest.fail("network used"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("keep")
    code, _, err = _cli(["download", "gpt2-124m", "--out", tmp_path / "m"], capsys)
    assert code == 2 and "not empty" in err


def test_openai_source_downloads_the_tensorflow_files(hf_folder, openai_writer, tmp_path, capsys):
    """--source openai: OpenAI's release layout (/<size>/<file>), converted through the TensorFlow reader."""
    from llmscratch.tokenizer import load_tokenizer

    theirs, folder = hf_folder
    openai_writer([(theirs, tmp_path / "release")])
    shutil.copy(folder / "vocab.json", tmp_path / "release" / "encoder.json")
    shutil.copy(folder / "merges.txt", tmp_path / "release" / "vocab.bpe")
    server = FakeHub()
    try:
        server.serve_folder("/124M", tmp_path / "release")
        code, _, err = _cli(["download", "gpt2-124m", "--source", "openai", "--endpoint", server.base, "--out",
                             tmp_path / "m", "--no-progress"], capsys)
    finally:
        server.close()
    assert code == 0, err
    assert sorted(server.paths()) == sorted(f"/124M/{f}" for f in hub.OPENAI_FILES)  # not the .meta graph
    _assert_same_logits(theirs, tmp_path / "m")
    assert load_tokenizer(tmp_path / "m").encode("The module") == load_tokenizer(folder).encode("The module")


def test_sharded_qwen3_download_fetches_the_index_then_its_shards(tmp_path, tiny_corpus, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([tiny_corpus.read_text()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    theirs = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)).eval()
    folder = tmp_path / "qwen"
    theirs.save_pretrained(folder, max_shard_size="100KB")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    (folder / "generation_config.json").write_text('{"eos_token_id": [1, 0]}')
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    server = FakeHub()
    try:
        server.serve_folder("/Qwen/Qwen3-1.7B/resolve/main", folder, lfs=tuple(shards))
        code, out, err = _cli(["download", "qwen3-1.7b", "--out", tmp_path / "ours", "--endpoint", server.base,
                               "--no-progress"], capsys)
    finally:
        server.close()
    assert code == 0, err
    _assert_same_logits(theirs, tmp_path / "ours")
    from llmscratch.checkpoint import load

    _, ours_tok = load(tmp_path / "ours")
    assert ours_tok.encode("The module") == tok.encode("The module").ids and ours_tok.stop_ids == [1, 0]
    assert sorted(p.name for p in hub.cache_folder("qwen3-1.7b").iterdir()) == sorted(
        [*hub.HF_CHAT_FILES, runs.HF_WEIGHTS_INDEX, *shards])


def test_gated_and_openai_only_messages(tmp_path, capsys):
    code, _, err = _cli(["download", "llama3.2-1b", "--out", tmp_path / "m", "--source", "openai"], capsys)
    assert code == 2 and "GPT-2 only" in err
    server = FakeHub()  # serves nothing: every file answers 404, as a gated repo does without a token
    try:
        code, _, err = _cli(["download", "llama3.2-1b", "--out", tmp_path / "m", "--endpoint", server.base,
                             "--no-progress"], capsys)
    finally:
        server.close()
    assert code == 2 and "gated" in err and "HF_TOKEN" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("shard", ["../../../escaped.safetensors", "/tmp/escaped.safetensors"])
def test_an_index_naming_files_outside_the_cache_writes_nothing_there(tmp_path, capsys, shard):
    """A hub index is untrusted text: its shard names are where files are written, so they must stay inside
    the model's cache folder."""
    from clitools import assert_user_error

    prefix = "/Qwen/Qwen3-1.7B/resolve/main"
    server = FakeHub()
    server.files = {f"{prefix}/{f}": b"{}" for f in hub.HF_CHAT_FILES}
    server.files[f"{prefix}/{runs.HF_WEIGHTS_INDEX}"] = (b'{"weight_map": {"a": "ok.safetensors", "b": "%s"}}'
                                                          % shard.encode())
    server.files[f"{prefix}/ok.safetensors"] = b"x"
    before = set(tmp_path.rglob("*"))
    try:
        code, _, err = _cli(["download", "qwen3-1.7b", "--out", tmp_path / "ours", "--endpoint", server.base,
                             "--no-progress"], capsys)
    finally:
        server.close()
    index = hub.cache_folder("qwen3-1.7b") / runs.HF_WEIGHTS_INDEX
    assert_user_error(code, err, f"{index}: file name {shard!r} points outside")
    assert not any("escaped" in path for path, _ in server.requests)  # not even asked for
    assert not list(tmp_path.rglob("escaped*")) and not Path("/tmp/escaped.safetensors").exists()
    new_files = {p for p in set(tmp_path.rglob("*")) - before if not p.is_dir()}
    assert new_files and all(p.is_relative_to(hub.cache_folder("qwen3-1.7b")) for p in new_files), new_files
