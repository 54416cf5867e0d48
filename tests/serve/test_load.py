"""Load on a live `llmscratch serve` (--max-batch 16 --max-queue 64): 50 concurrent streaming clients all get whole
answers, and clients that leave mid-stream free their places in the batch at once."""

import asyncio
import json
import time

import pytest

httpx = pytest.importorskip("httpx", reason="httpx is not installed")

BOUND = 60  # seconds the load test may take at most


async def _stream(client, prompt: str, max_tokens: int, leave_after: int | None = None):
    """(status, the `data:` lines) of one streamed completion; with `leave_after`, the client closes the connection
    after that many lines."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    lines = []
    async with client.stream("POST", "/v1/completions", json=body) as res:
        async for line in res.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
            if leave_after is not None and len(lines) == leave_after:
                break  # leaving the block closes the connection mid-stream
    return res.status_code, lines


def _metrics(url: str) -> dict:
    return httpx.get(url + "/metrics", params={"format": "json"}).json()


def test_fifty_concurrent_streams_all_end_with_done(live_server):
    async def main():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=live_server.url, timeout=BOUND, limits=limits) as client:
            runs = [_stream(client, f"Client {i} asks about the module", 16) for i in range(50)]
            return await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), BOUND)

    before = _metrics(live_server.url)
    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], live_server.log()
    for status, lines in results:
        assert status == 200
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert all("error" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    after = _metrics(live_server.url)
    assert after["requests_completed"] - before["requests_completed"] == 50
    assert after["requests_failed"] == before["requests_failed"]
    assert after["requests_rejected"] == before["requests_rejected"]


def test_clients_that_leave_mid_stream_free_their_slots(live_server):
    """Ten clients read two chunks of a long answer and hang up: the engine cancels their requests, the batch and
    the queue empty, and the next request is served."""
    async def main():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=BOUND) as client:
            runs = [_stream(client, f"Client {i} leaves early", 400, leave_after=2) for i in range(10)]
            return await asyncio.wait_for(asyncio.gather(*runs), BOUND)

    before = _metrics(live_server.url)
    assert all(status == 200 and len(lines) == 2 for status, lines in asyncio.run(main()))
    deadline = time.monotonic() + 5
    while (now := _metrics(live_server.url))["active"] or now["waiting"]:
        assert time.monotonic() < deadline, f"slots still taken 5 s after the clients left: {now}"
        time.sleep(0.05)
    cancelled = now["requests_cancelled"] - before["requests_cancelled"]
    completed = now["requests_completed"] - before["requests_completed"]
    assert cancelled >= 1 and cancelled + completed == 10
    # Stopped, not decoded to the end: far fewer than their 10 × 400 tokens were generated.
    assert now["tokens_generated_total"] - before["tokens_generated_total"] < 10 * 400 // 2
    res = httpx.post(live_server.url + "/v1/completions", json={"prompt": "After them", "max_tokens": 4}, timeout=30)
    assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] >= 1
