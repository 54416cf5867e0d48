"""The continuous-batching engine in-process (no HTTP): outputs equal decoding alone, the queue cap, cancellation,
and every way a request ends."""

import asyncio

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.generate import generate
from llmscratch.model.transformer import GPT
from llmscratch.serve.engine import Busy, Engine, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    from llmscratch.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["byte level hello world, the engine decodes"], 300, progress=False)
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("llama-micro", vocab_size=tok.vocab_size, context_length=48)).eval(), tok


def _serve(model, tok, jobs, max_batch=2, max_queue=16, **settings):
    """Run `jobs` [(prompt, SamplingParams)] through one engine at once; their (text, last event) in order."""
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue, **settings)
    engine.start()

    async def one(prompt, params):
        request = engine.submit(tok.encode(prompt), params)
        pieces = [event async for event in request.events()]
        return "".join(e.text for e in pieces), pieces[-1]

    async def all_jobs():
        return await asyncio.gather(*(one(p, s) for p, s in jobs))

    try:
        return asyncio.run(all_jobs()), engine.metrics()
    finally:
        engine.shutdown()


def test_requests_decoded_together_equal_decoding_alone(tiny):
    model, tok = tiny
    jobs = [(p, SamplingParams(max_tokens=n, temperature=0.0)) for p, n in
            [("hello", 9), ("the engine", 20), ("w", 4), ("byte level hello", 13), ("de", 30)]]
    results, metrics = _serve(model, tok, jobs, max_batch=2)  # 5 requests through 2 places
    for (prompt, params), (text, last) in zip(jobs, results):
        assert last.finish_reason == "length" and last.completion_tokens == params.max_tokens
        assert text == generate(model, tok, prompt, max_new_tokens=params.max_tokens, temperature=0.0)
        assert last.prompt_tokens == len(tok.encode(prompt))
    assert metrics["requests_completed"] == 5 and metrics["tokens_generated_total"] == 9 + 20 + 4 + 13 + 30
    assert metrics["active"] == 0 and metrics["waiting"] == 0


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_requests_that_repeat_a_finished_prompt_find_it_cached_unless_turned_off(tiny, prefix_cache):
    """One place in the batch: the second request waits for the first, whose prompt and answer it repeats."""
    model, tok = tiny
    params = SamplingParams(max_tokens=6, temperature=0.0)
    (first, _), = _serve(model, tok, [("the engine", params)], max_batch=1)[0]
    follow = "the engine" + first + " hello"
    results, metrics = _serve(model, tok, [("the engine", params), (follow, params)], max_batch=1,
                              prefix_cache=prefix_cache)
    (_, one), (text, two) = results
    expected = len(tok.encode("the engine" + first)) - 1 if prefix_cache else 0
    assert (one.cached_tokens, two.cached_tokens) == (0, expected) and (expected > 2 or not prefix_cache)
    assert metrics["prompt_tokens_cached_total"] == expected
    assert metrics["prompt_tokens_total"] == len(tok.encode("the engine")) + len(tok.encode(follow))
    assert text == generate(model, tok, follow, max_new_tokens=6, temperature=0.0)


@pytest.mark.parametrize("spare", [0, 1])
def test_a_spare_cache_row_keeps_a_conversation_while_another_request_decodes(tiny, spare):
    """One place in the batch, three requests: A, then B, then A's next turn. B takes the batch's one row as A
    leaves it; with a spare row (`prefix_cache_rows`) A's keys and values move there and A's next turn finds them,
    without one they are overwritten."""
    model, tok = tiny
    params = SamplingParams(max_tokens=6, temperature=0.0)
    (first, _), = _serve(model, tok, [("the engine", params)], max_batch=1)[0]
    follow = "the engine" + first + " hello"
    results, metrics = _serve(model, tok, [("the engine", params), ("world", params), (follow, params)],
                              max_batch=1, prefix_cache_rows=spare)
    (_, one), (_, two), (text, three) = results
    expected = len(tok.encode("the engine" + first)) - 1 if spare else 0
    assert (one.cached_tokens, two.cached_tokens, three.cached_tokens) == (0, 0, expected)
    assert expected > 2 or not spare
    assert text == generate(model, tok, follow, max_new_tokens=6, temperature=0.0)


def test_a_step_that_fails_while_admitting_a_request_fails_it_and_the_engine_goes_on(tiny, monkeypatch):
    """A step can fail after it took a request from the queue and before the request joined the batch (placing it
    in the cache). That request gets an error event, and the same engine answers the next one."""
    from llmscratch.generate import DecodeBatch

    model, tok = tiny
    place, calls = DecodeBatch._place, []

    def place_once_failing(self, row):
        calls.append(row)
        if len(calls) == 1:
            raise RuntimeError("out of memory while placing")
        return place(self, row)

    monkeypatch.setattr(DecodeBatch, "_place", place_once_failing)
    engine = Engine(model, tok, max_batch=1)
    engine.start()
    params = SamplingParams(max_tokens=4, temperature=0.0)

    async def one():
        request = engine.submit(tok.encode("hello"), params)
        events = [event async for event in request.events()]
        return "".join(e.text for e in events), events[-1]

    async def two_in_turn():
        return [await asyncio.wait_for(one(), timeout=30) for _ in range(2)]

    try:
        (failed, failed_last), (text, last) = asyncio.run(two_in_turn())
    finally:
        engine.shutdown()
    assert failed_last.finish_reason == "error" and "out of memory while placing" in failed_last.error
    assert failed == "" and len(calls) == 2
    assert last.finish_reason == "length" and text == generate(model, tok, "hello", max_new_tokens=4, temperature=0.0)


def test_cache_rows():
    from llmscratch.serve.engine import cache_rows

    assert cache_rows(8) == 16 and cache_rows(8, True, 0) == 8 and cache_rows(8, True, 3) == 11
    assert cache_rows(8, False, 3) == 8  # no prefix cache: nothing to keep


def test_stop_string_eos_and_full_context(tiny):
    model, tok = tiny
    greedy = generate(model, tok, "hello", max_new_tokens=12, temperature=0.0)
    stop = greedy[3:5]
    prompt = "byte level hello world"
    room = model.config.context_length - len(tok.encode(prompt))
    (cut, cut_last), (full, full_last) = _serve(model, tok, [
        ("hello", SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,))),
        (prompt, SamplingParams(max_tokens=500, temperature=0.0))])[0]
    assert cut == greedy[:greedy.find(stop)] and cut_last.finish_reason == "stop"
    assert full_last.finish_reason == "length" and full_last.completion_tokens == room  # the context is full


def test_end_of_text_ends_a_request_without_its_token(tiny):
    """Declare a greedy token the tokenizer's end-of-text: the request ends there, without it."""
    from llmscratch.generate import generate_ids

    model, tok = tiny
    ids = [int(t[0]) for t in generate_ids(model, torch.tensor([tok.encode("w")]), 12)]
    k = max(i for i in range(12) if ids[i] not in ids[:i])  # the latest token not generated before it

    class EndsAt:  # the tokenizer, with ids[k] as end-of-text
        eos_id = ids[k]

        def __getattr__(self, name):
            return getattr(tok, name)

    (text, last), = _serve(model, EndsAt(), [("w", SamplingParams(max_tokens=20, temperature=0.0))])[0]
    assert last.finish_reason == "stop" and last.completion_tokens == k
    assert text == tok.decode(ids[:k])


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(tiny):
    model, tok = tiny
    params = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.95, seed=11)
    alone = _serve(model, tok, [("hello", params)])[0][0][0]
    crowded = _serve(model, tok, [("the engine", SamplingParams(max_tokens=20, temperature=1.0, seed=1)),
                                  ("hello", params), ("w", SamplingParams(max_tokens=5, temperature=0.0))])[0]
    assert crowded[1][0] == alone
    assert alone == generate(model, tok, "hello", max_new_tokens=15, temperature=1.0, top_p=0.95, seed=11)


def test_queue_cap_and_cancel_free_places(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    engine.start()

    async def scenario():
        long = SamplingParams(max_tokens=10_000, temperature=0.0)
        first = engine.submit(tok.encode("hello"), long)
        second = engine.submit(tok.encode("world"), long)  # waits for the one place
        with pytest.raises(Busy) as busy:
            engine.submit(tok.encode("w"), long)
        assert busy.value.retry_after >= 1
        events = first.events()
        await events.__anext__()  # the first is decoding
        first.cancel()
        second.cancel()
        finals = [e async for e in events][-1], [e async for e in second.events()][-1]
        for _ in range(100):
            if engine.metrics()["active"] == 0 and engine.metrics()["waiting"] == 0:
                break
            await asyncio.sleep(0.02)
        third = engine.submit(tok.encode("w"), SamplingParams(max_tokens=3, temperature=0.0))
        last = [e async for e in third.events()][-1]
        return finals, last

    try:
        (first_final, second_final), last = asyncio.run(scenario())
    finally:
        metrics = engine.metrics()
        engine.shutdown()
    assert first_final.finish_reason == "cancelled" and second_final.finish_reason == "cancelled"
    assert last.finish_reason == "length" and last.completion_tokens == 3
    assert metrics["requests_cancelled"] == 2 and metrics["requests_rejected"] == 1


def test_an_engine_made_by_load_loads_and_decodes_on_its_own_thread(tiny):
    """`Engine.load`: the loader runs on the scheduler's thread (the server's main thread then never runs tensor
    work), the engine waits for `start`, decodes there, and what the loader raises reaches the caller."""
    import threading

    from llmscratch.errors import UserError

    model, tok = tiny
    threads = {}

    def loader():
        threads["loader"] = threading.current_thread()
        return model, tok

    engine = Engine.load(loader, max_batch=2, max_queue=4)
    assert threads["loader"] is engine._thread and threads["loader"] is not threading.main_thread()
    assert engine.model is model and engine.tokenizer is tok and engine.max_batch == 2
    engine.start()

    async def one():
        request = engine.submit(tok.encode("hello"), SamplingParams(max_tokens=6, temperature=0.0))
        return "".join([e.text async for e in request.events()])

    try:
        text = asyncio.run(one())
    finally:
        engine.shutdown()
    assert text == generate(model, tok, "hello", max_new_tokens=6, temperature=0.0)
    assert not engine._thread.is_alive()

    def broken():
        raise UserError("runs/nothing: no checkpoint here")

    with pytest.raises(UserError, match="no checkpoint here"):
        Engine.load(broken, max_batch=2)
    idle = Engine.load(loader, max_batch=2)
    idle.shutdown()  # never started: its waiting thread ends too
    assert not idle._thread.is_alive()
    with pytest.raises(UserError, match="--max-batch"):  # the engine's own checks, on its thread, raised here
        Engine.load(loader, max_batch=0)
