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
