"""Fixtures for the chat-page tests: Debian's Chromium driven by Playwright, one fresh browser
context (so fresh localStorage) per test, pointed at the real service from `service_url`.

The browser is /usr/bin/chromium (scripts/install_browser.sh); Playwright's own browser
download does not work here, so `playwright install` is never needed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("SERVE_APP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "test-output" / "browser"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope, not session: Playwright's sync API keeps an event loop running in this
    # thread while it is open, and pytest-asyncio cannot run async tests until it closes.
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install_browser.sh", pytrace=False)
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _new_page(browser: Any, request: pytest.FixtureRequest, **context_options: Any) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, **context_options)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.page_errors = []  # uncaught exceptions in the page fail the test at teardown
    page.on("pageerror", lambda exc: page.page_errors.append(str(exc)))
    return page


def _finish_page(page: Any, request: pytest.FixtureRequest) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    try:
        page.screenshot(path=str(SCREENSHOT_DIR / f"{name}.png"), full_page=True)
    finally:
        page.context.close()
    assert not page.page_errors, f"uncaught errors in the page: {page.page_errors}"


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    page = _new_page(browser, request)
    yield page
    _finish_page(page, request)


@pytest.fixture
def page_without_csp(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A page whose Content-Security-Policy is ignored, so only sanitising can stop XSS."""
    page = _new_page(browser, request, bypass_csp=True)
    yield page
    _finish_page(page, request)


class ChatPage:
    """Drives the chat page through its data-testid hooks."""

    def __init__(self, page: Any, base_url: str) -> None:
        self.page = page
        self.base_url = base_url.rstrip("/")

    def open(self) -> ChatPage:
        self.page.goto(self.base_url + "/")
        self.page.wait_for_selector("[data-testid=app][data-state=ready]")
        return self

    def use_model(self, model_id: str) -> None:
        self.page.get_by_test_id("model-select").select_option(model_id)

    def set_max_tokens(self, n: int) -> None:
        self.open_settings()
        self.page.get_by_test_id("max-tokens").fill(str(n))
        self.page.get_by_test_id("max-tokens").dispatch_event("change")

    def set_temperature(self, value: float) -> None:
        self.open_settings()
        slider = self.page.get_by_test_id("temperature")
        slider.evaluate(
            "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input')); }", value
        )

    def open_settings(self) -> None:
        if self.page.get_by_test_id("settings").is_hidden():
            self.page.get_by_test_id("settings-toggle").click()

    def type_and_send(self, text: str) -> None:
        prompt = self.page.get_by_test_id("prompt")
        prompt.fill(text)
        prompt.press("Enter")

    def assistant_messages(self) -> Any:
        return self.page.locator("[data-testid=message][data-role=assistant]")

    def last_reply(self) -> Any:
        return self.assistant_messages().last

    def wait_reply_done(self, timeout_ms: int = 120_000) -> Any:
        reply = self.last_reply()
        playwright_sync.expect(reply).to_have_attribute(
            "data-status", re.compile("^(done|stopped|error)$"), timeout=timeout_ms
        )
        return reply

    def reply_text(self, reply: Any | None = None) -> str:
        reply = reply if reply is not None else self.last_reply()
        return str(reply.get_by_test_id("message-content").inner_text())


@pytest.fixture
def chat(page: Any, service_url: str) -> ChatPage:
    return ChatPage(page, service_url).open()
