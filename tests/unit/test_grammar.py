"""Constrained decoding on the tiny Llama: each row's output matches its own grammar, rows
without one decode as if alone, bad grammars and slow compiles are refused."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from pathlib import Path

import jsonschema
import pytest

from serve_app.engine.grammar import GrammarError
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import Constraint, RequestOutput, SamplingParams
from tests.unit.test_engine import PROMPTS, hf_greedy, joined, prompt_ids

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


async def constrained(
    engine: LLMEngine, request_id: str, constraint: Constraint, **params: object
) -> list[RequestOutput]:
    sampling = SamplingParams(constraint=constraint, **params)  # type: ignore[arg-type]
    ids = prompt_ids(engine, PROMPTS[0])
    return [o async for o in engine.generate(request_id, ids, sampling)]


async def test_regex_output_matches_and_stops_when_complete(engine: LLMEngine) -> None:
    outputs = await constrained(
        engine, "re", Constraint("regex", r"[0-9]{3}-[0-9]{2}"), temperature=0.0, max_tokens=40
    )
    assert re.fullmatch(r"[0-9]{3}-[0-9]{2}", joined(outputs)), joined(outputs)
    assert outputs[-1].finish_reason == "stop"


async def test_json_schema_output_validates_even_when_sampled(engine: LLMEngine) -> None:
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    for seed in range(3):  # a random toy model: only the grammar makes this valid JSON
        outputs = await constrained(
            engine, f"js{seed}", constraint, temperature=1.0, seed=seed, max_tokens=200
        )
        assert outputs[-1].finish_reason == "stop", joined(outputs)
        jsonschema.validate(json.loads(joined(outputs)), SCHEMA)


async def test_choice_and_json_object(engine: LLMEngine) -> None:
    choices = ["yes", "no", "maybe later"]
    outputs = await constrained(
        engine, "ch", Constraint("choice", json.dumps(choices)), temperature=1.0, seed=3
    )
    assert joined(outputs) in choices
    outputs = await constrained(
        engine, "obj", Constraint("json_object"), temperature=1.0, seed=4, max_tokens=120
    )
    if outputs[-1].finish_reason == "stop":  # a complete object; "length" leaves a prefix
        assert isinstance(json.loads(joined(outputs)), dict)
    assert joined(outputs).lstrip().startswith("{")


async def test_a_rows_mask_never_reaches_another_row(
    engine: LLMEngine, tiny_model_dir: Path
) -> None:
    free_params = SamplingParams(temperature=0.0, max_tokens=12)
    free = engine.generate("free", prompt_ids(engine, PROMPTS[1]), free_params)
    results = await asyncio.gather(
        constrained(engine, "digits", Constraint("regex", r"[0-9]{20}"), temperature=0.0),
        _collect(free),
    )
    assert re.fullmatch(r"[0-9]{20}", joined(results[0]))
    assert joined(results[1]) == hf_greedy(tiny_model_dir, engine, PROMPTS[1], 12)


async def _collect(stream: object) -> list[RequestOutput]:
    return [o async for o in stream]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("regex", "(unclosed"),
        Constraint("json_schema", json.dumps({"type": "no-such-type"})),
        Constraint("json_schema", "not json"),
        Constraint("grammar", "start: missing_rule"),
    ],
)
async def test_invalid_constraints_are_refused(engine: LLMEngine, constraint: Constraint) -> None:
    with pytest.raises(GrammarError, match="invalid"):
        await engine.compile_grammar(constraint)


async def test_a_repeated_constraint_compiles_once(engine: LLMEngine) -> None:
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    first = await engine.compile_grammar(constraint)
    assert await engine.compile_grammar(Constraint("json_schema", json.dumps(SCHEMA))) is first


async def test_a_slow_compile_is_refused_and_the_engine_keeps_serving(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_compile = engine.grammars.compile

    def slow_compile(constraint: Constraint) -> object:
        time.sleep(1.0)
        return real_compile(constraint)

    monkeypatch.setattr(engine.grammars, "compile", slow_compile)
    with pytest.raises(GrammarError, match="to compile"):
        await engine.compile_grammar(Constraint("regex", "[a-z]+"), timeout_s=0.1)
    outputs = await _collect(
        engine.generate("after", prompt_ids(engine, "The"), SamplingParams(max_tokens=3))
    )
    assert outputs[-1].finish_reason in ("stop", "length")


async def test_a_built_engine_prepares_the_grammar_tokenizer_before_any_request(
    engine: LLMEngine,
) -> None:
    for _ in range(200):  # built by serve_app.loading, which starts the warm-up thread
        if engine.grammars.is_warm:
            break
        await asyncio.sleep(0.05)
    assert engine.grammars.is_warm


def test_the_tokenizer_view_is_what_llguidance_builds_itself(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built from the tokenizer's JSON without llguidance's copy: the same tokens, the same
    EOS; a tokenizer that pads (the copy is there to turn that off) still goes the library's
    way."""
    import llguidance.hf

    from serve_app.engine.grammar import _llg_tokenizer_of

    tokenizer, vocab_size = engine.tokenizer, engine.vocab_size
    ours = _llg_tokenizer_of(tokenizer, vocab_size, None)
    theirs = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    text = 'Hello wörld {"a": [1, 2]} \U0001f600 end'
    assert ours.tokenize_str(text) == theirs.tokenize_str(text)
    assert (ours.eos_token, ours.vocab_size) == (theirs.eos_token, theirs.vocab_size)

    padded = copy.deepcopy(tokenizer)
    padded.backend_tokenizer.enable_padding(length=8)
    seen: list[object] = []
    original = llguidance.hf.from_tokenizer

    def spy(tok: object, **kwargs: object) -> object:
        seen.append(tok)
        return original(tok, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(llguidance.hf, "from_tokenizer", spy)
    view = _llg_tokenizer_of(padded, vocab_size, [tokenizer.eos_token_id])
    assert seen == [padded] and view.tokenize_str(text) == theirs.tokenize_str(text)
