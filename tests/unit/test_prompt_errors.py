"""Input the chat template or tokenizer refuses is the client's error (400 naming the field),
not the model's (503 model_unavailable with Retry-After)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from serve_app.engine.types import SamplingParams
from serve_app.errors import InvalidRequestError
from serve_app.openai_adapter import GenerateCall, Rejected, prompt_token_ids
from tests.unit.test_llm_server import call, events, make_server

ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
TWO_USER_TURNS = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]


class FailingTokenizer:
    """Encodes nothing: raises what a tokenizer raises on input it cannot take."""

    chat_template = None

    def __call__(self, text: str) -> dict[str, list[int]]:
        raise ValueError("input is not valid for this tokenizer")

    def __len__(self) -> int:
        return 10


def test_a_template_that_raises_is_a_400_naming_messages(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ALTERNATING_TEMPLATE
    with pytest.raises(InvalidRequestError) as info:
        prompt_token_ids(call(messages=TWO_USER_TURNS), tokenizer, max_model_len=512)
    assert info.value.status_code == 400 and info.value.param == "messages"
    assert "roles must alternate" in info.value.message


def test_a_tokenizer_that_raises_is_a_400_naming_prompt() -> None:
    completion = GenerateCall("r1", "completions", SamplingParams(max_tokens=4), prompt="text")
    with pytest.raises(InvalidRequestError) as info:
        prompt_token_ids(completion, FailingTokenizer(), max_model_len=512)
    assert info.value.param == "prompt" and "not valid for this tokenizer" in info.value.message


def test_a_model_without_a_template_still_says_so() -> None:
    with pytest.raises(InvalidRequestError) as info:
        prompt_token_ids(call(), FailingTokenizer(), max_model_len=512)
    assert info.value.code == "chat_not_supported" and info.value.param == "model"


async def test_the_replica_rejects_it_before_any_token(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server: Any = make_server(str(tiny_model_dir), tmp_path)
    server.engine.tokenizer.chat_template = ALTERNATING_TEMPLATE
    try:
        out = await events(server, call(messages=TWO_USER_TURNS))
    finally:
        server.engine.shutdown()
    assert len(out) == 1 and isinstance(out[0], Rejected)
    error = out[0].to_error()
    assert (error.status_code, error.error_type, error.param) == (
        400,
        "invalid_request_error",
        "messages",
    )
    assert "Retry-After" not in error.headers
    assert "roles must alternate" in error.message
