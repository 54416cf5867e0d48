"""Fixtures of the serving tests: a tiny random GPT-2-shape checkpoint, and real `llmscratch serve` processes of it.

A server runs as `python -m llmscratch.cli serve CKPT --port 0 ...` on loopback. The fixture reads the URL from
the server's ready line on stderr, and keeps reading stderr after it: the server never blocks on a full pipe, and
a failing test can show what the server said (`Server.log()`).
"""

from __future__ import annotations

import inspect
import os
import queue
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL_NAME = "tiny-gpt"  # the checkpoint folder's name: the served model's default id
CONTEXT = 512  # room for the web page's default max_tokens (256) under the default cap (the context length)
READY = re.compile(r"llmscratch: serving .* on (http://\S+)")


@dataclass
class Server:
    """A running `llmscratch serve` process; `url` is "http://127.0.0.1:PORT"."""

    process: subprocess.Popen
    url: str
    lines: list[str]

    def log(self) -> str:
        """What the server wrote to stderr so far."""
        return "".join(self.lines)

    def stop(self) -> None:
        _stop(self.process)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random gpt-micro (context 512) with a 300-token BPE trained on stdlib docstrings, saved as a checkpoint
    folder named MODEL_NAME. Weights drawn wide (std 0.3), so that every token depends on its context. Its output
    head (untied) has zero rows for end-of-text and for the tokens that are not printable ASCII: greedy answers
    are plain text that runs to max_tokens, readable on the web page, and no longer in tokens when a
    conversation sends them back (a lone byte of a UTF-8 character comes back as three)."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
    pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")
    import importlib

    import torch

    from llmscratch import GPT, ModelConfig
    from llmscratch.checkpoint import save_model
    from llmscratch.tokenizer import BPETokenizer

    docs = [inspect.getdoc(importlib.import_module(n)) or "" for n in ("argparse", "collections", "csv", "json")]
    tok = BPETokenizer.train("\n\n".join(docs), 300, progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size, context_length=CONTEXT,
                                        init_std=0.3, tie_embeddings=False))
    unprintable = [i for i in range(tok.vocab_size)
                   if i == tok.eos_id or not all(c == "\n" or " " <= c <= "~" for c in tok.decode([i]))]
    with torch.no_grad():
        model.lm_head.weight[unprintable] = 0.0  # a logit of 0, far below the best of the others
    return save_model(tmp_path_factory.mktemp("serve") / MODEL_NAME, model, tok)


@pytest.fixture(scope="session")
def start_server():
    """`start_server(checkpoint, *options, env=None)`: a `Server` of `llmscratch serve checkpoint --port 0 --device
    cpu --dtype fp32 options...` (`env`: variables added to this process's environment), once it is ready. Every
    server it started is stopped at the end of the session, if not before."""
    started: list[subprocess.Popen] = []

    def start(checkpoint, *options, env: dict | None = None, timeout: float = 60) -> Server:
        argv = [sys.executable, "-m", "llmscratch.cli", "serve", str(checkpoint), "--port", "0", "--device", "cpu",
                "--dtype", "fp32", *map(str, options)]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        started.append(process)
        lines: list[str] = []
        ready: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            for line in process.stderr:
                lines.append(line)
                if found := READY.search(line):
                    ready.put(found.group(1))
            ready.put(None)  # the server has ended

        threading.Thread(target=read, daemon=True).start()
        try:
            url = ready.get(timeout=timeout)
        except queue.Empty:
            url = None
        if url is None:
            _stop(process)
            pytest.fail(f"llmscratch serve did not start; it said: {''.join(lines)}")
        return Server(process, url, lines)

    yield start
    for process in started:
        if process.poll() is None:
            _stop(process)


@pytest.fixture(scope="session")
def live_server(tiny_checkpoint, start_server) -> Server:
    """A server of `tiny_checkpoint` without an API key, decoding up to 16 requests together with 64 more
    waiting (the load test's settings), for the whole session."""
    server = start_server(tiny_checkpoint, "--max-batch", 16, "--max-queue", 64)
    yield server
    server.stop()
