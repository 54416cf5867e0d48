"""`llmscratch serve` against the official `openai` client (and httpx, for what that client will not send), on a
real server process of a tiny random model; the failures that need a stalled or broken engine are driven in this
process, through the ASGI app."""

import asyncio
import json
import logging
import re
import socket
import time

import pytest
from clitools import assert_user_error, run

openai = pytest.importorskip("openai", reason="the openai client is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

PROMPT = "The module"
# The greedy answer to these begins with a space (" p..."), which a chat answer drops.
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And then?"}]
KEY = "test-key-0123"


@pytest.fixture(scope="module")
def name(tiny_checkpoint) -> str:
    return tiny_checkpoint.name


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    """(model, tokenizer) loaded in this process the way the server loads them."""
    from llmscratch.cli.inference import load_for_inference

    return load_for_inference(str(tiny_checkpoint), "cpu", "fp32")


# --- the API through the openai client ------------------------------------------------------------------------
def test_models_and_health(client, live_server, name):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(name, "model", "llmscratch")]
    assert client.models.retrieve(name).id == name
    assert httpx.get(live_server.url + "/health").json() == {"status": "ok", "model": name, "active": 0,
                                                             "waiting": 0}


def test_startup_says_what_the_kv_cache_holds(live_server, tiny_checkpoint, start_server):
    """Before its ready line the server says how many KV-cache rows it keeps and their size at the full context
    (`live_server`: --max-batch 16, fp32, so 32 rows by default); `--prefix-cache-rows 0` leaves the batch's."""
    from llmscratch.config import ModelConfig
    from llmscratch.model.memory import format_bytes, kv_cache_bytes

    cfg = ModelConfig.load(tiny_checkpoint / "config.json")
    full = format_bytes(kv_cache_bytes(cfg, cfg.context_length, 4, 32))
    assert (f"KV cache of 32 rows (16 for the batch, 16 more keep finished requests for the prefix cache), {full} "
            "once they hold the full context") in live_server.log()
    server = start_server(tiny_checkpoint, "--max-batch", 3, "--prefix-cache-rows", 0)
    try:
        assert "KV cache of 3 rows (3 for the batch), " in server.log()
    finally:
        server.stop()


def test_greedy_completion_equals_generate_in_this_process(client, local, name):
    from llmscratch.generate import generate

    model, tok = local
    res = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0)
    expected = generate(model, tok, PROMPT, max_new_tokens=24, temperature=0)
    assert res.object == "text_completion" and res.id.startswith("cmpl-") and res.model == name
    assert res.choices[0].text == expected and expected.strip()
    assert res.choices[0].finish_reason == "length"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(tok.encode(PROMPT)), 24)
    assert res.usage.total_tokens == res.usage.prompt_tokens + 24
    # A prompt given as token ids, or as a list of one string, is the same prompt.
    for prompt in (tok.encode(PROMPT), [PROMPT]):
        again = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
        assert again.choices[0].text == expected


def test_chat_answers_in_the_checkpoints_chat_format(client, local, name):
    """A checkpoint without prompt style or chat template chats in the plain User:/Assistant: format; the answer
    is what decoding that prompt gives, without the space the model puts after "Assistant:"."""
    from llmscratch.generate import generate
    from llmscratch.prompts import chat_format

    model, tok = local
    prompt = chat_format(tok, None).render(MESSAGES)
    assert prompt.text.endswith("User: And then?\nAssistant:")
    res = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=20, temperature=0)
    raw = generate(model, tok, prompt.text, max_new_tokens=20, temperature=0, stop=prompt.stop)
    expected = raw.lstrip()
    assert expected != raw  # (so the test sees the space dropped)
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == expected and expected.strip()
    assert res.usage.prompt_tokens == len(tok.encode(prompt.text))


def test_a_conversations_next_turn_reads_only_what_it_adds(client, local, live_server, name):
    """The server keeps a finished request's keys and values in its free cache row: the next turn of the
    conversation, whose prompt repeats the first, reads only its new part (`usage.prompt_tokens_details`, as the
    OpenAI API reports cached prompt tokens), and answers as decoding it afresh does."""
    from llmscratch.generate import common_prefix, generate
    from llmscratch.prompts import chat_format

    def cached_total():
        return httpx.get(live_server.url + "/metrics", params={"format": "json"}).json()["prompt_tokens_cached_total"]

    model, tok = local
    fmt = chat_format(tok, None)
    turns = [{"role": "system", "content": "Count the owls: 48213."}, {"role": "user", "content": "How many?"}]
    first = client.chat.completions.create(model=name, messages=turns, max_tokens=12, temperature=0)
    turns += [{"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And the crows?"}]
    before = cached_total()
    second = client.chat.completions.create(model=name, messages=turns, max_tokens=12, temperature=0)
    ids = [tok.encode(fmt.render(turns[:2]).text), tok.encode(fmt.render(turns).text)]
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert common_prefix(*ids) <= cached < second.usage.prompt_tokens == len(ids[1])
    assert common_prefix(*ids) >= len(ids[0]) - 1  # (the first prompt is all but a prefix of the second)
    assert cached_total() == before + cached
    prompt = fmt.render(turns)
    expected = generate(model, tok, prompt.text, max_new_tokens=12, temperature=0, stop=prompt.stop).lstrip()
    assert second.choices[0].message.content == expected


def test_streamed_completion_joins_to_the_whole_answer(client, name):
    whole = client.completions.create(model=name, prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].text
    assert sum(1 for p in pieces if p) > 5  # streamed piece by piece, not in one go
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_streamed_chat_joins_to_the_whole_answer(client, name):
    whole = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text.strip()
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    # Without include_usage there is no usage chunk.
    plain = list(client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=5, temperature=0,
                                                stream=True))
    assert all(c.choices for c in plain) and plain[-1].choices[0].finish_reason is not None


def test_stop_string_ends_the_answer_before_it(client, name):
    full = client.completions.create(model=name, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    # A stop string the greedy answer is known to contain: its last run of letters not seen before.
    words = [m.group() for m in re.finditer(r"[A-Za-z]{2,}", full) if full.index(m.group()) == m.start() > 0]
    assert words, full
    stop = words[-1]
    expected = full[:full.index(stop)]
    res = client.completions.create(model=name, prompt=PROMPT, max_tokens=40, temperature=0,
                                    stop=[stop, "never in the text"])
    assert res.choices[0].text == expected and res.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=name, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_seed_makes_sampling_reproducible(client, name):
    def sample(seed):
        return client.completions.create(model=name, prompt=PROMPT, max_tokens=32, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


@pytest.mark.parametrize("fields, needles", [
    ({"temperature": 3}, ["temperature", "between 0 and 2", "3"]),
    ({"max_tokens": 513}, ["max_tokens", "512", "513"]),  # over the cap: the context length
    ({"max_tokens": 0}, ["max_tokens", "got 0"]),
    ({"top_p": 0}, ["top_p"]),
    ({"n": 2}, ["n=2", "not supported"]),
    ({"presence_penalty": 0.5}, ["presence_penalty"]),
    ({"echo": True}, ["echo"]),
    ({"prompt": ["one", "two"]}, ["one prompt per request"]),
    ({"prompt": [5, 100000]}, ["100000", "vocabulary"]),
    ({"prompt": ""}, ["empty"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, ["at most 4"]),
])
def test_bad_values_are_400_with_a_message(client, name, fields, needles):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": name, "prompt": PROMPT, **fields})
    error = info.value.body
    assert error["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in error["message"], error


def test_chat_bad_messages_are_400(client, name):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "hi"}])
    assert info.value.body["param"] == "messages" and "messages[0].role" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=name, messages=MESSAGES, max_completion_tokens=10_000)
    assert "max_completion_tokens" in info.value.body["message"]


def test_prompt_over_the_limit_is_refused_with_the_numbers(client, local, name):
    prompt = "The module holds the parser. " * 80
    n = len(local[1].encode(prompt))
    assert n > 511
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=name, prompt=prompt, max_tokens=4)
    assert f"has {n} tokens" in info.value.body["message"] and "at most 511" in info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_not_found(client, name):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and name in info.value.body["message"]


def test_oversize_request_is_413(client, live_server, name):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=name, prompt="a" * (2 << 20), max_tokens=2)
    assert info.value.status_code == 413 and info.value.body["code"] == "request_too_large"
    # A chunked upload declares no length: the bytes received are counted.
    body = json.dumps({"prompt": "a" * (2 << 20)}).encode()
    res = httpx.post(live_server.url + "/v1/completions", content=iter([body[i:i + 65536]
                                                                         for i in range(0, len(body), 65536)]),
                     headers={"Content-Type": "application/json"})
    assert res.request.headers.get("transfer-encoding") == "chunked"
    assert res.status_code == 413 and res.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": "x",', "body is not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"max_tokens": 4}', "prompt: Field required"),
    (b'{"prompt": "x", "max_tokens": "many"}', "max_tokens"),
])
def test_malformed_bodies_are_400_with_an_error_body(live_server, content, needle):
    res = httpx.post(live_server.url + "/v1/completions", content=content,
                     headers={"Content-Type": "application/json"})
    assert res.status_code == 400
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert needle in error["message"] and "Traceback" not in res.text


def test_body_not_sent_as_json_is_400_saying_so(live_server):
    res = httpx.post(live_server.url + "/v1/completions", content=b'{"prompt": "x"}',
                     headers={"Content-Type": "text/plain"})
    assert res.status_code == 400
    assert "Content-Type: application/json (got text/plain)" in res.json()["error"]["message"]


def test_unknown_route_is_404_with_an_error_body(live_server):
    res = httpx.post(live_server.url + "/v1/embeddings", json={"input": "x"})
    assert res.status_code == 404 and "/v1/embeddings" in res.json()["error"]["message"]


def test_metrics_count_requests_and_tokens(client, live_server, name, local):
    def metrics():
        return httpx.get(live_server.url + "/metrics", params={"format": "json"}).json()

    before = metrics()
    client.completions.create(model=name, prompt=PROMPT, max_tokens=5, temperature=0)
    after = metrics()
    assert after["requests_total"] == before["requests_total"] + 1
    assert after["requests_completed"] == before["requests_completed"] + 1
    assert after["tokens_generated_total"] == before["tokens_generated_total"] + 5
    assert after["prompt_tokens_total"] == before["prompt_tokens_total"] + len(local[1].encode(PROMPT))
    assert "# TYPE llmscratch_prompt_tokens_cached_total counter" in httpx.get(live_server.url + "/metrics").text
    assert after["time_to_first_token_p50_seconds"] > 0
    res = httpx.get(live_server.url + "/metrics")
    assert res.headers["content-type"].startswith("text/plain")
    assert "# TYPE llmscratch_requests_total counter" in res.text
    assert f"\nllmscratch_requests_total {after['requests_total']}\n" in res.text
    assert "\nllmscratch_queue_depth 0\n" in res.text


def test_web_page_is_served_at_the_root(live_server):
    res = httpx.get(live_server.url + "/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    assert "<html" in res.text.lower()


# --- a server with an API key --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(tiny_checkpoint, start_server):
    server = start_server(tiny_checkpoint, "--api-key-env", "LLMSCRATCH_TEST_KEY", env={"LLMSCRATCH_TEST_KEY": KEY})
    yield server
    server.stop()


def test_api_key_is_required_on_v1_only(keyed_server, name):
    url = keyed_server.url
    good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [name]
    assert good.completions.create(model=name, prompt=PROMPT, max_tokens=3, temperature=0).usage.completion_tokens
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model=name, prompt=PROMPT, max_tokens=3)
    assert info.value.body["code"] == "invalid_api_key"
    res = httpx.get(url + "/v1/models")  # no Authorization header at all
    assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200  # the page and the probes stay open
    assert httpx.get(url + "/").status_code == 200


# --- the serve verb's own mistakes ---------------------------------------------------------------------------
def test_unset_api_key_variable_is_a_user_error(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("LLMSCRATCH_NO_SUCH_KEY", raising=False)
    code, _, err = run(["serve", tiny_checkpoint, "--api-key-env", "LLMSCRATCH_NO_SUCH_KEY"], capsys)
    assert_user_error(code, err, "LLMSCRATCH_NO_SUCH_KEY", "unset or empty")


def test_port_in_use_is_a_user_error(tiny_checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(["serve", tiny_checkpoint, "--port", port], capsys)
    assert_user_error(code, err, f"port {port}", "already in use")


@pytest.mark.parametrize("option, value, needle", [
    ("--max-prompt-tokens", 0, "--max-prompt-tokens 0: out of range; allowed: > 0"),
    ("--max-prompt-tokens", 512, "below the model's context length (512), got 512"),
    ("--request-timeout", -1, "--request-timeout -1: out of range; allowed: > 0"),
    ("--max-batch", 0, "--max-batch 0: out of range; allowed: > 0"),
    ("--max-queue", -1, "--max-queue -1: out of range; allowed: >= 0"),
    ("--prefill-tokens", 0, "--prefill-tokens 0: out of range; allowed: > 0"),
    ("--prefix-cache-rows", -1, "--prefix-cache-rows -1: out of range; allowed: >= 0"),
])
def test_bad_limit_is_a_user_error(tiny_checkpoint, capsys, option, value, needle):
    code, _, err = run(["serve", tiny_checkpoint, "--port", 0, "--dtype", "fp32", option, value], capsys)
    assert_user_error(code, err, needle)


# --- failures driven in this process, through the ASGI app (its lifespan does not run: the engine starts only
# where a test starts it) -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from llmscratch.checkpoint import load

    return load(tiny_checkpoint)


def _app(loaded, max_batch=2, max_queue=4, tokenizer=None, **limits):
    from llmscratch.prompts import chat_format
    from llmscratch.serve.app import Limits, create_app
    from llmscratch.serve.engine import Engine

    model, tok = loaded
    engine = Engine(model, tok, max_batch, max_queue)
    app = create_app(engine, tokenizer or tok, chat_format(tok, None), "tiny", model.config.context_length,
                     limits=Limits(**limits))
    return app, engine


def _post(app, body: dict, path: str = "/v1/completions"):
    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post(path, json=body)

    return asyncio.run(post())


def _stream_error(res) -> dict:
    """The error chunk of a streamed answer that failed; checks the stream still ends with [DONE]."""
    assert res.status_code == 200 and res.text.endswith("data: [DONE]\n\n")
    errors = [json.loads(line[6:])["error"] for line in res.text.splitlines() if line.startswith('data: {"error"')]
    assert len(errors) == 1, res.text
    return errors[0]


def test_full_queue_is_429_with_retry_after(loaded):
    from llmscratch.serve.engine import SamplingParams

    app, engine = _app(loaded, max_batch=1, max_queue=0)
    engine.submit([1, 2, 3], SamplingParams(max_tokens=4))  # the engine is not running: it keeps the one place
    res = _post(app, {"prompt": PROMPT})
    assert res.status_code == 429 and res.headers["retry-after"] == "1"
    assert res.json()["error"]["code"] == "rate_limit_exceeded"
    assert engine.metrics()["requests_rejected"] == 1


def test_shutting_down_is_503(loaded):
    app, _ = _app(loaded)
    app.state.api.closing = True
    res = _post(app, {"prompt": PROMPT})
    assert res.status_code == 503 and "shutting down" in res.json()["error"]["message"]


def test_request_timeout_is_504_or_a_stream_error(loaded):
    app, _ = _app(loaded, request_timeout=0.2)  # an engine that never answers
    res = _post(app, {"prompt": PROMPT})
    assert res.status_code == 504
    assert res.json()["error"]["code"] == "timeout" and "0.2 s" in res.json()["error"]["message"]
    error = _stream_error(_post(app, {"prompt": PROMPT, "stream": True}))
    assert error["code"] == "timeout"


def test_engine_failure_is_500_with_its_message(loaded, monkeypatch):
    from llmscratch.generate import DecodeBatch

    def explode(self):
        raise RuntimeError("the kernel exploded")

    monkeypatch.setattr(DecodeBatch, "step", explode)
    app, engine = _app(loaded)
    engine.start()
    try:
        res = _post(app, {"prompt": PROMPT})
        assert res.status_code == 500
        assert res.json()["error"] == {"message": "RuntimeError: the kernel exploded", "type": "server_error",
                                       "param": None, "code": None}
        error = _stream_error(_post(app, {"messages": MESSAGES, "stream": True}, "/v1/chat/completions"))
        assert error["message"] == "RuntimeError: the kernel exploded"
    finally:
        engine.shutdown()


def test_unexpected_exception_is_500_without_a_traceback(loaded, caplog):
    class Broken:
        def encode(self, text):
            raise ValueError("the tokenizer broke\n  with a second line")

    app, _ = _app(loaded, tokenizer=Broken())
    with caplog.at_level(logging.ERROR, logger="llmscratch.serve"):
        res = _post(app, {"prompt": PROMPT})
    assert res.status_code == 500
    assert res.json()["error"]["message"] == "internal server error: ValueError: the tokenizer broke with a second line"
    assert "Traceback" not in res.text
    assert [r.exc_info is not None for r in caplog.records if r.name == "llmscratch.serve"] == [True]


def test_client_that_leaves_a_plain_request_cancels_it(loaded):
    """A client that hangs up before its (non-streamed) answer is ready: the request is cancelled, and never
    decoded."""
    app, engine = _app(loaded)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 100}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(0.1)  # the client waits a little, then leaves
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    asyncio.run(app(scope, receive, send))  # the engine is not running yet: the request is still queued
    engine.start()
    try:
        deadline = time.monotonic() + 5
        while engine.metrics()["requests_cancelled"] == 0:
            assert time.monotonic() < deadline, engine.metrics()
            time.sleep(0.01)
        assert engine.metrics()["tokens_generated_total"] == 0
        assert engine.active() == engine.waiting() == 0
    finally:
        engine.shutdown()
