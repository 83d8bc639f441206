"""Pydantic models of the OpenAI wire format: request bodies we accept, responses we send.

Unknown fields are rejected (extra="forbid") so a client never has a setting silently ignored;
known OpenAI fields we do not support are accepted only at their no-op value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

MAX_STOP_STRINGS = 4
MAX_MESSAGES = 1024
MAX_EMBEDDING_INPUTS = 2048
# Below this, sampling is greedy, as in vLLM (_SAMPLING_EPS): logits / 1e-300 overflow to inf,
# softmax turns them into NaN and torch.multinomial fails the whole engine step.
MIN_SAMPLING_TEMPERATURE = 1e-5


def _integral(value: Any) -> Any:
    # JSON has one number type: 5.0 is an integer to JSON Schema (and json.dumps of a float).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _exact_type(kind: type) -> BeforeValidator:
    # A Literal matches by equality even in strict mode: 0 == False, True == 1.
    def check(value: Any) -> Any:
        value = _integral(value) if kind is int else value
        if type(value) is not kind:
            raise ValueError(f"Input should be of type {kind.__name__}")
        return value

    return BeforeValidator(check)


OnlyOne = Annotated[Literal[1], _exact_type(int)]
OnlyFalse = Annotated[Literal[False], _exact_type(bool)]


class _Request(BaseModel):
    # strict: JSON types as documented, no coercion ("5" or 5.0 for an int, 0 for a bool,
    # false for a token id); floats still take integers, as JSON Schema's number does.
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # JSON may escape a lone surrogate ("\ud800"); tokenizers cannot encode it.
        if _has_lone_surrogate(value):
            raise ValueError("text must be valid Unicode: lone surrogates (U+D800-U+DFFF)")
        return value


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(_Request):
    """Fields shared by chat and completions requests."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension (vLLM): 0 disables")
    ignore_eos: bool = Field(False, description="extension (vLLM): generate to max_tokens")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: OnlyOne = 1
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("max_tokens", "top_k", "seed", mode="before")
    @classmethod
    def _integral_numbers(cls, value: Any) -> Any:
        return _integral(value)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if isinstance(stop, list) and any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, temperature: float) -> float:
        return 0.0 if temperature < MIN_SAMPLING_TEMPERATURE else temperature

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ResponseFormat(_Request):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: OnlyFalse | None = None
    top_logprobs: None = None
    response_format: ResponseFormat | None = None
    tools: None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("max_completion_tokens", mode="before")
    @classmethod
    def _integral_max_completion_tokens(cls, value: Any) -> Any:
        return _integral(value)

    @model_validator(mode="after")
    def _merge_max_tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: OnlyFalse = False
    logprobs: None = None
    best_of: OnlyOne | None = None
    suffix: None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt", mode="before")
    @classmethod
    def _integral_token_ids(cls, prompt: Any) -> Any:
        if isinstance(prompt, list):
            return [
                [_integral(i) for i in p] if isinstance(p, list) else _integral(p) for p in prompt
            ]
        return prompt

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            prompt = prompt[0]
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("dimensions", mode="before")
    @classmethod
    def _integral_dimensions(cls, value: Any) -> Any:
        return _integral(value)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if any(not t for t in texts):
            raise ValueError("input must not contain empty strings")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the API answers: {"error": {message, type, param, code}}."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "serve-app"
    kind: str
    capabilities: list[str]
    context_length: int | None = None
    status: Literal["ready", "unavailable"] = "ready"
