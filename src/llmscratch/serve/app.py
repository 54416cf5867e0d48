"""The OpenAI-compatible HTTP API of `llmscratch serve` (FastAPI), in front of the continuous-batching `Engine`.

Routes: `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (each with `stream`: server-sent
events ending in `data: [DONE]`), `GET /health`, `GET /metrics` (Prometheus text; `?format=json` for the engine's
dict) and the web chat page at `/`. Every error carries OpenAI's body, `{"error": {"message", "type", "param",
"code"}}`, so a client library raises its usual exception; no traceback ever reaches a client.

The handlers run on the event loop and never run the model: they check and tokenize a request, submit it to the
engine and relay its events. A request whose client leaves, or whose time runs out, is cancelled in the engine at
once, which frees its place in the batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, ClassVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from llmscratch.errors import UserError, one_line
from llmscratch.serve.engine import Busy, Event, SamplingParams
from llmscratch.tokenizer.base import prompt_ids

log = logging.getLogger("llmscratch.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server. `max_prompt_tokens` and `max_tokens_cap` left None become the
    model's context length less one and the context length (`for_context`). An answer that fills the context
    ends there (finish reason "length"), whatever its max_tokens."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens_cap: int | None = None
    request_timeout: float = 300.0  # seconds, from submission to the last token

    def for_context(self, context_length: int) -> Limits:
        """These limits with the defaults filled in for a model of `context_length`; UserError (naming the
        serve verb's option) for a limit that is not positive."""
        filled = replace(
            self,
            max_prompt_tokens=context_length - 1 if self.max_prompt_tokens is None else self.max_prompt_tokens,
            max_tokens_cap=context_length if self.max_tokens_cap is None else self.max_tokens_cap)
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens_cap", "request_timeout"):
            value = getattr(filled, name)
            if not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if filled.max_prompt_tokens >= context_length:  # the model would see only the prompt's last tokens
            raise UserError(f"--max-prompt-tokens must be below the model's context length ({context_length}), "
                            f"got {filled.max_prompt_tokens}")
        if filled.max_tokens_cap > context_length:  # an answer ends where the context is full anyway
            raise UserError(f"--max-tokens-cap {filled.max_tokens_cap}: more than the model's context length "
                            f"{context_length}; use at most {context_length}")
        return filled


def create_app(engine, tokenizer, chat_format, model_name: str, context_length: int, *, api_key: str | None = None,
               limits: Limits = Limits(), thinking: bool | None = None,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The API over `engine` (an `llmscratch.serve.engine.Engine` of a model whose `tokenizer` it shares).

    `chat_format`: an `llmscratch.prompts.ChatFormat`, which renders /v1/chat/completions' messages; `thinking`: the
    default of Qwen3's thinking switch for requests that do not set it (None: the template's own). `api_key`: when
    given, every /v1 route wants `Authorization: Bearer KEY` (`/`, /health and /metrics stay open). The engine
    starts with the app (its lifespan), then `on_ready()` is called; it stops when the app shuts down. Setting
    `app.state.api.closing` makes new requests fail with 503.
    """
    api = _Api(engine, tokenizer, chat_format, model_name, limits.for_context(context_length), api_key, thinking)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            api.closing = True
            await asyncio.to_thread(engine.shutdown)  # joins the scheduler thread: not on the event loop

    # No /docs or /redoc: their pages load scripts from a CDN, and this API is OpenAI's, documented there.
    app = FastAPI(title="llmscratch", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.api = api
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api.authorize)])
    v1.add_api_route("/models", api.models, methods=["GET"], response_model=None)
    v1.add_api_route("/models/{model_id}", api.model, methods=["GET"], response_model=None)
    v1.add_api_route("/completions", api.completions, methods=["POST"], response_model=None)
    v1.add_api_route("/chat/completions", api.chat_completions, methods=["POST"], response_model=None)
    app.include_router(v1)
    app.add_api_route("/health", api.health, methods=["GET"], response_model=None)
    app.add_api_route("/metrics", api.metrics, methods=["GET"], response_model=None)
    app.add_api_route("/", api.index, methods=["GET"], response_model=None, include_in_schema=False)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(_Guard, max_body_bytes=api.limits.max_body_bytes)
    return app


# --- errors ------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered with HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"message": message, "type": type, "param": param, "code": code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, status_code=self.status, headers=self.headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body that does not parse or fit the fields, as a 400 naming the first problem."""
    first = (exc.errors() or [{}])[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        at = f" at character {where[0]}" if where else ""
        return ApiError(400, f"body is not valid JSON ({reason}{at})" if reason else "body is not valid JSON",
                        code="invalid_json").response()
    message = first.get("msg", "invalid request")
    kind = request.headers.get("content-type", "")
    if not where and kind and "json" not in kind:  # FastAPI reads a body as JSON only when it says it is
        return ApiError(400, f"the body must be JSON, sent with Content-Type: application/json (got {kind})",
                        code="invalid_json").response()
    if not where:
        return ApiError(400, f"the body must be a JSON object: {message}").response()
    param = ".".join(where)
    return ApiError(400, f"{param}: {message}", param=param).response()


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in OpenAI's body."""
    route = f"{request.method} {request.url.path}"
    message = {404: f"no such route: {route}", 405: f"method not allowed: {route}"}.get(exc.status_code,
                                                                                         str(exc.detail))
    return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                    headers=getattr(exc, "headers", None)).response()


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _Guard:
    """ASGI middleware around the app: refuses a body over `max_body_bytes` with 413 (by its Content-Length, and
    by the bytes actually received, which a chunked upload does not declare), and turns an unexpected exception
    into a 500 with OpenAI's body; its traceback goes to the server's log, never to the client."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = _replay(await self._body(scope, receive), receive)
            await self.app(scope, receive, tracked)
        except _ClientGone:
            return
        except _BodyTooLarge:
            await ApiError(413, f"the request body is over this server's limit of {self.max_body_bytes} bytes",
                           code="request_too_large").response()(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the client gets one line; the log gets the traceback
            log.error("%s %s failed: %s", scope["method"], scope["path"], one_line(exc), exc_info=exc)
            if not started:  # (mid-stream, the response has begun: the connection just ends)
                await ApiError(500, f"internal server error: {type(exc).__name__}: {one_line(exc)}",
                               "server_error").response()(scope, receive, send)

    async def _body(self, scope, receive) -> bytes:
        """The whole request body, read before the app sees it so that its size is known."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BodyTooLarge
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                raise _BodyTooLarge
            if not message.get("more_body", False):
                return bytes(body)


def _replay(body: bytes, receive):
    """An ASGI `receive` that hands out `body` first, then whatever `receive` says (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


# --- request bodies -------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = None


class _Body(BaseModel):
    """The fields both generation routes take. Unknown fields are ignored (OpenAI keeps adding some); the ones
    this server does not implement are accepted only at their neutral values (`NEUTRAL`)."""

    model_config = ConfigDict(extra="ignore")
    NEUTRAL: ClassVar[dict[str, tuple]] = {"n": (None, 1), "presence_penalty": (None, 0),
                                           "frequency_penalty": (None, 0), "logit_bias": (None, {})}

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Any = None
    n: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    def refuse_unsupported(self) -> None:
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value not in neutral:
                shown = one_line(json.dumps(value))[:60]
                raise ApiError(400, f"{name}={shown} is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")


class CompletionBody(_Body):
    NEUTRAL: ClassVar[dict[str, tuple]] = {**_Body.NEUTRAL, "echo": (None, False), "logprobs": (None,),
                                           "best_of": (None, 1), "suffix": (None, "")}

    prompt: Any
    echo: Any = None
    logprobs: Any = None
    best_of: Any = None
    suffix: Any = None


class ChatBody(_Body):
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **_Body.NEUTRAL, "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
        "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
        "response_format": (None, {"type": "text"})}

    messages: Any
    max_completion_tokens: int | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None


# --- the routes ---------------------------------------------------------------------------------------------
class _Api:
    """What the routes share: the engine, the model's tokenizer and chat format, and the server's limits."""

    def __init__(self, engine, tokenizer, chat_format, model_name: str, limits: Limits, api_key: str | None,
                 thinking: bool | None):
        self.engine, self.tokenizer, self.chat_format = engine, tokenizer, chat_format
        self.name, self.limits, self.api_key, self.thinking = model_name, limits, api_key, thinking
        self.vocab_size = engine.model.config.vocab_size
        self.created = int(time.time())
        self.closing = False  # set when the server shuts down: new requests get 503
        self.page = _page()

    async def authorize(self, request: Request) -> None:
        """The /v1 routes' dependency: the bearer key, when the server has one."""
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send it as the header `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str):
        self._check_model(model_id)
        return self._model_card()

    async def completions(self, body: CompletionBody, request: Request):
        self._check_model(body.model)
        body.refuse_unsupported()
        ids = self._prompt_ids(body.prompt)
        params = self._params(body, body.max_tokens, 16, "max_tokens")  # 16: OpenAI's default
        return await self._answer(ids, params, body, _Reply(False, self.name), request)

    async def chat_completions(self, body: ChatBody, request: Request):
        self._check_model(body.model)
        body.refuse_unsupported()
        try:
            prompt = self.chat_format.render(body.messages, _thinking(body, self.thinking))
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        ids = self._checked_length(self.tokenizer.encode(prompt.text), "messages")
        named = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = self._params(body, getattr(body, named), self.limits.max_tokens_cap, named, prompt.stop)
        return await self._answer(ids, params, body, _Reply(True, self.name), request)

    async def health(self):
        status = {"status": "shutting_down" if self.closing else "ok", "model": self.name,
                  "active": self.engine.active(), "waiting": self.engine.waiting()}
        return JSONResponse(status, status_code=503 if self.closing else 200)

    async def metrics(self, format: str = "prometheus"):
        if format == "json":
            return self.engine.metrics()
        if format != "prometheus":
            raise ApiError(400, f"format must be prometheus or json, got {format!r}", param="format")
        return PlainTextResponse(_prometheus(self.engine.metrics()), media_type="text/plain; version=0.0.4")

    async def index(self):
        if self.page is None:
            raise ApiError(404, "the web chat page is not installed (llmscratch/serve/static/index.html); "
                                "the API is at /v1", code="not_found")
        return HTMLResponse(self.page)

    # --- a request, checked, becomes an engine job ---------------------------------------------------------
    def _model_card(self) -> dict:
        # max_model_len (as vLLM names it): the context, prompt and answer together; max_tokens_cap: the largest
        # max_tokens a request may ask (the web page keeps its setting within it).
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llmscratch",
                "max_model_len": self.engine.model.config.context_length,
                "max_tokens_cap": self.limits.max_tokens_cap}

    def _check_model(self, model: str | None) -> None:
        if model and model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def _prompt_ids(self, prompt: Any) -> list[int]:
        """A completion's prompt as token ids: a string, a list of one string, or a list of token ids."""
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > 1:
                raise ApiError(400, f"one prompt per request: got {len(prompt)}; send each as its own request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._checked_length(prompt_ids(self.tokenizer, prompt), "prompt")
        if not isinstance(prompt, list) or not all(type(t) is int for t in prompt):
            raise ApiError(400, "prompt must be a string, a list of one string, or a list of token ids",
                           param="prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"prompt: token id {bad[0]} is outside this model's vocabulary "
                                f"(0..{self.vocab_size - 1})", param="prompt")
        return self._checked_length(prompt, "prompt")

    def _checked_length(self, ids: list[int], param: str) -> list[int]:
        most = self.limits.max_prompt_tokens
        if not ids:
            raise ApiError(400, "the prompt is empty: give at least one token", param=param)
        if len(ids) > most:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most {most} "
                                "(its --max-prompt-tokens)", param=param, code="context_length_exceeded")
        return ids

    def _params(self, body: _Body, max_tokens: int | None, default: int, name: str,
                extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        cap = self.limits.max_tokens_cap
        max_tokens = default if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= cap:
            raise ApiError(400, f"{name} must be between 1 and {cap} (this server's cap), got {max_tokens}",
                           param=name)
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:  # (NaN fails this too)
            raise ApiError(400, f"temperature must be between 0 and 2, got {temperature:g}", param="temperature")
        if body.top_p is not None and not 0 < body.top_p <= 1:
            raise ApiError(400, f"top_p must be above 0 and at most 1, got {body.top_p:g}", param="top_p")
        if body.seed is not None and not -(2 ** 63) <= body.seed < 2 ** 64:  # what torch.Generator takes
            raise ApiError(400, f"seed must fit in 64 bits, got {body.seed}", param="seed")
        top_p = None if body.top_p in (None, 1) else body.top_p
        stop = _stop_strings(body.stop) + tuple(extra_stop)
        return SamplingParams(max_tokens, temperature, top_p, None, stop, body.seed)

    # --- the engine's events become the answer ----------------------------------------------------------------
    async def _answer(self, ids: list[int], params: SamplingParams, body: _Body, reply: _Reply, request: Request):
        """Submit the job; then the whole answer as JSON, or (`body.stream`) a response streaming it as events."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        try:
            job = self.engine.submit(ids, params)
        except Busy as exc:
            raise ApiError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        watch = _Watch(job, request.receive, self.limits.request_timeout)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(watch, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, last = [], None
        try:
            async for event in _until(watch):
                texts.append(event.text)
                last = event
        finally:
            watch.close()
        if last is not None and last.finish_reason in ("stop", "length"):
            return reply.whole("".join(texts), last)
        raise self._failure(last, watch)

    async def _stream(self, watch: _Watch, reply: _Reply, usage: bool) -> AsyncIterator[str]:
        """The server-sent events of an answer: its pieces, the finish chunk, the usage chunk (`usage`), then
        `[DONE]`; after a failure, an error chunk then `[DONE]`; nothing more once the client has left."""
        try:
            if reply.chat:
                yield _event(reply.chunk(role=True))
            last = None
            async for event in _until(watch):
                last = event
                piece = reply.visible(event.text)
                if piece:
                    yield _event(reply.chunk(piece))
            if last is not None and last.finish_reason in ("stop", "length"):
                yield _event(reply.chunk(finish=last.finish_reason))
                if usage:
                    yield _event(reply.usage_chunk(last))
            elif watch.reason == "disconnect":
                return
            else:
                yield _event({"error": self._failure(last, watch).body})
            yield "data: [DONE]\n\n"
        finally:
            watch.close()

    def _failure(self, last: Event | None, watch: _Watch) -> ApiError:
        """The error of a request that ended without an answer."""
        if watch.reason == "disconnect":  # (nobody reads it)
            return ApiError(499, "the client closed the request", code="client_closed")
        if watch.reason == "timeout":
            return ApiError(504, f"the request took longer than {self.limits.request_timeout:g} s (this server's "
                                 "--request-timeout) and was stopped", "server_error", code="timeout")
        if last is not None and last.finish_reason == "error":
            if self.closing:
                return ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
            return ApiError(500, one_line(last.error, "the model failed"), "server_error")
        return ApiError(500, "the request ended without an answer", "server_error")


class _Watch:
    """Ends a request early: when its client disconnects, or `timeout` seconds after it was submitted. Either way
    the engine job is cancelled at once (its place in the batch frees) and `fired` is done, with `reason`
    "disconnect" or "timeout"."""

    def __init__(self, job, receive, timeout: float):
        loop = asyncio.get_running_loop()
        self.job, self.reason = job, None
        self.fired = loop.create_future()
        self._timer = loop.call_later(timeout, self._fire, "timeout")
        self._listener = loop.create_task(self._listen(receive))

    async def _listen(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._fire("disconnect")

    def _fire(self, reason: str) -> None:
        if not self.fired.done():
            self.reason = reason
            self.fired.set_result(reason)
            self.job.queue.put_nowait(None)  # wakes `_until`, which waits on the job's queue alone
        self.job.cancel()

    def close(self) -> None:
        """The answer is over or abandoned: stop watching, and stop the job if it still runs."""
        self._timer.cancel()
        self._listener.cancel()
        self.job.cancel()


async def _until(watch: _Watch) -> AsyncIterator[Event]:
    """The job's events up to its last one; cut short, without a last event, when `watch` fires (the engine's own
    "cancelled" event may come a step later, or never once the engine has stopped: it is not waited for). The
    watch wakes a wait on the queue with None, so each event costs one queue read (a task and an
    `asyncio.wait` per event cost ~3% of the server's throughput at 32 streams, benchmarks/RESULTS.md)."""
    queue = watch.job.queue
    while not watch.fired.done():
        event = await queue.get()
        if event is None or watch.fired.done():
            return
        yield event
        if event.finish_reason is not None:
            return


class _Reply:
    """One answer in OpenAI's shapes: a chat completion (`chat`) or a text completion, whole or as stream chunks.
    A chat answer loses the whitespace a model puts before its first word ("Assistant: Hi")."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": model}
        self.started = not chat  # whether the text has begun (until then a chat answer drops leading whitespace)

    def visible(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text

    def whole(self, text: str, last: Event) -> dict:
        text = self.visible(text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": last.finish_reason, "logprobs": None}
            return self._object("chat.completion", [choice], usage=_usage(last))
        choice = {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}
        return self._object("text_completion", [choice], usage=_usage(last))

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        """A stream chunk: a piece of text, the finish reason, or (chat) the opening role."""
        if not self.chat:
            return self._object("text_completion", [{"index": 0, "text": text or "", "finish_reason": finish,
                                                     "logprobs": None}])
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish,
                                                       "logprobs": None}])

    def usage_chunk(self, last: Event) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [], usage=_usage(last))

    def _object(self, kind: str, choices: list, **rest) -> dict:
        return {"id": self.head["id"], "object": kind, "created": self.head["created"], "model": self.head["model"],
                "choices": choices, **rest}


# --- small pieces ----------------------------------------------------------------------------------------------
def _usage(last: Event) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > 4:
        raise ApiError(400, f"stop takes at most 4 strings, got {len(stops)}", param="stop")
    return tuple(s for s in stops if s)


def _thinking(body: ChatBody, default: bool | None) -> bool | None:
    """Qwen3's thinking switch for this request: `chat_template_kwargs.enable_thinking` (vLLM's spelling), else
    a top-level `enable_thinking`, else the server's default."""
    kwargs = body.chat_template_kwargs or {}
    if "enable_thinking" in kwargs:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise ApiError(400, "chat_template_kwargs.enable_thinking must be true or false",
                           param="chat_template_kwargs.enable_thinking")
        return kwargs["enable_thinking"]
    return default if body.enable_thinking is None else body.enable_thinking


def _page() -> str | None:
    """The web chat page shipped in the package; None when it is missing."""
    try:
        return (resources.files("llmscratch.serve") / "static" / "index.html").read_text(encoding="utf-8")
    except OSError:
        return None


# (engine.metrics() key, Prometheus name, type, help)
_METRICS = [
    ("requests_total", "llmscratch_requests_total", "counter", "Requests accepted by the engine."),
    ("requests_completed", "llmscratch_requests_completed_total", "counter",
     "Requests answered in full (finish reason stop or length)."),
    ("requests_cancelled", "llmscratch_requests_cancelled_total", "counter",
     "Requests stopped early: the client left or the request timed out."),
    ("requests_failed", "llmscratch_requests_failed_total", "counter", "Requests the engine failed."),
    ("requests_rejected", "llmscratch_requests_rejected_total", "counter",
     "Requests refused because the queue was full (HTTP 429)."),
    ("tokens_generated_total", "llmscratch_tokens_generated_total", "counter", "Tokens generated."),
    ("prompt_tokens_total", "llmscratch_prompt_tokens_total", "counter",
     "Prompt tokens of the requests that got a first token."),
    ("prompt_tokens_cached_total", "llmscratch_prompt_tokens_cached_total", "counter",
     "Prompt tokens found in the KV cache (an earlier request's), not processed again."),
    ("tokens_per_second", "llmscratch_tokens_per_second", "gauge", "Tokens generated per second, last 10 s."),
    ("waiting", "llmscratch_queue_depth", "gauge", "Requests waiting for a place in the batch."),
    ("active", "llmscratch_active_requests", "gauge", "Requests being decoded."),
    ("max_batch", "llmscratch_max_batch", "gauge", "Requests decoded together at most."),
    ("time_to_first_token_p50_seconds", "llmscratch_time_to_first_token_p50_seconds", "gauge",
     "Median time from submission to first token, recent requests."),
    ("time_to_first_token_p95_seconds", "llmscratch_time_to_first_token_p95_seconds", "gauge",
     "95th percentile time from submission to first token, recent requests."),
    ("uptime_seconds", "llmscratch_uptime_seconds", "gauge", "Seconds since the engine started."),
]


def _prometheus(metrics: dict) -> str:
    """`metrics` (Engine.metrics()) in Prometheus' text exposition format; a figure not known yet is NaN."""
    lines = []
    for key, name, kind, help in _METRICS:
        value = metrics.get(key)
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {'NaN' if value is None else value}"]
    return "\n".join(lines) + "\n"
