"""The chat page's playground features in headless Chromium against the real service: compare
mode (several models streaming side by side, Stop per column), edit and branches, export and
import, code highlighting and copy, structured output and tools, the request inspector and its
curl command, model status, and XSS safety of imported files and highlighted code.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Route, expect

from tests.browser.conftest import SCREENSHOT_DIR
from tests.browser.pagekit import (
    BASE_MODEL,
    CHAT_MODEL,
    XSS_PROBE_JS,
    fake_chat_stream,
    fulfill_sse,
    get_json,
    wait_for,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CONVERSATIONS_KEY = "serve-app.conversations.v1"
NO_XSS = {"xss": None, "scripts": 0, "handlers": 0, "jsLinks": 0, "svgs": 0}

# Samples every compare column every few ms until none is streaming (or the time is up).
SAMPLE_COLUMNS_JS = """
async ([intervalMs, timeoutMs]) => {
  const samples = [];
  const start = performance.now();
  return await new Promise((resolve) => {
    const tick = () => {
      const columns = [...document.querySelectorAll('[data-testid=compare-column]')];
      const row = columns.map((c) => {
        const reply = c.querySelector('[data-role=assistant]');
        return {model: c.dataset.model, status: reply.dataset.status,
                text: reply.querySelector('[data-testid=message-content]').innerText};
      });
      samples.push({t: Math.round(performance.now() - start), row});
      const busy = row.some((r) => r.status === 'streaming');
      if ((row.length && !busy) || performance.now() - start > timeoutMs) return resolve(samples);
      setTimeout(tick, intervalMs);
    };
    tick();
  });
}
"""


def message(msg_id: str, parent: str | None, role: str, content: str, **extra: Any) -> Any:
    return {"id": msg_id, "parentId": parent, "role": role, "content": content, **extra}


def conversation(conv_id: str, title: str, messages: list[Any], **extra: Any) -> Any:
    return {
        "id": conv_id,
        "title": title,
        "createdAt": 1_700_000_000_000,
        "updatedAt": 1_700_000_000_000,
        "messages": messages,
        **extra,
    }


def import_file(page: Any, tmp_path: Path, conversations: list[Any], name: str = "in.json") -> None:
    path = tmp_path / name
    path.write_text(
        json.dumps(
            {"format": "serve-app.conversations", "version": 2, "conversations": conversations}
        )
    )
    page.get_by_test_id("import-file").set_input_files(str(path))


def stored_conversations(page: Any) -> list[Any]:
    return json.loads(page.evaluate(f"localStorage.getItem('{CONVERSATIONS_KEY}')") or "[]")


def start_compare(chat: Any, models: list[str], prompt: str) -> None:
    page = chat.page
    page.get_by_test_id("compare-toggle").click()
    expect(page.get_by_test_id("compare-panel")).to_be_visible()
    for model_id in models:
        page.locator(f"[data-testid=compare-model][value='{model_id}']").check()
    chat.type_and_send(prompt)
    expect(page.get_by_test_id("compare-column")).to_have_count(len(models))


def timeline(timed_samples: list[Any]) -> dict[str, Any]:
    """Per compare column, the ms (from the send) of its first streamed text and of its end."""
    marks: dict[str, dict[str, int]] = {}
    for sample in timed_samples:
        for r in sample["row"]:
            mark = marks.setdefault(r["model"], {})
            if r["status"] == "streaming" and r["text"]:
                mark.setdefault("first_text_ms", sample["t"])
            if r["status"] != "streaming":
                mark.setdefault("ended_ms", sample["t"])
    return marks


def column(page: Any, model_id: str) -> Any:
    return page.locator(f"[data-testid=compare-column][data-model='{model_id}']")


def column_reply(page: Any, model_id: str) -> Any:
    return column(page, model_id).locator("[data-role=assistant]")


# ---- compare mode -------------------------------------------------------------------------


# Gemma (a base model, greedy) answers "Write a long story about a dragon." with 10 tokens
# (" I'm not a dragon."); in one CI run all of them reached the page between two 15 ms samples.
# To this prompt it writes until max_tokens, so both columns stream for seconds.
COMPARE_PROMPT = "Write a story about a dragon, at least three paragraphs."


def test_compare_streams_both_columns_at_once(chat: Any) -> None:
    page = chat.page
    chat.set_temperature(0)
    # Long enough that SmolLM2 (~30 tok/s) still streams when Gemma's first token comes: with
    # both engines prefilling on 2 cores, Gemma's TTFT reached 0.5-2.6 s, SmolLM2's 48 tokens
    # took 1.1-1.6 s.
    chat.set_max_tokens(128)
    paths: dict[str, Any] = {}
    page.on(
        "request",
        lambda r: (
            paths.__setitem__(json.loads(r.post_data)["model"], (r.url, r.post_data))
            if "/v1/" in r.url and r.method == "POST"
            else None
        ),
    )
    page.get_by_test_id("settings-toggle").click()  # closed again, for the screenshot
    start_compare(chat, [CHAT_MODEL, BASE_MODEL], COMPARE_PROMPT)
    timed_samples = page.evaluate(SAMPLE_COLUMNS_JS, [15, 180_000])
    samples = [sample["row"] for sample in timed_samples]
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "compare_mode.png"))  # README's picture

    final = {r["model"]: r for r in samples[-1]}
    assert set(final) == {CHAT_MODEL, BASE_MODEL}
    assert all(r["status"] == "done" for r in final.values()), final
    for model_id in (CHAT_MODEL, BASE_MODEL):
        texts = {
            r["text"]
            for row in samples
            for r in row
            if r["model"] == model_id and r["status"] == "streaming" and r["text"]
        }
        assert len(texts) >= 3, f"{model_id}'s column did not grow while streaming: {texts}"
    both_growing = [
        row for row in samples if all(r["status"] == "streaming" and r["text"] for r in row)
    ]
    marks = timeline(timed_samples)
    assert both_growing, f"the two columns never streamed at the same time: {marks}"

    # SmolLM2 chats; Gemma is a base model: /v1/completions with a transcript prompt.
    chat_url, chat_body = paths[CHAT_MODEL]
    base_url, base_body = paths[BASE_MODEL]
    assert chat_url.endswith("/v1/chat/completions") and "messages" in json.loads(chat_body)
    assert base_url.endswith("/v1/completions") and "prompt" in json.loads(base_body)
    for model_id in (CHAT_MODEL, BASE_MODEL):
        meta = column_reply(page, model_id).get_by_test_id("message-meta").inner_text()
        assert re.search(r"TTFT \d+ ms", meta) and re.search(r"\d+ tokens", meta), meta
        assert "tok/s" in meta, meta

    # Carry one column on as a normal conversation with that model.
    column(page, BASE_MODEL).get_by_test_id("continue-with").click()
    expect(page.get_by_test_id("compare-column")).to_have_count(0)
    expect(page.get_by_test_id("model-select")).to_have_value(BASE_MODEL)
    expect(chat.last_reply()).to_contain_text(BASE_MODEL)
    with page.expect_request("**/v1/completions") as follow_up:
        chat.type_and_send("And then?")
    prompt = json.loads(follow_up.value.post_data)["prompt"]
    assert COMPARE_PROMPT in prompt and prompt.endswith("And then?\nAssistant:")
    chat.wait_reply_done()


def test_stop_in_one_column_cancels_only_that_request(chat: Any, service_url: str) -> None:
    page = chat.page
    stats = {m: f"{service_url}/admin/models/{m}/stats" for m in (CHAT_MODEL, BASE_MODEL)}
    aborted_before = {m: get_json(url)["num_aborted"] for m, url in stats.items()}
    # Long enough that SmolLM2 still streams once Gemma (slower, and last to start its first
    # token) has shown some text: at 120 tokens one CI run saw SmolLM2 done first. The test
    # stops SmolLM2, and Gemma at the end if it still streams.
    chat.set_max_tokens(400)
    start_compare(chat, [CHAT_MODEL, BASE_MODEL], "Write a long story about a dragon")
    page.wait_for_function(
        """() => [...document.querySelectorAll(
                      '[data-testid=compare-column] [data-role=assistant]')]
            .every((r) => r.querySelector('[data-testid=message-content]').innerText.length > 20
                          || r.dataset.status !== 'streaming')""",
        timeout=90_000,
    )
    smol, gemma = column_reply(page, CHAT_MODEL), column_reply(page, BASE_MODEL)
    assert smol.get_attribute("data-status") == "streaming", "SmolLM2 finished before Stop"
    column(page, CHAT_MODEL).get_by_test_id("column-stop").click()

    expect(smol).to_have_attribute("data-status", "stopped", timeout=10_000)
    assert gemma.get_attribute("data-status") != "stopped"
    assert request_ids(smol) and not request_ids(smol) & request_ids(gemma)

    def smol_cancelled() -> bool:
        now = get_json(stats[CHAT_MODEL])
        still_running = request_ids(smol) & set(now["running_ids"])
        return now["num_aborted"] > aborted_before[CHAT_MODEL] and not still_running

    wait_for(smol_cancelled, timeout=30)
    expect(smol.get_by_test_id("message-meta")).to_contain_text("stopped")

    # Gemma's request goes on: not aborted on the server, still running there or done.
    gemma_stats = get_json(stats[BASE_MODEL])
    assert gemma_stats["num_aborted"] == aborted_before[BASE_MODEL]
    text_then = gemma.get_by_test_id("message-content").inner_text()
    if not request_ids(gemma) & set(gemma_stats["running_ids"]):  # it may just have ended
        expect(gemma).to_have_attribute("data-status", "done", timeout=10_000)
    if gemma.get_attribute("data-status") == "streaming":
        page.wait_for_function(
            """([t]) => { const c = document.querySelector(
                 "[data-testid=compare-column][data-model='gemma-3-270m'] [data-role=assistant]");
               return c.dataset.status !== 'streaming'
                   || c.querySelector('[data-testid=message-content]').innerText.length > t; }""",
            arg=[len(text_then)],
            timeout=60_000,
        )
    assert gemma.get_attribute("data-status") in ("streaming", "done")
    expect(gemma.get_by_test_id("message-meta")).not_to_contain_text("stopped")
    assert get_json(stats[BASE_MODEL])["num_aborted"] == aborted_before[BASE_MODEL]
    if gemma.get_attribute("data-status") == "streaming":  # on a slow machine: end it here
        column(page, BASE_MODEL).get_by_test_id("column-stop").click()
    expect(page.get_by_test_id("send")).to_be_visible(timeout=10_000)


def request_ids(reply: Any) -> set[str]:
    # Ray Serve adds an X-Request-Id of its own beside the app's; fetch joins them with ", ".
    return {part.strip() for part in (reply.get_attribute("data-request-id") or "").split(",")}


# ---- edit, branches, export / import, search ----------------------------------------------


def route_replies(page: Any, replies: list[str]) -> list[Any]:
    """Answers each chat request with the next fake reply; returns the request bodies seen."""
    bodies: list[Any] = []

    def handler(route: Route) -> None:
        bodies.append(json.loads(route.request.post_data))
        fulfill_sse(route, fake_chat_stream(replies[min(len(bodies), len(replies)) - 1]))

    page.route("**/v1/chat/completions", handler)
    return bodies


def shown_texts(page: Any) -> list[str]:
    return page.locator("[data-testid=messages] [data-testid=message-content]").all_inner_texts()


def test_edit_and_regenerate_make_branches_that_survive_reload(chat: Any) -> None:
    page = chat.page
    bodies = route_replies(page, ["Reply A", "Reply B", "Reply C"])
    chat.use_model(CHAT_MODEL)
    chat.type_and_send("first question")
    expect(chat.last_reply()).to_have_attribute("data-status", "done")

    # Edit by keyboard: focus Edit, Enter opens the box, Enter sends.
    page.get_by_test_id("edit").focus()
    page.keyboard.press("Enter")
    page.get_by_test_id("edit-input").fill("second question")
    page.get_by_test_id("edit-input").press("Enter")
    expect(chat.last_reply()).to_contain_text("Reply B")
    expect(chat.last_reply()).to_have_attribute("data-status", "done")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "second question"}]
    assert shown_texts(page) == ["second question", "Reply B"]
    expect(page.locator("[data-role=user] [data-testid=branch-position]")).to_have_text("2 / 2")

    chat.last_reply().get_by_test_id("regenerate").click()
    expect(chat.last_reply()).to_contain_text("Reply C")
    expect(chat.last_reply()).to_have_attribute("data-status", "done")
    expect(chat.last_reply().get_by_test_id("branch-position")).to_have_text("2 / 2")

    page.reload()
    page.wait_for_selector("[data-testid=app][data-state=ready]")
    assert shown_texts(page) == ["second question", "Reply C"]
    chat.last_reply().get_by_test_id("branch-previous").click()
    assert shown_texts(page) == ["second question", "Reply B"]
    page.locator("[data-role=user]").get_by_test_id("branch-previous").click()
    assert shown_texts(page) == ["first question", "Reply A"]
    expect(page.locator("[data-role=user] [data-testid=branch-position]")).to_have_text("1 / 2")

    page.reload()  # the chosen branch is remembered too
    page.wait_for_selector("[data-testid=app][data-state=ready]")
    assert shown_texts(page) == ["first question", "Reply A"]
    page.locator("[data-role=user]").get_by_test_id("branch-next").click()
    assert shown_texts(page) == ["second question", "Reply B"]
    assert len(stored_conversations(page)[0]["messages"]) == 5


def test_export_then_import_restores_conversations_exactly(
    chat: Any, browser: Any, tmp_path: Path
) -> None:
    page = chat.page
    route_replies(page, ["Reply A", "Reply B"])
    chat.type_and_send("first question")
    expect(chat.last_reply()).to_have_attribute("data-status", "done")
    page.get_by_test_id("edit").click()
    page.get_by_test_id("edit-input").fill("second question")
    page.get_by_test_id("edit-save").click()
    expect(chat.last_reply()).to_have_attribute("data-status", "done")
    page.get_by_test_id("new-chat").click()
    chat.type_and_send("another chat")
    expect(chat.last_reply()).to_have_attribute("data-status", "done")

    with page.expect_download() as download_info:
        page.get_by_test_id("export").click()
    exported = json.loads(Path(download_info.value.path()).read_text())
    assert exported["format"] == "serve-app.conversations"
    assert exported["conversations"] == sorted(
        stored_conversations(page), key=lambda c: -c["updatedAt"]
    )
    assert [len(c["messages"]) for c in exported["conversations"]] == [2, 4]

    # Into an empty browser (fresh localStorage): the same data, the same view.
    fresh = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        other = fresh.new_page()
        other.goto(chat.base_url + "/")
        other.wait_for_selector("[data-testid=app][data-state=ready]")
        path = tmp_path / "export.json"
        path.write_text(json.dumps(exported))
        other.get_by_test_id("import-file").set_input_files(str(path))
        expect(other.get_by_test_id("conversation-item")).to_have_count(2)
        restored = sorted(stored_conversations(other), key=lambda c: -c["updatedAt"])
        assert restored == exported["conversations"]
        other.get_by_test_id("conversation-item").nth(1).get_by_test_id("conversation-open").click()
        assert shown_texts(other) == ["second question", "Reply B"]
    finally:
        fresh.close()

    # The same file again here: its ids are taken, so it comes in as copies, nothing is lost.
    path = tmp_path / "again.json"
    path.write_text(json.dumps(exported))
    page.get_by_test_id("import-file").set_input_files(str(path))
    expect(page.get_by_test_id("conversation-item")).to_have_count(4)

    # Search filters titles.
    page.get_by_test_id("conversation-search").fill("ANOTHER")
    expect(page.get_by_test_id("conversation-item")).to_have_count(2)
    expect(page.get_by_test_id("conversation-item").first).to_contain_text("another chat")
    page.get_by_test_id("conversation-search").fill("no such title")
    expect(page.get_by_test_id("conversation-item")).to_have_count(0)
    page.get_by_test_id("conversation-search").fill("")
    expect(page.get_by_test_id("conversation-item")).to_have_count(4)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    page.get_by_test_id("import-file").set_input_files(str(bad))
    expect(page.get_by_test_id("banner")).to_contain_text("Import failed")


# ---- code, structured output, tools, inspector --------------------------------------------

CODE_REPLY = (
    'Here is a function:\n\n```python\ndef greet(name):\n    return f"hi {name}"  # say hi\n```\n\n'
    "and a plain block:\n\n```\nno language <b>here</b>\n```"
)


def test_code_blocks_are_highlighted_and_copyable(chat: Any, tmp_path: Path) -> None:
    page = chat.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=chat.base_url)
    convo = conversation(
        "code-1",
        "Code sample",
        [
            message("u1", None, "user", "show me code"),
            message("a1", "u1", "assistant", CODE_REPLY, model=CHAT_MODEL, status="done"),
        ],
    )
    import_file(page, tmp_path, [convo])
    reply = chat.last_reply()
    python = reply.locator("pre code.hljs.language-python")
    expect(python).to_have_count(1)
    expect(python.locator("span.hljs-keyword").first).to_have_text("def")
    expect(python.locator("span.hljs-string").first).to_contain_text('f"hi')
    expect(python.locator("span.hljs-comment")).to_have_text("# say hi")
    plain = reply.locator("pre code").nth(1)
    expect(plain).to_have_text("no language <b>here</b>")
    expect(plain.locator("b")).to_have_count(0)

    buttons = reply.locator("pre .copy-code")
    expect(buttons).to_have_count(2)
    buttons.first.focus()  # reachable by keyboard, and shown when focused
    expect(buttons.first).to_be_visible()
    page.keyboard.press("Enter")
    expect(buttons.first).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == 'def greet(name):\n    return f"hi {name}"  # say hi'


def test_json_schema_sends_response_format_and_shows_parsed_object(chat: Any) -> None:
    page = chat.page
    bodies = route_replies(page, ['{"city": "Paris", "population": 2100000}'])
    chat.use_model(CHAT_MODEL)
    chat.open_settings()
    schema = {
        "title": "city_facts",
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    page.get_by_test_id("schema-input").fill(json.dumps(schema))
    chat.type_and_send("Facts about Paris as JSON")
    expect(chat.last_reply()).to_have_attribute("data-status", "done")
    assert bodies[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "city_facts", "schema": schema},
    }
    parsed = chat.last_reply().get_by_test_id("parsed-object")
    assert json.loads(parsed.inner_text()) == {"city": "Paris", "population": 2100000}

    page.get_by_test_id("schema-input").fill("{broken")
    chat.type_and_send("again")
    expect(page.get_by_test_id("banner")).to_contain_text("JSON schema is not valid JSON")
    assert len(bodies) == 1


def tool_call_stream() -> str:
    base = {"id": "chatcmpl-tools", "object": "chat.completion.chunk", "created": 0}
    fragments = [
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"<b>Paris</b>"}'}},
    ]  # fmt: skip
    chunks = [{**base, "choices": [{"index": 0, "delta": {"tool_calls": [f]}}]} for f in fragments]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_tool_calls_are_shown_as_calls(chat: Any) -> None:
    page = chat.page
    bodies: list[Any] = []

    def handler(route: Route) -> None:
        bodies.append(json.loads(route.request.post_data))
        fulfill_sse(route, tool_call_stream())

    page.route("**/v1/chat/completions", handler)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    chat.open_settings()
    page.get_by_test_id("tools-input").fill(json.dumps(tools))
    chat.type_and_send("Weather in Paris?")
    reply = chat.last_reply()
    expect(reply).to_have_attribute("data-status", "done")
    assert bodies[-1]["tools"] == tools
    call = reply.get_by_test_id("tool-call")
    expect(call).to_have_count(1)
    expect(call).to_have_attribute("data-name", "get_weather")
    args = json.loads(call.get_by_test_id("tool-call-arguments").inner_text())
    assert args == {"city": "<b>Paris</b>"}
    expect(reply.get_by_test_id("message-content")).to_have_text("")
    expect(reply.locator("b")).to_have_count(0)
    expect(reply.get_by_test_id("message-meta")).to_contain_text("tool calls")


def test_copy_as_curl_gets_an_answer(chat: Any) -> None:
    page = chat.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=chat.base_url)
    chat.use_model(CHAT_MODEL)
    chat.set_temperature(0)
    chat.set_max_tokens(8)
    with page.expect_request("**/v1/chat/completions") as request_info:
        chat.type_and_send("Say hello.")
    sent = json.loads(request_info.value.post_data)
    reply = chat.wait_reply_done()
    assert reply.get_attribute("data-status") == "done"

    reply.get_by_test_id("inspect").click()
    dialog = page.get_by_test_id("inspector-dialog")
    expect(dialog).to_be_visible()
    assert json.loads(page.get_by_test_id("inspector-body").inner_text()) == sent
    command = page.get_by_test_id("inspector-curl").inner_text()
    page.get_by_test_id("copy-curl").click()
    assert page.evaluate("navigator.clipboard.readText()") == command
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # Only ever 127.0.0.1, and bounded by the command's own --max-time and a timeout here.
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "curl" and "--max-time" in words
    assert [w for w in words if w.startswith("http")] == [f"{chat.base_url}/v1/chat/completions"]
    assert chat.base_url.startswith("http://127.0.0.1:")
    done = subprocess.run(words, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    events = [line[6:] for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", done.stdout[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip(), done.stdout[-500:]


# ---- model status -------------------------------------------------------------------------


def test_model_status_is_shown_and_idle_models_are_woken(page: Any, service_url: str) -> None:
    statuses = {CHAT_MODEL: "ready", BASE_MODEL: "idle"}

    def models(route: Route) -> None:
        body = route.fetch().json()
        for card in body["data"]:
            if card["id"] in statuses:
                card["status"] = statuses[card["id"]]
            else:
                card.pop("status", None)  # absent: treated as ready
        route.fulfill(json=body)

    loads: list[Any] = []

    def load(route: Route) -> None:
        loads.append((route.request.url, route.request.headers.get("authorization")))
        route.fulfill(status=403, json={"error": {"message": "admin only", "type": "x"}})

    page.route("**/v1/models", models)
    page.route("**/admin/models/*/load", load)
    page.goto(service_url + "/")
    page.evaluate("localStorage.setItem('serve-app.api-key', 'sk-test-admin')")
    page.reload()
    page.wait_for_selector("[data-testid=app][data-state=ready]")
    select = page.get_by_test_id("model-select")
    expect(select.locator(f"option[value='{BASE_MODEL}']")).to_contain_text("(idle)")
    expect(select.locator(f"option[value='{CHAT_MODEL}']")).not_to_contain_text("(")
    select.select_option(CHAT_MODEL)
    expect(page.get_by_test_id("model-status")).to_have_text("ready")
    assert loads == []

    statuses[BASE_MODEL] = "loading"  # what the server says once woken
    # Waiting through Playwright (not time.sleep) lets the route handlers run meanwhile.
    with page.expect_request("**/admin/models/*/load", timeout=10_000):
        select.select_option(BASE_MODEL)
    page.wait_for_function("() => true")  # one round trip: the handler has recorded it
    assert loads == [(f"{service_url}/admin/models/{BASE_MODEL}/load", "Bearer sk-test-admin")]
    expect(select.locator(f"option[value='{BASE_MODEL}']")).to_contain_text("(loading…)")
    expect(page.get_by_test_id("model-status")).to_have_text("loading")
    statuses[BASE_MODEL] = "failed"
    expect(select.locator(f"option[value='{BASE_MODEL}']")).to_contain_text(
        "(failed)", timeout=15_000
    )
    expect(page.get_by_test_id("banner")).to_be_hidden()  # the 403 was ignored quietly


# ---- layout -------------------------------------------------------------------------------


def compare_conversation() -> Any:
    return conversation(
        "cmp-1",
        "Compare at phone width",
        [
            message("u1", None, "user", "Tell me a joke"),
            *[
                message(f"a{i}", "u1", "assistant", f"Joke {i} " * 30, model=m, status="done",
                        compareId="c1")
                for i, m in enumerate([CHAT_MODEL, BASE_MODEL, CHAT_MODEL])
            ],
        ],
        selected={"u1": "group:c1"},
    )  # fmt: skip


def test_compare_columns_fit_a_phone(page: Any, service_url: str, tmp_path: Path) -> None:
    page.set_viewport_size({"width": 375, "height": 740})
    page.goto(service_url + "/")
    page.wait_for_selector("[data-testid=app][data-state=ready]")
    page.get_by_test_id("compare-toggle").click()
    import_file(page, tmp_path, [compare_conversation()])
    columns = page.get_by_test_id("compare-column")
    expect(columns).to_have_count(3)
    boxes = [columns.nth(i).bounding_box() for i in range(3)]
    assert boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"], "columns should stack at 375px"
    overflow = page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= 375, f"page is {overflow}px wide at 375px"
    for testid in ("prompt", "send", "compare-toggle"):
        expect(page.get_by_test_id(testid)).to_be_in_viewport()


# ---- nothing from a file or a code block runs ---------------------------------------------

EVIL = '<img src=x onerror="window.__xss=1"><script>window.__xss=1</script>'
EVIL_CODE = (
    '```html\n<img src=x onerror="window.__xss=1">\n<script>window.__xss=1</script>\n```\n\n'
    '```"><img src=x onerror="window.__xss=1">\ncode\n```\n\n'
    "```javascript\nconst s = '</code><img src=x onerror=window.__xss=1>';\n```\n\n"
    '<pre><code class="hljs" onclick="window.__xss=1">raw</code></pre>'
)


def evil_conversation() -> Any:
    reply = message(
        "a1",
        "u1",
        "assistant",
        EVIL_CODE + "\n\n" + EVIL,
        model=EVIL,
        status="done",
        requestId=EVIL,
        error=EVIL,
        toolCalls=[{"id": "c", "type": "function", "function": {"name": EVIL, "arguments": EVIL}}],
        request={"path": "/v1/chat/completions", "body": {"model": EVIL, "messages": []}},
        onload="window.__xss=1",
    )
    bad_path = message(
        "a2",
        "u1",
        "assistant",
        "other",
        request={"path": "javascript:window.__xss=1", "body": {}},
    )
    return conversation(
        EVIL,
        EVIL,
        [message("u1", None, "user", EVIL), bad_path, reply],
        selected={"u1": "a1"},
    )


def test_imported_json_and_highlighted_code_cannot_run_script(
    page_without_csp: Any, service_url: str, tmp_path: Path
) -> None:
    page = page_without_csp
    page.goto(service_url + "/")
    page.wait_for_selector("[data-testid=app][data-state=ready]")
    html = page.evaluate("async (t) => (await import('/render.js')).renderMarkdown(t)", EVIL_CODE)
    # Markup inside code blocks stays text (escaped); the raw <code onclick> loses its handler.
    assert "<img" not in html and "onclick" not in html and "<script" not in html
    assert 'class="hljs language-html"' in html and 'class="hljs language-javascript"' in html

    import_file(page, tmp_path, [evil_conversation()])
    reply = page.locator("[data-testid=message][data-role=assistant]").last
    expect(reply).to_contain_text("Tool call:")
    expect(reply.locator("pre code.language-html")).to_contain_text("<script>window.__xss=1")
    expect(page.get_by_test_id("conversation-item")).to_contain_text("<img src=x")
    reply.get_by_test_id("inspect").click()
    expect(page.get_by_test_id("inspector-body")).to_contain_text("onerror")
    page.wait_for_timeout(500)  # let an onerror / onload fire if it could
    for root in ("[data-testid=messages]", "[data-testid=inspector-dialog]"):
        assert page.locator(root).evaluate(XSS_PROBE_JS) == NO_XSS, root
    assert page.evaluate("document.querySelectorAll('script:not([type=module])').length") == 0
    page.keyboard.press("Escape")

    stored = stored_conversations(page)[0]
    assert "onload" not in json.dumps(stored)  # unknown fields are dropped on import
    assert all(
        m.get("request", {}).get("path") != "javascript:window.__xss=1" for m in stored["messages"]
    )

    page.reload()
    page.wait_for_selector("[data-testid=message][data-role=assistant]")
    page.wait_for_timeout(500)
    assert page.locator("[data-testid=messages]").evaluate(XSS_PROBE_JS) == NO_XSS
