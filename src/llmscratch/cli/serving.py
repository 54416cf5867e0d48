"""`llmscratch serve`: a checkpoint behind an OpenAI-compatible HTTP API, with a web chat page at `/`.

The model runs in the continuous-batching engine (`llmscratch.serve.engine`); the HTTP side is
`llmscratch.serve.app` on uvicorn (the `serve` extra). The server listens on loopback unless `--host` says
otherwise; the API key, when there is one, is read from an environment variable, never from the command line
(which `ps` shows to every user of the machine).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmscratch.cli.base import (
    MODEL_FOLDER_HELP,
    NonNegativeInt,
    Optional,
    Port,
    PositiveFloat,
    PositiveInt,
    Verb,
    inference_options,
)
from llmscratch.errors import UserError


def _serve_parser(p) -> None:
    from jsonargparse import ActionYesNo

    p.add_argument("checkpoint", help=MODEL_FOLDER_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback lets other machines in (use --api-key-env)")
    p.add_argument("--port", type=Port, default=8000, help="port to listen on; 0 picks a free one (the ready line "
                   "shows it)")
    p.add_argument("--api-key-env", default=None,
                   help="name of an environment variable holding the API key: /v1 requests must then send "
                        "`Authorization: Bearer KEY`")
    p.add_argument("--max-batch", type=PositiveInt, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=NonNegativeInt, default=64,
                   help="requests waiting for a place in the batch; past it, requests get 429 with Retry-After")
    p.add_argument("--prefill-tokens", type=PositiveInt, default=256,
                   help="prompt tokens processed per decoding step, shared by the requests that just arrived: a "
                        "long prompt delays the other streams by one such chunk at a time, not by all of it")
    p.add_argument("--prefix-cache", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="keep a finished request's keys and values in its free batch row, so a request whose prompt "
                        "begins with the same tokens (a conversation's next turn, a shared instruction) reads only "
                        "the rest; usage.prompt_tokens_details.cached_tokens says how many it found (default: on; "
                        "--no-prefix-cache reads every prompt whole)")
    p.add_argument("--prefix-cache-rows", type=Optional[NonNegativeInt], default=None,
                   help="KV-cache rows beyond --max-batch that only keep finished requests for the prefix cache, so "
                        "conversations still find their last turn while --max-batch others are decoding (default: "
                        "as many as --max-batch; each row holds up to a context of keys and values; 0: only the "
                        "batch's free rows)")
    p.add_argument("--max-prompt-tokens", type=Optional[PositiveInt], default=None,
                   help="longest prompt in tokens (default: the model's context length - 1)")
    p.add_argument("--max-tokens-cap", type=Optional[PositiveInt], default=None,
                   help="largest max_tokens a request may ask for (default: the model's context length)")
    p.add_argument("--request-timeout", type=PositiveFloat, default=300.0,
                   help="seconds a request may take; then it is stopped (504, or an error event in a stream)")
    p.add_argument("--model-name", default=None,
                   help="the model's id in the API (default: the checkpoint folder's name)")
    p.add_argument("--thinking", action=ActionYesNo(no_prefix="no-"), default=None,
                   help="Qwen3 chat templates: think before answering, or not (--no-thinking), when a request does "
                        "not say (its enable_thinking); default: the template's own. Other formats ignore it")
    inference_options(p)


def cmd_serve(a) -> None:
    api_key = _api_key(a.api_key_env)
    uvicorn = _serve_extra()
    _check_before_listening(a)
    sock = _listen(a.host, a.port)  # before loading the model: a port in use fails at once
    try:
        import ipaddress

        from llmscratch.cli.inference import load_for_inference, saved_style
        from llmscratch.prompts import chat_format
        from llmscratch.serve.app import Limits, create_app
        from llmscratch.serve.engine import Engine

        if api_key is None and not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
            sys.stderr.write(f"llmscratch: warning: listening on {a.host} without an API key: anyone who can reach "
                             "this machine can use the model (see --api-key-env)\n")
        # Loaded on the engine's thread, which packs it too (Engine.load says why); --dtype auto measures bf16
        # against fp32 at one row and at --max-batch rows.
        engine = Engine.load(lambda: load_for_inference(a.checkpoint, a.device, a.dtype, pack=False,
                                                        rows=a.max_batch),
                             max_batch=a.max_batch, max_queue=a.max_queue, pack=not a.no_pack,
                             prefill_tokens=a.prefill_tokens, prefix_cache=a.prefix_cache,
                             prefix_cache_rows=a.prefix_cache_rows)
        model, tok = engine.model, engine.tokenizer
        fmt = chat_format(tok, saved_style(a.checkpoint))
        name = a.model_name or Path(a.checkpoint).resolve().name
        limits = Limits(max_prompt_tokens=a.max_prompt_tokens, max_tokens_cap=a.max_tokens_cap,
                        request_timeout=a.request_timeout)
        url = _url(a.host, sock.getsockname()[1])
        ready = (_cache_line(engine) + f"llmscratch: serving {name} (chat format: {fmt.describe()}) on {url} — web "
                 "chat at /, API at /v1\n")
        app = create_app(engine, tok, fmt, name, model.config.context_length, api_key=api_key, limits=limits,
                         thinking=a.thinking, on_ready=lambda: (sys.stderr.write(ready), sys.stderr.flush()))
        # Ctrl-C: requests in flight get a few seconds to finish, then they are cancelled and the engine stops.
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _check_before_listening(a) -> None:
    """What can be checked without loading the model, checked before the port is taken: the device and dtype
    names, and the limits against the context length in the checkpoint's config.json (an adapter folder's is
    checked once its base is loaded)."""
    from llmscratch import runs
    from llmscratch.config import ModelConfig
    from llmscratch.runtime import check_dtype_name, resolve_device
    from llmscratch.serve.app import Limits

    resolve_device(a.device)
    check_dtype_name(a.dtype)  # (the name only: `auto`'s probe runs on the engine's thread)
    if runs.is_adapter_only(a.checkpoint):
        return
    config = runs.find_model_folder(a.checkpoint) / runs.CONFIG
    if config.is_file():
        Limits(max_prompt_tokens=a.max_prompt_tokens, max_tokens_cap=a.max_tokens_cap,
               request_timeout=a.request_timeout).for_context(ModelConfig.load(config).context_length)


def _cache_line(engine) -> str:
    """What the KV cache will hold, for sizing a machine: its rows (the batch's, and those that keep finished
    requests for the prefix cache) and their size once the requests fill the context."""
    from llmscratch.model.memory import format_bytes, kv_cache_bytes

    cfg = engine.model.config
    width = next(engine.model.parameters()).element_size()
    full = kv_cache_bytes(cfg, cfg.context_length, width, engine.cache_rows)
    kept = engine.cache_rows - engine.max_batch
    keep = f", {kept} more keep finished requests for the prefix cache" if kept else ""
    return (f"llmscratch: up to {engine.max_batch} requests decode together; KV cache of {engine.cache_rows} rows "
            f"({engine.max_batch} for the batch{keep}), {format_bytes(full)} once they hold the full context "
            "(--max-batch, --prefix-cache-rows)\n")


def _api_key(variable: str | None) -> str | None:
    """The API key held by environment variable `variable` (None: the server has no key)."""
    if variable is None:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise UserError(f"--api-key-env {variable}: the environment variable {variable} is unset or empty; set it "
                        f"to the key clients must send (export {variable}=...)")
    return key


def _serve_extra():
    """The uvicorn module, once FastAPI and uvicorn are known to be installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(f"llmscratch serve needs FastAPI and uvicorn ({exc.name} is missing): "
                        "pip install 'llmscratch[serve]'") from None
    return uvicorn


def _listen(host: str, port: int):
    """A socket bound to `host`:`port` and listening (port 0: a free one). Clients that connect before the server
    has started wait in its backlog."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebinding right after a restart (TIME_WAIT)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use: stop what listens there, or pick another "
                            "--port (0: any free one)") from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


SERVE = Verb("Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
             "/v1/models; streaming; continuous batching) with a web chat page at /, /health and /metrics. Needs "
             "the serve extra: pip install 'llmscratch[serve]'.", _serve_parser, cmd_serve)
