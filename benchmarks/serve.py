"""Serving throughput on the CPU: `llmscratch serve` (continuous batching) against one-request-at-a-time decoding
and against `transformers serve` (with and without its `--continuous-batching`), on the same weights, same run.

A GPT-2-124M-shaped model with random weights (seeded) and the GPT-2 tokenizer is saved as our checkpoint and
exported with `llmscratch convert to-hf` for the peer. Each server runs as its own process on loopback; for each
concurrency (1, 8, 32 clients by default) that many streaming clients start together on `/v1/completions`, each
with its own prompt (~20 tokens), asking for --new-tokens (64) greedy tokens. Reported per server and
concurrency: aggregate tokens/s (every client's tokens over the wall time from the first request to the last
`[DONE]`), and the p50/p95 time to first token (request sent → first text chunk). Tokens are counted from the
stream's usage chunk where the server sends one, else from its text chunks.

Servers (--servers, comma-separated):
  ours          llmscratch serve --max-batch 32 (continuous batching)
  ours-serial   llmscratch serve --max-batch 1: one request decoded at a time, the others queued
  hf            transformers serve (its default: requests served one at a time)
  hf-cb         transformers serve --continuous-batching (paged attention, batched)
each at every --dtypes (fp32, bf16).

    .venv/bin/python benchmarks/serve.py [--clients 1,8,32] [--new-tokens 64] [--dtypes fp32,bf16]
        [--servers ours,ours-serial,hf,hf-cb] [--gpt2-dir ../shared/data/gpt2] [--work DIR]

Needs the `serve` extra (fastapi, uvicorn), httpx, and transformers ≥ 5 (for `transformers serve`: its serving
extra is fastapi + uvicorn too). Targets at 32 clients (issue 22): ours ≥ 5× ours-serial aggregate tokens/s,
≥ 2× the peer's best configuration, p50 time to first token ≤ 1 s. Issue 27: ours at 32 clients ≥ 50% of the
machine's bf16 matrix-product rate for GPT-2 124M, measured in this process before and after the servers, the
mean of the two (`matmul_rate`: one step's weight matrices times 32 rows, nothing else, F.linear or
oneDNN-packed, the faster), printed for each dtype.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as C  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
EXTRA = os.environ.get("OURS_EXTRA", "").split()
TARGET_VS_SERIAL, TARGET_VS_PEER, TARGET_TTFT = 5.0, 2.0, 1.0
TARGET_VS_MATMUL = 0.5  # issue 27: aggregate tokens/s at the most clients ÷ the bf16 matrix-product rate
TOPICS = ["the history of the printing press", "how bees find flowers", "a recipe for bread", "the rules of chess",
          "why the sky is blue", "the life of a star", "how a bicycle works", "the first computers"]


def make_weights(work: Path, gpt2_dir: Path, peer: bool = True) -> tuple[Path, Path]:
    """Our checkpoint of a random GPT-2 124M (seeded) with the GPT-2 tokenizer, and its transformers export (made
    only with `peer`)."""
    from llmscratch import GPT, ModelConfig
    from llmscratch.checkpoint import save_model
    from llmscratch.tokenizer.gpt2 import gpt2_tokenizer
    from llmscratch.weights.convert import to_hf

    ours, hf = work / "gpt2-random", work / "gpt2-random-hf"
    if not (ours / "model.safetensors").is_file():
        torch.manual_seed(0)
        save_model(ours, GPT(ModelConfig.from_preset("gpt2-124m")), gpt2_tokenizer(gpt2_dir))
    if peer and not hf.is_dir():
        print(to_hf(ours, hf), flush=True)
    return ours, hf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, dtype: str, ours: Path, hf: Path, port: int) -> tuple[list[str], str]:
    """The command line of a server, and the model name its requests give."""
    if kind.startswith("ours"):
        batch = "1" if kind == "ours-serial" else "32"
        return [str(VENV_BIN / "llmscratch"), "serve", str(ours), "--port", str(port), "--max-batch", batch,
                "--max-queue", "64", "--dtype", dtype] + EXTRA, ours.name
    hf_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    cmd = [str(VENV_BIN / "transformers"), "serve", str(hf), "--port", str(port), "--host", "127.0.0.1",
           "--dtype", hf_dtype, "--device", "cpu", "--log-level", "warning"]
    if kind == "hf-cb":
        cmd.append("--continuous-batching")
    return cmd, str(hf)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer on {url} within {timeout:.0f} s")


async def one_client(client, url: str, model: str, prompt: str, new_tokens: int) -> dict:
    """One streaming completion: time to first text chunk, tokens, whether it ended (with [DONE] or a chunk with a
    finish_reason)."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, chunks, usage, done, error = None, 0, None, False, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    error = str(chunk["error"])[:200]
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or ():
                    done = done or bool(choice.get("finish_reason"))  # `transformers serve` sends no [DONE]
                    if choice.get("text"):
                        chunks += 1
                        first = first or time.perf_counter()
    except Exception as exc:  # noqa: BLE001 - a failed client is counted, not fatal
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    return {"ttft": (first - start) if first else None, "tokens": usage if usage is not None else chunks,
            "done": done, "error": error, "end": end}


async def run_load(url: str, model: str, clients: int, new_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        prompts = [f"Client {i} writes about {TOPICS[i % len(TOPICS)]}. It begins like this:" for i in range(clients)]
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, model, p, new_tokens) for p in prompts))
    wall = max((r.get("end", start) for r in results), default=start) - start
    ttfts = sorted(r["ttft"] for r in results if r.get("ttft") is not None)
    errors = [r["error"] for r in results if r.get("error") or not r.get("done")]
    tokens = sum(r.get("tokens", 0) for r in results)
    return {"clients": clients, "tokens": tokens, "wall": wall, "tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50": statistics.median(ttfts) if ttfts else None,
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def bench_server(kind: str, dtype: str, ours: Path, hf: Path, clients: list[int], new_tokens: int) -> list[dict]:
    port = free_port()
    cmd, model = server_command(kind, dtype, ours, hf, port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        with running(cmd, url):
            asyncio.run(run_load(url, model, 1, 8))  # warm-up: first-request costs (allocation, lazy imports)
            for n in clients:
                row = asyncio.run(run_load(url, model, n, new_tokens))
                row.update(server=kind, dtype=dtype)
                rows.append(row)
                print(f"  {kind:12s} {dtype} {n:3d} clients: {row['tok_s']:7.1f} tok/s, ttft p50 "
                      f"{_s(row['ttft_p50'])} p95 {_s(row['ttft_p95'])}, {row['errors']} errors"
                      + (f" ({row['first_error']})" if row["errors"] else ""), flush=True)
    except RuntimeError as exc:
        print(f"  {kind} {dtype}: {exc}", flush=True)
    return rows


@contextlib.contextmanager
def running(cmd: list[str], url: str):
    """A server started from `cmd`, ready on `url` while the block runs, then stopped (its whole process group).
    Its output goes to a temporary file: a RuntimeError (it did not come up, or the block raised one) carries the
    output's tail."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, proc)
        yield proc
    except RuntimeError as exc:
        log.seek(0)
        raise RuntimeError(f"{exc}\n{log.read()[-1500:].decode(errors='replace')}") from exc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def matmul_rate(dtype: str, rows: int, repeats: int = 7) -> dict:
    """The machine's matrix-product rate for GPT-2 124M at `dtype`: every weight matrix of one decoding step
    (per layer qkv, attention out, MLP fc and proj; then the LM head) multiplied by `rows` rows — one step of
    `rows` sequences, with nothing else a step does — timed two ways, with `F.linear` and with the weights packed
    for oneDNN for that many rows (as the server packs them); the faster counts. Returns tokens/s (= rows per
    chain), GFLOP/s (2 · rows · weights per chain) and which way won. Median of `repeats` runs of 5 chains after
    a warm-up."""
    import decode as D

    torch.manual_seed(0)
    weights = [w.detach() for w in D.step_weights(D.build_ours(D.DTYPES[dtype]))]
    inputs = {k: torch.randn(rows, k, dtype=D.DTYPES[dtype]) for k in {w.size(1) for w in weights}}
    ways = {"F.linear": lambda: D.bound_decode(weights, inputs, 5)}
    try:
        packed = [(torch.ops.mkldnn._reorder_linear_weight(w, rows), w.size(1)) for w in weights]
        ways["oneDNN packed"] = lambda: D.packed_bound_decode(packed, inputs, 5)
    except (AttributeError, RuntimeError):  # no oneDNN, or no bf16 oneDNN on this CPU (AVX2 only)
        pass
    times = {name: [] for name in ways}
    for way in ways.values():
        way()
    for _ in range(repeats):
        for name, way in ways.items():
            times[name].append(C.timed(way, torch.device("cpu")) / 5)
    best = min(times, key=lambda name: statistics.median(times[name]))
    t = statistics.median(times[best])
    flops = 2 * rows * sum(w.numel() for w in weights)
    return {"tok_s": rows / t, "gflops": flops / t / 1e9, "way": best,
            "all": {name: rows / statistics.median(v) for name, v in times.items()}}


def prebuild_rows_step(ours: Path, dtype: str, max_batch: int = 32, cache_len: int = 256,
                       prefix_cache_rows: int | None = None) -> None:
    """Build (or find) the compiled-ahead batched step `llmscratch serve --max-batch 32` looks for (model/aot.py), so
    that the server decodes through it from its first request instead of starting to build it under the load:
    the model loaded and packed as the server does, a cache of the server's 256 positions (or `cache_len`: the
    server doubles its cache as sequences grow) and of its rows (`serve.engine.cache_rows`: the batch's, and
    `--prefix-cache-rows` more)."""
    try:
        from llmscratch.cli.inference import load_for_inference
        from llmscratch.model import aot
        from llmscratch.model.packed import pack_for_cpu_inference
    except ImportError:  # a src without compiled-ahead steps
        return
    try:
        from llmscratch.serve.engine import cache_rows
        rows = cache_rows(max_batch, True, prefix_cache_rows)
    except ImportError:  # a src whose cache has the batch's rows only
        rows = max_batch
    model, _ = load_for_inference(str(ours), "cpu", dtype, pack=False, rows=max_batch)
    pack_for_cpu_inference(model, max_batch, where_faster=True)
    cache_len = min(model.config.context_length, cache_len)
    if aot.unsupported(model, rows):
        print(f"  {dtype}: no compiled-ahead batched step ({aot.unsupported(model, rows)})", flush=True)
        return
    start = time.perf_counter()
    found = aot.load_step(model, rows, "rows", cache_len) is not None
    if not found:
        aot.build(model, rows, "rows", cache_len)
    print(f"  {dtype}: compiled-ahead batched step ({rows} cache rows, cache {cache_len}) "
          f"{'found' if found else 'built'} in {time.perf_counter() - start:.1f} s", flush=True)


def _s(seconds: float | None) -> str:
    return f"{seconds:.2f} s" if seconds is not None else "n/a"


def summary(rows: list[dict], top: int) -> list[str]:
    """The targets at `top` clients: ours against ours-serial and against the peer's best configuration."""
    at = {(r["server"], r["dtype"]): r for r in rows if r["clients"] == top}
    lines = []
    for dtype in sorted({d for _, d in at}):
        ours, serial = at.get(("ours", dtype)), at.get(("ours-serial", dtype))
        if ours is None:
            continue
        if serial is not None and serial["tok_s"] > 0:
            ratio = ours["tok_s"] / serial["tok_s"]
            lines.append(f"{dtype}: ours / ours-serial at {top} clients = {ratio:.1f}x (target ≥ {TARGET_VS_SERIAL}x)")
        lines.append(f"{dtype}: ours p50 time to first token at {top} clients = {_s(ours['ttft_p50'])} "
                     f"(target ≤ {TARGET_TTFT} s)")
    peers = [r for (kind, _), r in at.items() if kind.startswith("hf") and not r["errors"]]
    mine = [r for (kind, _), r in at.items() if kind == "ours"]
    if peers and mine:
        best_peer = max(peers, key=lambda r: r["tok_s"])
        best_ours = max(mine, key=lambda r: r["tok_s"])
        lines.append(f"ours best ({best_ours['dtype']}, {best_ours['tok_s']:.1f} tok/s) / peer best "
                     f"({best_peer['server']} {best_peer['dtype']}, {best_peer['tok_s']:.1f} tok/s) = "
                     f"{best_ours['tok_s'] / best_peer['tok_s']:.2f}x (target ≥ {TARGET_VS_PEER}x)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--servers", default="ours,ours-serial,hf,hf-cb")
    p.add_argument("--gpt2-dir", default=str(ROOT.parent / "shared" / "data" / "gpt2"),
                   help="folder with the GPT-2 tokenizer files (encoder.json, vocab.bpe)")
    p.add_argument("--work", default=None, help="where the weights go (default: a temporary folder)")
    a = p.parse_args()
    C.require("httpx", "pip install httpx")
    C.require("fastapi", "pip install -e '.[serve]'")
    clients = [int(c) for c in a.clients.split(",")]
    servers, dtypes = a.servers.split(","), a.dtypes.split(",")
    if any(s.startswith("hf") for s in servers) and shutil.which("transformers", path=str(VENV_BIN)) is None:
        sys.exit("error: `transformers serve` not found in this venv; pip install 'transformers>=5' fastapi uvicorn")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="llmscratch-serve-bench-"))
    ours, hf = make_weights(work, Path(a.gpt2_dir))
    print(C.header("serve: aggregate tokens/s and time to first token, GPT-2 124M shapes (random weights), "
                   f"{a.new_tokens} new tokens per client", torch.device("cpu")), flush=True)
    top = max(clients)
    rates = {}
    for dtype in sorted(set(dtypes) | {"bf16"}):  # bf16's rate is the target's yardstick, whatever is served
        rates[dtype] = matmul_rate(dtype, top)
        print(f"  matrix-product rate, GPT-2 124M at {top} rows, {dtype}: {rates[dtype]['tok_s']:.1f} tok/s = "
              f"{rates[dtype]['gflops']:.1f} GFLOP/s ({rates[dtype]['way']}; "
              + ", ".join(f"{k} {v:.1f} tok/s" for k, v in rates[dtype]["all"].items()) + ")", flush=True)
    if "ours" in servers:
        for dtype in dtypes:
            prebuild_rows_step(ours, dtype)
    rows = []
    for dtype in dtypes:
        for kind in servers:
            rows += bench_server(kind, dtype, ours, hf, clients, a.new_tokens)
    print("\n| server | dtype | clients | tokens/s | p50 TTFT | p95 TTFT | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['dtype']} | {r['clients']} | {r['tok_s']:.1f} | {_s(r['ttft_p50'])} | "
              f"{_s(r['ttft_p95'])} | {r['errors']} |")
    # The rate again after the servers: the VM's speed drifts over minutes, so the yardstick is the mean of the two.
    for dtype in rates:
        after = matmul_rate(dtype, top)
        print(f"  matrix-product rate, {dtype}, after the servers: {after['tok_s']:.1f} tok/s "
              f"({after['gflops']:.1f} GFLOP/s); the mean of before and after: "
              f"{(rates[dtype]['tok_s'] + after['tok_s']) / 2:.1f} tok/s", flush=True)
        rates[dtype]["tok_s"] = (rates[dtype]["tok_s"] + after["tok_s"]) / 2
    print()
    for line in summary(rows, top):
        print(line)
    for r in rows:  # issue 27's yardstick: ours at the most clients against the machine's matrix-product rate
        if r["server"] == "ours" and r["clients"] == top:
            bf16, own = rates["bf16"]["tok_s"], rates[r["dtype"]]["tok_s"]
            print(f"{r['dtype']}: ours at {top} clients {r['tok_s']:.1f} tok/s = {r['tok_s'] / bf16:.0%} of the bf16 "
                  f"matrix-product rate ({bf16:.1f} tok/s; target ≥ {TARGET_VS_MATMUL:.0%}), "
                  f"{r['tok_s'] / own:.0%} of the {r['dtype']} one ({own:.1f} tok/s)")


if __name__ == "__main__":
    main()
