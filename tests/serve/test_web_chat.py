"""The chat page of `llmscratch serve`, driven in a real (headless) Chromium against a live server.

`live_server` (tests/serve/conftest.py) serves a tiny random model without an API key; its `.url` is the base URL.
"""

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IDLE = '#messages[data-state="idle"]'


@pytest.fixture
def browser():
    """A headless Chromium; skips when Playwright or the browser is missing — except under CI (.ci/run installs
    both and sets LLMSCRATCH_REQUIRE_BROWSER=1), where their absence fails the test."""
    required = os.environ.get("LLMSCRATCH_REQUIRE_BROWSER") == "1"
    try:
        from playwright import sync_api
    except ImportError:
        if required:
            pytest.fail("LLMSCRATCH_REQUIRE_BROWSER=1 but playwright is not installed")
        pytest.skip("playwright is not installed (pip install playwright; .ci/run does)")
    if not CHROMIUM.exists():
        if required:
            pytest.fail(f"LLMSCRATCH_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _served_model_id(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as res:
        return json.load(res)["data"][0]["id"]


def _open_chat(context, base_url: str):
    """A new page of `context` on the chat, with uncaught script errors collected in `page.script_errors`."""
    page = context.new_page()
    page.script_errors = []
    page.on("pageerror", lambda exc: page.script_errors.append(str(exc)))
    page.goto(base_url + "/")
    page.wait_for_function("document.querySelector('#model').textContent.trim() !== ''")
    return page


def _ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")
    # The click handler marks the stream synchronously, so idle here means this answer has ended.
    page.wait_for_selector(IDLE, timeout=60_000)


def test_chat_streams_answers_and_keeps_history(browser, live_server):
    page = _open_chat(browser.new_context(viewport={"width": 900, "height": 700}), live_server.url)
    assert page.text_content("#model") == _served_model_id(live_server.url)
    # Answers of 64 tokens: two turns and the room for a third answer fit in the context (512), so nothing is left
    # out (test_a_long_conversation_leaves_out_its_oldest_turns_and_keeps_the_cache).
    page.click("#settings-toggle")
    page.fill("#max-tokens", "64")
    page.click("#settings-toggle")
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)

    _ask(page, "Hello")
    assert page.text_content("#error") == ""
    assert page.locator(".msg.user").count() == 1
    assert page.locator(".msg.assistant").count() == 1
    assert "tokens/s" in page.text_content("#stats")
    first_answer = page.text_content(".msg.assistant")

    _ask(page, "And then?")
    assert page.text_content("#error") == ""
    assert page.locator(".msg").count() == 4
    assert len(bodies) == 2
    assert bodies[0]["stream"] is True and bodies[0]["messages"] == [{"role": "user", "content": "Hello"}]
    # The second request carries the whole conversation, the first answer exactly as it was shown.
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And then?"},
    ]
    # The server found the first turn in its cache, and the stats line says so.
    assert re.search(r"· \d+ prompt tokens cached$", page.text_content("#stats"))
    assert page.get_attribute("#stop", "disabled") is not None
    assert page.script_errors == []

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)


def test_page_loads_nothing_from_outside(browser, live_server):
    """The page works offline: every request it makes goes to the server that served it (no CDN, no fonts)."""
    context = browser.new_context()
    urls = []
    context.on("request", lambda r: urls.append(r.url))
    page = _open_chat(context, live_server.url)
    _ask(page, "Hi")
    assert page.locator(".msg.assistant").count() == 1
    assert any(u.endswith("/v1/chat/completions") for u in urls)
    outside = [u for u in urls if not u.startswith(live_server.url + "/")]
    assert outside == []
    assert page.script_errors == []
    context.close()


def _prompt_tokens(checkpoint, messages) -> int:
    """How many tokens the server's prompt for `messages` has: rendered as the server renders it (the tiny
    checkpoint has no prompt style or template, so the plain format), independently of the page's own guesses."""
    from llmscratch.prompts import PlainChat
    from llmscratch.tokenizer import load_tokenizer

    return len(load_tokenizer(checkpoint).encode(PlainChat().render(messages).text))


def test_a_long_conversation_leaves_out_its_oldest_turns_and_keeps_the_cache(browser, live_server, tiny_checkpoint):
    """Past the model's context (512 tokens) the page leaves out its oldest turns instead of failing: every prompt
    and its answer fit; the turns left out are dimmed under a divider; a trim goes a quarter below the room, so
    the next turns extend the last request and the server's cache serves them. A question whose tokens the page
    guesses too low (two-byte characters the tiny BPE spells byte by byte) is refused, and the page leaves out
    more and asks again by itself; a question longer than the context alone is an error that gives the text back
    and sends the turns left out for it again."""
    max_tokens, turns = 24, 20  # turns of ~45 tokens: a few fit in the quarter of the room a trim frees
    page = _open_chat(browser.new_context(viewport={"width": 900, "height": 900}), live_server.url)
    page.click("#settings-toggle")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.click("#settings-toggle")
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)["messages"])
            if r.url.endswith("/v1/chat/completions") else None)
    stats = []
    for i in range(turns):
        _ask(page, f"Question {i}: the parsers?")
        assert page.text_content("#error") == "", page.text_content("#error")
        stats.append(page.text_content("#stats"))
    assert len(bodies) == turns  # not one refusal: the page's own count kept every prompt within the context
    for messages in bodies:
        assert _prompt_tokens(tiny_checkpoint, messages) + max_tokens <= 512
    trims = [i for i in range(1, turns) if bodies[i][0] != bodies[i - 1][0]]
    assert trims, "the conversation never outgrew the context: make the turns longer"
    extends = [i for i in range(trims[0] + 1, turns) if i not in trims]
    assert len(extends) >= len(trims), (trims, extends)  # most turns after a trim keep the start
    for i in extends:
        assert bodies[i][:len(bodies[i - 1])] == bodies[i - 1]
        assert re.search(r"· \d+ prompt tokens cached$", stats[i]), stats[i]
    left_out = 2 * (turns - 1 - len(bodies[-1]) // 2)  # messages shown but not sent in the last request
    assert page.locator(".msg.forgotten").count() == left_out > 0
    assert page.locator(".msg").count() == 2 * turns
    divider = page.locator(".divider")
    assert divider.count() == 1 and "no longer fit in the model's context (512 tokens)" in divider.text_content()
    # The divider sits right above the first message still sent.
    assert page.evaluate("document.querySelector('.divider').nextElementSibling.classList.contains('forgotten')") \
        is False
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("document.querySelector('.divider').scrollIntoView({block: 'center'})")
    page.screenshot(path=str(ARTIFACTS / "web_chat_long.png"))

    # Guessed too low: a system message set now is in no count the page has (~350 tokens of the tiny BPE). The
    # server refuses; the page leaves out one more turn at each refusal and asks again, until it fits.
    system = "The parser reads the file. " * 25
    page.click("#settings-toggle")
    page.fill("#system", system)
    page.click("#settings-toggle")
    sent = len(bodies)
    _ask(page, "And now?")
    assert page.text_content("#error") == ""
    assert len(bodies) > sent + 1  # refused at least once, then sent with fewer turns
    assert len(bodies[-1]) < len(bodies[sent]) and bodies[-1][0] == {"role": "system", "content": system}
    assert _prompt_tokens(tiny_checkpoint, bodies[-1]) <= 511

    # Too long with no turn left to leave out (the system message and this question): refused, the text comes
    # back, and the turns left out for it are sent again.
    forgotten = page.locator(".msg.forgotten").count()
    _ask(page, "é" * 100)
    assert "prompt has" in page.text_content("#error")
    assert page.input_value("#prompt") == "é" * 100
    assert page.locator(".msg.forgotten").count() == forgotten
    assert page.locator(".msg").count() == 2 * turns + 2
    page.fill("#prompt", "")
    _ask(page, "And a short one.")
    assert page.text_content("#error") == ""
    assert page.script_errors == []
