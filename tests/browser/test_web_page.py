"""The web page in a real browser: headless Chromium (Debian's package) driven by Playwright.

CI installs ``chromium`` with apt (see .ci/run); without /usr/bin/chromium the tests skip
and say so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server

# threads=1: these tests check behaviour, not speed, and one llama.cpp thread never stalls
# waiting for a second one when other work shares the CPU (many threads can be 20x slower then).

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium: apt-get install chromium",
    ),
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    with running_server(
        ServerSettings(
            threads=1, home=tmp_path_factory.mktemp("home"), parallel=2, max_tokens_limit=2000
        )
    ) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, base_url):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base_url + "/")
    page.wait_for_selector("#health[data-status='ok']", timeout=60_000)
    page.wait_for_selector("#model option", state="attached")
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_chat_reply_streams_in_and_is_kept_after_reload(page):
    assert page.locator("#model").input_value() == "smollm2-135m-instruct"
    page.fill("#max_tokens", "48")
    page.fill("#temperature", "0")
    page.fill("#prompt", "Name three colours.")
    page.click("#send")
    # Part of the reply is on screen while it is still being written: it streams.
    page.wait_for_function(
        """() => {
            const li = document.querySelector('#messages li.assistant');
            return li && li.classList.contains('streaming') && li.textContent.length > 0;
        }""",
        polling="raf",
        timeout=120_000,
    )
    page.wait_for_selector("#send:enabled", timeout=120_000)
    reply = page.locator("#messages li.assistant .text").inner_text()
    assert reply.strip()
    assert page.locator("#stop").is_disabled()
    stats = page.locator("#stats").inner_text()
    assert "time to first token: –" not in stats and "tokens/s" in stats

    saved = json.loads(page.evaluate("localStorage.getItem('llmlab.chat.v1')"))
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][1]["content"] == reply

    page.reload()
    page.wait_for_selector("#messages li.assistant")
    assert page.locator("#messages li.user .text").inner_text() == "Name three colours."
    assert page.locator("#messages li.assistant .text").inner_text() == reply


def test_stop_button_ends_the_reply_and_frees_the_server(page, base_url):
    page.fill("#max_tokens", "1500")
    page.fill("#prompt", "Write a very long story about the sea.")
    page.click("#send")
    page.wait_for_function(
        "() => (document.querySelector('#messages li.assistant .text') || {}).textContent?.length > 0",
        timeout=120_000,
    )
    page.click("#stop")
    page.wait_for_selector("#send:enabled")
    assert page.locator("#messages li.assistant small").inner_text() == "(stopped)"
    deadline = time.monotonic() + 10
    while httpx.get(f"{base_url}/health").json()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{base_url}/health").json()["busy_slots"] == 0


def test_documents_tab_uploads_and_answers_with_sources(page, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# Opening hours\n\nThe workshop opens at 9 o'clock on Saturdays.\n")
    page.click("#tab-docs")
    page.fill("#collection", "browser-test")
    page.set_input_files("#files", str(notes))
    page.click("#upload")
    page.wait_for_selector("#file-list li", timeout=120_000)
    assert "notes.md" in page.locator("#file-list").inner_text()
    page.fill("#question", "When does the workshop open on Saturdays?")
    page.click("#ask")
    page.wait_for_selector("#sources li", timeout=120_000)
    assert page.locator("#answer").inner_text().strip()
    assert "notes.md" in page.locator("#sources li strong").first.inner_text()
