"""Conversations on the CPU: what reading only each turn's new tokens saves (prefix reuse), in `chat` and `serve`.

A conversation's every turn sends the whole conversation so far as its prompt. `llmscratch chat` keeps its KV cache
between turns (`generate.KeptPrefix`) and `llmscratch serve` keeps a finished request's cache row for the next
request that begins the same way (`DecodeBatch`'s parked rows), so a turn reads only what it adds.

1. chat, in this process, as `llmscratch chat` runs: one conversation of --turns user messages (~25 tokens each),
   each answered with --new-tokens greedy tokens, through `Conversation` and `stream` with the compiled-ahead
   step (built first, as the CLI's first `chat` starts it in the background). Each turn's prompt is answered
   twice, alternately: by a model that kept the conversation's cache, and by a second copy of the model from
   scratch. Per turn: prompt tokens, tokens found in the cache, time to first token both ways.
2. serve: `llmscratch serve --max-batch 8` as it starts by default (prefix cache on, 8 spare cache rows), with
   `--prefix-cache-rows 0` (parked rows in the batch's free rows only) and with `--no-prefix-cache`; --clients
   conversations at once, each --turns turns through streamed `/v1/chat/completions` (a turn is sent when the last
   one's answer is in). More clients than 8 keep the batch full, which is where the spare rows matter.
   Per server: the p50 time to first token of the first turn and of the later ones, the prompt tokens found
   cached (usage.prompt_tokens_details), and the wall time of all conversations.

The model is a GPT-2-124M-shaped one with random weights (seeded) and the GPT-2 tokenizer, as benchmarks/serve.py
makes it, or --checkpoint (any model folder `chat` takes). Random weights answer with arbitrary token sequences,
which often are not the tokens their text encodes to, so less of each turn is found in the cache than a trained
model's conversation gives.

    .venv/bin/python benchmarks/conversation.py [--turns 6] [--new-tokens 48] [--clients 4] [--dtype auto]
        [--parts chat,serve] [--checkpoint DIR | --gpt2-dir ../shared/data/gpt2 --work DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as C  # noqa: E402
import torch  # noqa: E402
from serve import ROOT, VENV_BIN, free_port, make_weights, prebuild_rows_step, running  # noqa: E402

# What the user says, turn by turn (the same in every conversation but for its opening, so conversations differ
# from their first tokens on).
MESSAGES = ["Tell me about the history of the printing press and why it mattered so much in Europe.",
            "What did the first printed books look like, and who could afford to buy them at the time?",
            "How long did it take to set the type for a single page, and who did that work in a shop?",
            "Which other inventions of the same century changed daily life as much as printing did?",
            "If you had to explain all of this to a child in three sentences, what would you say?",
            "Thank you. Now summarize our whole conversation so far in a short list of points, please.",
            "One more question: what is the most surprising fact you know about early printers?",
            "And finally, which book would you recommend to read more about all of this?"]


def chat_part(ckpt: Path, dtype: str, turns: int, new_tokens: int) -> list[dict]:
    from decode import compiled_ahead_ready

    from llmscratch.cli.chatting import Conversation
    from llmscratch.cli.inference import load_for_inference, saved_style
    from llmscratch.generate import KeptPrefix, stream
    from llmscratch.prompts import chat_format

    kept_model, tok = load_for_inference(str(ckpt), "cpu", dtype)
    fresh_model, _ = load_for_inference(str(ckpt), "cpu", dtype)
    compiled_ahead_ready(kept_model, 1, f"  chat ({next(kept_model.parameters()).dtype})")
    fmt = chat_format(tok, saved_style(str(ckpt)))
    ctx = kept_model.config.context_length
    chat = Conversation(fmt, tok, ctx - new_tokens)
    kept = KeptPrefix()

    def answer(model, prompt, keep) -> tuple[str, float, float, int]:
        reused = keep.reusable(model, tok.encode(prompt.text)) if keep is not None else 0
        start = time.perf_counter()
        first, pieces = None, []
        for piece in stream(model, tok, prompt.text, max_new_tokens=new_tokens, temperature=0.0,
                            stop=list(prompt.stop), compiled_ahead=True, kept=keep):
            first = first or time.perf_counter()
            pieces.append(piece)
        end = time.perf_counter()
        return "".join(pieces), (first or end) - start, end - start, reused

    rows = []
    for t in range(turns):
        user = MESSAGES[t % len(MESSAGES)]
        prompt = chat.prompt(user)
        text, ttft, total, reused = answer(kept_model, prompt, kept)
        _, fresh_ttft, fresh_total, _ = answer(fresh_model, prompt, None)
        chat.add(user, text.lstrip())
        rows.append({"turn": t + 1, "prompt": len(tok.encode(prompt.text)), "reused": reused, "ttft": ttft,
                     "fresh_ttft": fresh_ttft, "total": total, "fresh_total": fresh_total})
        r = rows[-1]
        print(f"  turn {r['turn']}: {r['prompt']} prompt tokens, {reused} kept; first token {1e3 * ttft:.0f} ms "
              f"(from scratch {1e3 * fresh_ttft:.0f} ms); turn {total:.2f} s ({fresh_total:.2f} s)", flush=True)
    return rows


async def conversation(client, url: str, model: str, index: int, turns: int, new_tokens: int) -> list[dict]:
    """One client's conversation, turn after turn; per turn the time to first text chunk and the usage."""
    messages = [{"role": "system", "content": f"You are assistant number {index}, a patient teacher."}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": MESSAGES[t % len(MESSAGES)]})
        body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        start, first, text, usage = time.perf_counter(), None, [], {}
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code == 400 and b"context_length_exceeded" in await response.aread():
                return out  # the conversation outgrew the model's context: it ends here
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
        messages.append({"role": "assistant", "content": "".join(text)})
        out.append({"turn": t + 1, "ttft": (first or time.perf_counter()) - start,
                    "prompt": usage.get("prompt_tokens", 0),
                    "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)})
    return out


async def conversations(url: str, model: str, clients: int, turns: int, new_tokens: int) -> tuple[list, float]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(conversation(client, url, model, i, turns, new_tokens)
                                         for i in range(clients)))
    return [turn for result in results for turn in result], time.perf_counter() - start


SERVERS = (("prefix cache (default)", []), ("--prefix-cache-rows 0", ["--prefix-cache-rows", "0"]),
           ("--no-prefix-cache", ["--no-prefix-cache"]))


def serve_part(ckpt: Path, dtype: str, clients: int, turns: int, new_tokens: int) -> list[dict]:
    for cache_len in (256, 512, 1024):  # the server's cache doubles as the conversations grow
        for spare in (None, 0):  # the cache's rows: 16 by default, 8 (the last two servers)
            prebuild_rows_step(ckpt, dtype, 8, cache_len, prefix_cache_rows=spare)
    rows = []
    for label, extra in SERVERS:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(VENV_BIN / "llmscratch"), "serve", str(ckpt), "--port", str(port), "--max-batch", "8",
               "--dtype", dtype, *extra]
        try:
            with running(cmd, url):
                asyncio.run(conversations(url, ckpt.name, 1, 1, 4))  # warm-up: first-request costs
                turns_out, wall = asyncio.run(conversations(url, ckpt.name, clients, turns, new_tokens))
        except RuntimeError as exc:
            print(f"  {label}: {exc}", flush=True)
            continue
        first = [t["ttft"] for t in turns_out if t["turn"] == 1]
        later = [t["ttft"] for t in turns_out if t["turn"] > 1]
        turns = max(t["turn"] for t in turns_out)  # (fewer than asked where the conversations outgrew the context)
        last = [t["ttft"] for t in turns_out if t["turn"] == turns]
        row = {"server": label, "ttft_first": statistics.median(first),
               "ttft_later": statistics.median(later) if later else None,
               "ttft_last": statistics.median(last), "wall": wall,
               "prompt": sum(t["prompt"] for t in turns_out), "cached": sum(t["cached"] for t in turns_out),
               "turns": turns}
        rows.append(row)
        print(f"  {label}: p50 first token, turn 1 {row['ttft_first']:.2f} s, later turns "
              f"{row['ttft_later'] or 0:.2f} s, turn {turns} {row['ttft_last']:.2f} s; {row['cached']} of "
              f"{row['prompt']} prompt tokens cached; all {clients} conversations {wall:.1f} s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--clients", type=int, default=4, help="conversations at once (serve part)")
    p.add_argument("--dtype", default="auto", help="auto (what the CLI picks), fp32 or bf16")
    p.add_argument("--parts", default="chat,serve")
    p.add_argument("--checkpoint", default=None, help="a model folder to converse with (default: random GPT-2 124M)")
    p.add_argument("--gpt2-dir", default=str(ROOT.parent / "shared" / "data" / "gpt2"),
                   help="folder with the GPT-2 tokenizer files (encoder.json, vocab.bpe)")
    p.add_argument("--work", default=None, help="where the weights go (default: a temporary folder)")
    a = p.parse_args()
    parts = a.parts.split(",")
    if "serve" in parts:
        C.require("httpx", "pip install httpx")
        C.require("fastapi", "pip install -e '.[serve]'")
    if a.checkpoint:
        ckpt, what = Path(a.checkpoint).resolve(), a.checkpoint
    else:
        work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="llmscratch-conversation-bench-"))
        ckpt, what = make_weights(work, Path(a.gpt2_dir), peer=False)[0], "GPT-2 124M shapes (random weights)"
    print(C.header(f"conversations: {a.turns} turns, {a.new_tokens} new tokens a turn, {what}, --dtype {a.dtype}",
                   torch.device("cpu")), flush=True)
    if "chat" in parts:
        print("chat (one conversation; each turn's prompt also answered from scratch by a second model):")
        rows = chat_part(ckpt, a.dtype, a.turns, a.new_tokens)
        print("\n| turn | prompt tokens | kept | first token, kept | from scratch | ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['turn']} | {r['prompt']} | {r['reused']} | {1e3 * r['ttft']:.0f} ms | "
                  f"{1e3 * r['fresh_ttft']:.0f} ms | {r['fresh_ttft'] / r['ttft']:.1f}x |")
        later = rows[1:]
        if later:
            print(f"turns 2-{len(rows)}: first token {1e3 * statistics.median(r['ttft'] for r in later):.0f} ms "
                  f"kept, {1e3 * statistics.median(r['fresh_ttft'] for r in later):.0f} ms from scratch (medians); "
                  f"whole turns {sum(r['total'] for r in later):.1f} s against "
                  f"{sum(r['fresh_total'] for r in later):.1f} s")
    if "serve" in parts:
        print(f"\nserve ({a.clients} conversations at once, --max-batch 8):")
        rows = serve_part(ckpt, a.dtype, a.clients, a.turns, a.new_tokens)
        print("\n| server | p50 first token, turn 1 | later turns | last turn | prompt tokens cached | wall |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['server']} | {r['ttft_first']:.2f} s | {r['ttft_later'] or 0:.2f} s | "
                  f"{r['ttft_last']:.2f} s | {r['cached']} / {r['prompt']} | {r['wall']:.1f} s |")


if __name__ == "__main__":
    main()
