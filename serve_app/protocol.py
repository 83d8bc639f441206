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
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_STOP_STRINGS = 4
MAX_CHOICES = 8  # n
MAX_TOP_LOGPROBS = 20  # chat top_logprobs (completions: 5, as OpenAI)
MAX_COMPLETION_LOGPROBS = 5
MAX_LOGIT_BIAS_ENTRIES = 300
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


def check_kinds(values: Any, allowed: tuple[str, ...], where: str, default: str = "") -> None:
    """For a list of typed parts (`{"type": ...}`), a clear error naming the first part whose
    type is not one of `allowed` (before pydantic tries every union branch on it)."""
    if not isinstance(values, list):
        return
    for index, value in enumerate(values):
        kind = value.get("type", default) if isinstance(value, dict) else default
        if kind not in allowed:
            raise ValueError(
                f"{where}[{index}]: type {kind!r} is not supported; supported: {', '.join(allowed)}"
            )


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


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Request):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)  # assistant
    tool_call_id: str | None = None  # tool

    @model_validator(mode="after")
    def _tool_fields_by_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="extension (vLLM): constrain the output to json, regex, choice or grammar"
    )

    @field_validator("max_tokens", "top_k", "seed", "n", mode="before")
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
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} logit_bias entries are allowed")
        for key, value in bias.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key[:20]!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return bias

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    @field_validator("structured_outputs")
    @classmethod
    def _one_constraint(
        cls, outputs: StructuredOutputs | None, info: ValidationInfo
    ) -> StructuredOutputs | None:
        response_format = info.data.get("response_format")
        if outputs is not None and response_format is not None and response_format.type != "text":
            raise ValueError("set either response_format or structured_outputs, not both")
        return outputs

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class JSONSchemaFormat(_Request):
    name: str = Field("response", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError("json_schema is only allowed when type is 'json_schema'")
        return self


class StructuredOutputs(_Request):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar (Lark)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [v for v in (self.json_, self.regex, self.choice, self.grammar) if v is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of json, regex, choice, grammar")
        return self


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str = Field(min_length=1)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("max_completion_tokens", "top_logprobs", mode="before")
    @classmethod
    def _integral_max_completion_tokens(cls, value: Any) -> Any:
        return _integral(value)

    # Field validators (not model ones) so the 400 names the field: fields validate in
    # declaration order, so info.data holds the ones declared before.
    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs: true")
        return top

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[Tool] | None, info: ValidationInfo) -> list[Tool] | None:
        names = {tool.function.name for tool in tools or []}
        if len(names) < len(tools or []):
            raise ValueError("function names must be unique")
        response_format = info.data.get("response_format")
        if tools and response_format is not None and response_format.type != "text":
            raise ValueError("tools cannot be combined with a response_format other than text")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        names = {tool.function.name for tool in info.data.get("tools") or []}
        if choice is not None and choice != "none" and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        return choice

    def num_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _merge_max_tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: OnlyOne | None = None
    suffix: None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("logprobs", mode="before")
    @classmethod
    def _integral_logprobs(cls, value: Any) -> Any:
        return _integral(value)

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, logprobs: int | None, info: ValidationInfo) -> int | None:
        if logprobs is not None and info.data.get("echo"):
            raise ValueError("logprobs with echo (the prompt's own logprobs) is not supported")
        return logprobs

    def num_logprobs(self) -> int | None:
        return self.logprobs

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


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the model's chat template."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True  # prompt: the tokenizer's BOS/EOS as for a completion

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("set exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    model: str = Field(min_length=1)
    tokens: list[int] = Field(max_length=1_000_000)

    @field_validator("tokens", mode="before")
    @classmethod
    def _integral_tokens(cls, tokens: Any) -> Any:
        return [_integral(t) for t in tokens] if isinstance(tokens, list) else tokens


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


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # of prompt_tokens, taken from the model's prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def cached_tokens(usage: dict[str, Any]) -> int:
    """The prompt tokens a chat usage object (as JSON) says came from the prefix cache."""
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "serve-app"
    kind: str
    capabilities: list[str]
    context_length: int | None = None
    status: Literal["ready", "idle", "loading", "failed"] = "ready"
