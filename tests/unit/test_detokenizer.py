"""Incremental detokenization (UTF-8) and stop strings that span token boundaries."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from serve_app.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher


def test_multibyte_utf8_is_never_split(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "héllo 世界 🙂🚀 wörld ünïcödé ✓"
    ids = tokenizer(text)["input_ids"]
    # Byte-level BPE splits rare characters across several tokens: the case under test.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[])
    deltas = [detok.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_across_deltas_is_cut_and_not_emitted() -> None:
    matcher = StopStringMatcher(("END",))
    emitted = []
    for delta in ["Hello E", "N", "D and more"]:
        text, hit = matcher.feed(delta)
        emitted.append(text)
        if hit:
            break
    assert hit
    assert "".join(emitted) == "Hello "


def test_held_back_text_is_released_when_no_stop_matches() -> None:
    matcher = StopStringMatcher(("STOP!",))
    text, hit = matcher.feed("ab STO")
    assert not hit and text == "ab"  # "STO" (or a tail of it) could still become "STOP!"
    assert matcher.flush() == " STO"


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopStringMatcher(("world", "lo w"))
    text, hit = matcher.feed("hello world")
    assert hit and text == "hel"


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher(())
    assert matcher.feed("abc") == ("abc", False)
