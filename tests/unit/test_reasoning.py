"""The reasoning split (`reasoning_parser: think_tags`): the incremental splitter, the option's
validation per kind, the replica's cut of real engine deltas, and the chunks and bodies the
ingress builds from them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.llm_server import LLMServer
from serve_app.config import EngineOptions, ModelConfig
from serve_app.engine.types import Constraint, FinishReason, RequestOutput, SamplingParams
from serve_app.openai_adapter import Admitted, ChoiceOutput, GenerateCall
from serve_app.reasoning import ThinkTagSplitter, reasoning_splitter
from serve_app.response_builder import ResponseBuilder, ResponseIds
from serve_app.response_types import ChatCompletionChunk, ChatCompletionResponse
from tests.unit.conftest import tiny_model_config

ANSWER = "pre <think>let me see</think>the answer"


def run(pieces: list[str]) -> tuple[list[str], list[str]]:
    """Feeds `pieces` then flushes; returns every (reasoning, content) delta, as two lists."""
    splitter = ThinkTagSplitter()
    deltas = [splitter.feed(piece) for piece in pieces] + [splitter.flush()]
    return [r for r, _ in deltas], [c for _, c in deltas]


# ---- the splitter ----------------------------------------------------------------------


@pytest.mark.parametrize("cut", range(len(ANSWER) + 1))
def test_two_deltas_cut_anywhere_split_the_same(cut: int) -> None:
    reasoning, content = run([ANSWER[:cut], ANSWER[cut:]])
    assert "".join(reasoning) == "let me see"
    assert "".join(content) == "pre the answer"
    assert not any("<" in delta or ">" in delta for delta in reasoning + content)


@pytest.mark.parametrize("first", range(1, len(ANSWER) - 1))
def test_three_deltas_cut_anywhere_split_the_same(first: int) -> None:
    for second in range(first, len(ANSWER)):
        pieces = [ANSWER[:first], ANSWER[first:second], ANSWER[second:]]
        reasoning, content = run(pieces)
        assert ("".join(reasoning), "".join(content)) == ("let me see", "pre the answer")
        assert not any("<" in delta for delta in reasoning + content)


def test_one_character_at_a_time() -> None:
    reasoning, content = run(list(ANSWER))
    assert ("".join(reasoning), "".join(content)) == ("let me see", "pre the answer")


def test_a_partial_tag_is_held_back_until_the_next_delta_decides() -> None:
    splitter = ThinkTagSplitter()
    assert splitter.feed("Hi <thi") == ("", "Hi ")  # "<thi" reaches neither part yet
    assert splitter.feed("nk>why</th") == ("why", "")
    assert splitter.feed("ink>ok") == ("", "ok")
    assert splitter.flush() == ("", "")


def test_text_that_only_looks_like_a_tag_start_comes_out_as_it_was() -> None:
    splitter = ThinkTagSplitter()
    assert splitter.feed("a <t") == ("", "a ")
    assert splitter.feed("able> b <") == ("", "<table> b ")
    assert splitter.flush() == ("", "<")  # the end of the stream releases the held text


def test_a_stream_that_ends_inside_reasoning_leaves_it_all_in_reasoning() -> None:
    reasoning, content = run(["<think>still ", "thinking </thi"])
    assert "".join(reasoning) == "still thinking </thi"
    assert "".join(content) == ""


def test_no_tags_is_all_content_and_a_second_think_after_the_end_stays_content() -> None:
    assert run(["plain ", "answer"]) == (["", "", ""], ["plain ", "answer", ""])
    reasoning, content = run(["<think>a</think>b <think>c</think>"])
    assert ("".join(reasoning), "".join(content)) == ("a", "b <think>c</think>")


def test_split_of_engine_outputs_flushes_on_the_last_one() -> None:
    splitter = ThinkTagSplitter()
    first = splitter.split(RequestOutput("r", "<think>hm</thi", 3, 4))
    assert (first.reasoning, first.text) == ("hm", "")
    last = splitter.split(RequestOutput("r", "nk>yes <", 3, 7, FinishReason.STOP))
    assert (last.reasoning, last.text, last.finish_reason) == ("", "yes <", "stop")
    assert reasoning_splitter(None) is None


# ---- the option ------------------------------------------------------------------------


def test_an_llm_takes_the_option_and_an_embedding_model_refuses_it() -> None:
    chat = ModelConfig(
        id="c", kind="chat", source="/m", engine=EngineOptions(reasoning_parser="think_tags")
    )
    assert ModelConfig.model_validate(chat.model_dump()).engine.reasoning_parser == "think_tags"
    with pytest.raises(ValidationError, match="reasoning_parser apply to LLMs"):
        ModelConfig.model_validate(
            {"id": "e", "kind": "embedding", "source": "/m"}
            | {"engine": {"reasoning_parser": "think_tags"}}
        )
    with pytest.raises(ValidationError, match="think_tags"):
        EngineOptions.model_validate({"reasoning_parser": "deepseek_r1"})
    embedding = ModelConfig(id="e", kind="embedding", source="/m")
    assert "reasoning_parser" not in embedding.model_dump()["engine"]


# ---- the replica, on real engine deltas --------------------------------------------------

THINK_THEN_ANSWER = "<think>[a-z]{3,8}</think>[a-z]{3,8}"


def reasoning_server(tiny_model_dir: Path, tmp_path: Path) -> Any:
    config = tiny_model_config(tiny_model_dir, reasoning_parser="think_tags")
    server_class: Any = LLMServer.func_or_class
    return server_class(config.model_dump(mode="json"), str(tmp_path))


def constrained_call(endpoint: str = "chat", num_choices: int = 1) -> GenerateCall:
    sampling = SamplingParams(
        temperature=0.0, max_tokens=40, constraint=Constraint("regex", THINK_THEN_ANSWER)
    )
    return GenerateCall(
        request_id="think",
        endpoint=endpoint,  # type: ignore[arg-type]
        sampling=sampling,
        messages=[{"role": "user", "content": "hello"}] if endpoint == "chat" else [],
        prompt="hello" if endpoint == "completions" else "",
        num_choices=num_choices,
    )


async def test_the_replica_cuts_chat_deltas_and_leaves_completions_raw(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = reasoning_server(tiny_model_dir, tmp_path)
    try:
        chat = [e async for e in server.generate(constrained_call())]
        assert isinstance(chat[0], Admitted) and chat[-1].is_finished
        outputs: list[RequestOutput] = chat[1:]
        reasoning = "".join(o.reasoning for o in outputs)
        content = "".join(o.text for o in outputs)
        assert re.fullmatch("[a-z]{3,8}", reasoning) and re.fullmatch("[a-z]{3,8}", content)

        raw = [e async for e in server.generate(constrained_call("completions"))][1:]
        assert re.fullmatch(THINK_THEN_ANSWER, "".join(o.text for o in raw))
        assert all(o.reasoning == "" for o in raw)
    finally:
        server.engine.shutdown()


async def test_each_of_n_choices_has_its_own_split(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = reasoning_server(tiny_model_dir, tmp_path)
    try:
        events = [e async for e in server.generate(constrained_call(num_choices=2))][1:]
        for index in (0, 1):
            outputs = [e.output for e in events if isinstance(e, ChoiceOutput) and e.index == index]
            assert re.fullmatch("[a-z]{3,8}", "".join(o.reasoning for o in outputs))
            assert re.fullmatch("[a-z]{3,8}", "".join(o.text for o in outputs))
    finally:
        server.engine.shutdown()


# ---- the ingress's chunks and bodies ----------------------------------------------------


def delta(reasoning: str, text: str, num: int, reason: FinishReason | None = None) -> RequestOutput:
    return RequestOutput("r", text, 5, num, reason, reasoning=reasoning)


def test_reasoning_streams_as_its_own_deltas_and_ends_in_the_message() -> None:
    builder = ResponseBuilder(ResponseIds("r", "m", "chat", created=1), 5)
    thinking = builder.add(0, delta("hm, ", "", 1))
    more = builder.add(0, delta("yes", "", 2))
    held = builder.add(0, delta("", "", 3))  # the replica held a partial tag back
    answer = builder.add(0, delta("", "Yes.", 5, FinishReason.STOP))
    assert held is None
    sent = [chunk for chunk in (thinking, more, answer) if chunk is not None]
    assert [chunk["choices"][0]["delta"] for chunk in sent] == [
        {"reasoning_content": "hm, "},
        {"reasoning_content": "yes"},
        {"content": "Yes."},
    ]
    assert sent[-1]["choices"][0]["finish_reason"] == "stop"
    for chunk in sent:
        ChatCompletionChunk.model_validate(chunk)
    body = builder.response()
    ChatCompletionResponse.model_validate(body)
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Yes.",
        "reasoning_content": "hm, yes",
    }


def test_choices_keep_their_own_reasoning_and_none_sends_no_field() -> None:
    builder = ResponseBuilder(ResponseIds("r", "m", "chat", created=1), 5, 2)
    builder.add(0, delta("a", "x", 2, FinishReason.STOP))
    chunk = builder.add(1, delta("", "y", 1, FinishReason.STOP))
    assert chunk is not None and "reasoning_content" not in chunk["choices"][0]["delta"]
    first, second = (choice["message"] for choice in builder.response()["choices"])
    assert first == {"role": "assistant", "content": "x", "reasoning_content": "a"}
    assert second == {"role": "assistant", "content": "y"}


def test_reasoning_then_a_tool_call_keeps_both_out_of_content() -> None:
    builder = ResponseBuilder(ResponseIds("r", "m", "chat", created=1), 5, has_tools=True)
    call = json.dumps({"tool_calls": [{"name": "f", "arguments": {"x": 1}}]})
    builder.add(0, delta("need f", "", 2))
    builder.add(0, delta("", call, 9, FinishReason.STOP))
    message = builder.response()["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"] == "need f"
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
