"""The continuous-batching engine behind `llmscratch serve`.

One scheduler thread owns the model (and, made by `Engine.load`, loads it too: the server's main thread then never
runs tensor work, which on a CPU keeps OpenMP to one team of threads). It decodes every active request together,
one token per request per step (`llmscratch.generate.DecodeBatch`): new requests join at a step boundary,
finished or abandoned ones leave at once and free their place for a waiting one. The HTTP side lives on an
asyncio event loop in another thread and never runs the model: `submit` queues a request and returns a
`Request`, whose `events()` yield the text as the scheduler produces it (handed over with
`loop.call_soon_threadsafe`). PyTorch releases the GIL inside its kernels, so the event loop keeps answering
while a step runs.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy; `seed` makes sampling reproducible (each request has
    its own generator, so its tokens do not depend on the requests it shares the batch with)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Event:
    """A piece of a request's output. The last event has `finish_reason` set ("stop": end-of-text or a stop
    string; "length": max_tokens or the context is full; "error": the engine failed, `error` says how).
    `cached_tokens`: of the prompt's tokens, those found in the KV cache (an earlier request's), not processed."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0


class Busy(Exception):
    """The queue of waiting requests is full: retry after `retry_after` seconds (HTTP 429 with Retry-After)."""

    def __init__(self, waiting: int, retry_after: int = 1):
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class Request:
    """One submitted request. `events()` yields its output as it is made; `cancel()` (a client that left) takes it
    out of the batch at the next step boundary."""

    _ids = itertools.count(1)

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop | None):
        self.id = next(Request._ids)
        self.engine, self.prompt_ids, self.params = engine, list(prompt_ids), params
        self.loop = loop
        self.queue: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished = False
        self.row = None  # its DecodeBatch row, once the scheduler has taken it
        self.text = None  # its llmscratch.generate.TextStream

    async def events(self) -> AsyncIterator[Event]:
        """The request's events up to and including the one with a finish_reason."""
        while True:
            event = await self.queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.engine.cancel(self)


def cache_rows(max_batch: int, prefix_cache: bool = True, prefix_cache_rows: int | None = None) -> int:
    """The rows of the server's KV cache: `max_batch` decoding, and with the prefix cache on, `prefix_cache_rows`
    more (None: as many again) that only keep finished requests for the next turns of their conversations. Without
    them a full batch parks nothing: a conversation's next turn that arrives while `max_batch` others decode is
    read whole. (The compiled-ahead rows step is built for this many rows: benchmarks/serve.py prebuilds it.)"""
    if not prefix_cache:
        return max_batch
    return max_batch + (max_batch if prefix_cache_rows is None else prefix_cache_rows)


class Engine:
    """The scheduler: `max_batch` requests decoded together, at most `max_queue` waiting behind them.

    `prefill_tokens`: prompt tokens processed per step (`DecodeBatch`'s chunked prefill). `pack`: on a CPU, pack
    the model's linears for oneDNN (`llmscratch.model.packed`, laid out for `max_batch` rows) from the scheduler
    thread itself, before its first step. Packed by another thread, the same weights made a GPT-2 124M step at 32
    rows ~30% slower on the 2-core CPU of benchmarks/RESULTS.md. `prefix_cache`: finished requests' keys and
    values stay in free cache rows for later prompts that begin the same way (`DecodeBatch`'s `reuse`);
    `prefix_cache_rows`: cache rows beyond `max_batch` kept for them (None: as many as `max_batch`,
    `cache_rows`)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, pack: bool = False,
                 prefill_tokens: int = 256, prefix_cache: bool = True, prefix_cache_rows: int | None = None):
        from llmscratch.errors import UserError

        for name, value, least in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                                   ("--prefill-tokens", prefill_tokens, 1),
                                   ("--prefix-cache-rows", 0 if prefix_cache_rows is None else prefix_cache_rows, 0)):
            if value < least:
                raise UserError(f"{name} must be {'positive' if least else 'at least 0'}, got {value}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.pack, self.prefill_tokens = max_batch, max_queue, pack, prefill_tokens
        self.prefix_cache = prefix_cache
        self.cache_rows = cache_rows(max_batch, prefix_cache, prefix_cache_rows)
        self.ctx = model.config.context_length
        self._lock = threading.Condition()
        self._incoming: deque[Request] = deque()  # submitted, not yet seen by the scheduler
        self._cancelled: set[Request] = set()
        self._requests: set[Request] = set()  # in the batch (decoding or waiting for a place)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox: list[tuple[Request, Event]] = []  # events of this step, handed over together by `_flush`
        self._go = threading.Event()  # `start` was called (for a thread made by `load`)
        self.stats = _Stats()

    @classmethod
    def load(cls, loader: Callable[[], tuple], **settings) -> Engine:
        """An engine whose model `loader()` -> (model, tokenizer) loads on the engine's own thread, which waits
        there for `start` and then schedules; `settings` are `Engine`'s other arguments. Raises what `loader`
        raises.

        Why the thread matters on a CPU: each thread that runs parallel tensor work gets its own OpenMP team, and
        with two teams on a 2-core machine OpenMP stops letting its idle workers spin between operations. A GPT-2
        124M step at one row ran at 23-25 tok/s on a thread of its own after the model was made on the main
        thread, against 37-41 tok/s with everything on one thread (benchmarks/RESULTS.md)."""
        made: dict = {}
        loaded = threading.Event()

        def main() -> None:
            try:
                model, tokenizer = loader()
                made["engine"] = engine = cls(model, tokenizer, **settings)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                made["error"] = exc
                return
            finally:
                loaded.set()
            engine._go.wait()
            if not engine._stopping:
                engine._run()

        thread = threading.Thread(target=main, name="llmscratch-engine", daemon=True)
        thread.start()
        loaded.wait()
        if "error" in made:
            thread.join()
            raise made["error"]
        engine = made["engine"]
        engine._thread = thread
        return engine

    # --- the event-loop side --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:  # made by `load`: its thread waits for this
            self._go.set()
            return
        self._thread = threading.Thread(target=self._run, name="llmscratch-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._go.set()  # (a thread made by `load` that was never started)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None) -> Request:
        """Queue a request (thread-safe); raises `Busy` when `max_queue` requests already wait for a place."""
        request = Request(self, prompt_ids, params, loop if loop is not None else _running_loop())
        with self._lock:
            if len(self._incoming) + len(self._requests) >= self.max_batch + self.max_queue:
                self.stats.rejected += 1
                raise Busy(self.waiting())
            self._incoming.append(request)
            self.stats.requests += 1
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        with self._lock:
            if not request.finished:
                self._cancelled.add(request)
                self._lock.notify()

    def waiting(self) -> int:
        """Requests queued for a place in the batch."""
        return len(self._incoming) + max(0, len(self._requests) - self.max_batch)

    def active(self) -> int:
        return min(len(self._requests), self.max_batch)

    def metrics(self) -> dict:
        return self.stats.snapshot(active=self.active(), waiting=self.waiting(), max_batch=self.max_batch)

    # --- the scheduler thread -------------------------------------------------------------------------
    def _run(self) -> None:
        from llmscratch.generate import DecodeBatch
        from llmscratch.model.packed import pack_for_cpu_inference

        if self.pack:
            pack_for_cpu_inference(self.model, self.max_batch, where_faster=True)  # a no-op off the CPU
        batch = DecodeBatch(self.model, self.max_batch, prefill_tokens=self.prefill_tokens, compiled_ahead=True,
                            reuse=self.prefix_cache, spare_rows=self.cache_rows - self.max_batch)
        try:
            while self._take_work(batch):
                try:
                    pairs = batch.step()
                except Exception as exc:  # noqa: BLE001 - fail the requests of this step, keep serving
                    self._fail_all(batch, f"{type(exc).__name__}: {exc}")
                    self._flush()
                    continue
                now = time.perf_counter()
                self.stats.tokens(len(pairs), now)
                for row, token in pairs:
                    self._advance(batch, row.key, token, now)
                self._flush()
        finally:
            self._fail_all(batch, "the server is shutting down")
            self._flush()
            batch.close()

    def _take_work(self, batch) -> bool:
        """Move new and cancelled requests in and out of the batch; wait while there is nothing to do. False once
        the engine is stopping."""
        from llmscratch.errors import UserError
        from llmscratch.generate import Row, TextStream

        with self._lock:
            while not self._stopping and not self._incoming and not self._cancelled and not len(batch):
                self._lock.wait(timeout=1.0)
            if self._stopping:
                return False
            while self._incoming:
                request = self._incoming.popleft()
                p = request.params
                self._requests.add(request)
                try:
                    request.row = Row(request.prompt_ids, p.temperature, p.top_k, p.top_p, p.seed, key=request)
                except UserError as exc:  # an empty prompt: this request fails, the scheduler goes on
                    self.stats.failed += 1
                    self._finish(batch, request, Event("", "error", error=str(exc)))
                    continue
                request.text = TextStream(self.tokenizer, p.stop)
                batch.add(request.row)
            for request in self._cancelled:
                if request in self._requests:
                    self.stats.cancelled += 1
                    self._finish(batch, request, Event("", "cancelled"))
            self._cancelled.clear()
        return True

    def _advance(self, batch, request: Request, token: int, now: float) -> None:
        """Take a request's new token: its text so far goes out, and the request ends on end-of-text, a stop
        string, max_tokens or a full context."""
        if request.first_token_at is None:
            request.first_token_at = now
            self.stats.first_token(now - request.submitted, request.row)
        row, eos = request.row, self.tokenizer.eos_id
        if token == eos:
            self._finish(batch, request, self._last(request, request.text.finish(), "stop", drop_last=True))
            return
        piece = request.text.add(token)
        if request.text.stopped:
            self._finish(batch, request, self._last(request, piece, "stop"))
        elif len(row.generated) >= request.params.max_tokens or len(row.ids) >= self.ctx:
            self._finish(batch, request, self._last(request, piece + request.text.finish(), "length"))
        elif piece:
            self._send(request, Event(piece))

    def _send(self, request: Request, event: Event) -> None:
        self._outbox.append((request, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up of each loop per step, not one per event (at
        32 requests a step, per-event wake-ups kept the event loop busy while the next step ran)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Event]]] = {}
        for request, event in self._outbox:
            if request.loop is not None:
                by_loop.setdefault(request.loop, []).append((request, event))
        self._outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _last(self, request: Request, text: str, reason: str, drop_last: bool = False) -> Event:
        completion = len(request.row.generated) - (1 if drop_last else 0)  # end-of-text is not part of the answer
        return Event(text, reason, len(request.prompt_ids), completion, cached_tokens=request.row.reused)

    def _finish(self, batch, request: Request, event: Event) -> None:
        request.finished = True
        self._requests.discard(request)
        if request.row is not None:
            batch.remove(request.row)
        if event.finish_reason in ("stop", "length"):
            self.stats.completed += 1  # before the event goes out: whoever reads it then sees the count
        self._send(request, event)

    def _fail_all(self, batch, message: str) -> None:
        """End every request in the batch with an error event — and, when the engine stops, the ones not yet
        taken in too."""
        with self._lock:
            if self._stopping:
                self._requests.update(self._incoming)
                self._incoming.clear()
            for request in list(self._requests):
                self.stats.failed += 1
                self._finish(batch, request, Event("", "error", error=message))


def _deliver(items: list[tuple[Request, Event]]) -> None:
    for request, event in items:
        request.queue.put_nowait(event)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Stats:
    """Counters for /metrics: requests by outcome, tokens generated (and their rate over the last 10 s), prompt
    tokens read and found cached, and the time to first token of recent requests."""

    WINDOW = 10.0  # seconds of the tokens/s figure

    def __init__(self):
        self.requests = self.completed = self.cancelled = self.failed = self.rejected = 0
        self.generated = self.prompt_tokens = self.cached_tokens = 0
        self.started = time.perf_counter()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._ttft: deque[float] = deque(maxlen=1000)

    def tokens(self, n: int, now: float) -> None:
        self.generated += n
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - self.WINDOW:
            self._recent.popleft()

    def first_token(self, seconds: float, row) -> None:
        """A request's first token came `seconds` after it was submitted; its prompt (`row`, a `Row`) was read."""
        self._ttft.append(seconds)
        self.prompt_tokens += row.n_prompt
        self.cached_tokens += row.reused

    def snapshot(self, **gauges) -> dict:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self._recent if t >= now - self.WINDOW]
        span = min(self.WINDOW, now - self.started)
        ttft = sorted(self._ttft)
        return {"requests_total": self.requests, "requests_completed": self.completed,
                "requests_cancelled": self.cancelled, "requests_failed": self.failed,
                "requests_rejected": self.rejected, "tokens_generated_total": self.generated,
                "prompt_tokens_total": self.prompt_tokens, "prompt_tokens_cached_total": self.cached_tokens,
                "tokens_per_second": sum(n for _, n in recent) / span if span > 0 else 0.0,
                "time_to_first_token_p50_seconds": ttft[len(ttft) // 2] if ttft else None,
                "time_to_first_token_p95_seconds": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else None,
                "uptime_seconds": now - self.started, **gauges}
