"""Shared helpers for the chat-page tests: model ids, fake SSE streams in the server's format,
polling, and the probe that shows whether injected markup ran or survived in the DOM."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from playwright.sync_api import Route

CHAT_MODEL = "smollm2-135m-instruct"
BASE_MODEL = "gemma-3-270m"
EMBEDDING_MODEL = "all-minilm-l6-v2"
XSS_PAYLOAD = (
    'Here you go: <img src=x onerror="window.__xss=1"> and '
    '<script>window.__xss=1</script> and <a href="javascript:window.__xss=1">link</a> '
    'and <svg onload="window.__xss=1"></svg>\n\n```html\n<script>alert(1)</script>\n```'
)

# Counts what would show that injected markup ran or survived in the DOM.
XSS_PROBE_JS = """
(root) => ({
  xss: window.__xss,
  scripts: root.querySelectorAll('script').length,
  handlers: [...root.querySelectorAll('*')].filter(
    (el) => [...el.attributes].some((a) => a.name.startsWith('on'))).length,
  jsLinks: [...root.querySelectorAll('[href]')].filter(
    (el) => /^\\s*javascript:/i.test(el.getAttribute('href'))).length,
  svgs: root.querySelectorAll('svg').length,
})
"""


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # only ever 127.0.0.1
        return json.loads(response.read())


def wait_for(predicate: Any, timeout: float, interval: float = 0.25) -> Any:
    """Polls predicate() until it is truthy; returns its value or fails with the last one."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def fake_chat_stream(text: str, model: str = CHAT_MODEL) -> str:
    """A chat SSE body in the server's format, carrying `text` as the reply."""
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model}
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    usage = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}
    chunks.append({**base, "choices": [], "usage": usage})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def fulfill_sse(route: Route, body: str) -> None:
    route.fulfill(
        status=200,
        headers={"Content-Type": "text/event-stream", "X-Request-Id": "fake-request"},
        body=body,
    )
