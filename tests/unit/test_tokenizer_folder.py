"""A prepared folder's tokenizer loads as TokenizersBackend (the saved tokenizer.json read in
Rust) where that is the same tokenizer as the class the GGUF gave, and keeps its class where the
class does more than rebuild its pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TokenizersBackend
from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

from serve_app.loading import load_tokenizer
from serve_app.model_store import _name_the_file_loading_class

TEXTS = ["hello world", " hello  world", "hello!", "", "wörld ✓ hello", "<bos>hello<eos>"]


def save_small_gemma_tokenizer(folder: Path) -> None:
    """A GemmaTokenizer (BPE with byte fallback, "▁" for spaces) over a vocabulary of a few
    pieces, saved as the preparation saves the one a GGUF gives."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", "h", "e", "l", "o", "w", "r"]
    pieces += ["d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor", "ld", "▁world"]
    pieces += [f"<0x{byte:02X}>" for byte in range(256)]
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "hello"), ("▁", "w")]
    merges += [("o", "r"), ("▁w", "or"), ("▁wor", "ld")]
    tokenizer = GemmaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges)
    tokenizer.save_pretrained(folder)


def test_a_rebuild_only_class_loads_as_tokenizers_backend_with_the_same_behaviour(
    tmp_path: Path,
) -> None:
    save_small_gemma_tokenizer(tmp_path)
    expected = GemmaTokenizer.from_pretrained(tmp_path)

    _name_the_file_loading_class(tmp_path, GemmaTokenizer)
    loaded = load_tokenizer(tmp_path)

    assert type(loaded) is TokenizersBackend
    for text in TEXTS:
        for special in (True, False):
            assert loaded.encode(text, add_special_tokens=special) == expected.encode(
                text, add_special_tokens=special
            ), text
        ids = expected.encode(text)
        for skip in (True, False):
            assert loaded.decode(ids, skip_special_tokens=skip) == expected.decode(
                ids, skip_special_tokens=skip
            ), text
    assert loaded.encode("hello world", add_special_tokens=False) != []
    assert loaded.get_vocab() == expected.get_vocab()
    for name in ("padding_side", "model_input_names", "all_special_ids", "bos_token_id"):
        assert getattr(loaded, name) == getattr(expected, name), name
    assert loaded.padding_side == "left"  # GemmaTokenizer's class default, now in the config


def test_a_class_with_more_than_a_rebuild_keeps_its_name(tmp_path: Path) -> None:
    save_small_gemma_tokenizer(tmp_path)
    saved = (tmp_path / "tokenizer_config.json").read_text()

    class WithMethod(TokenizersBackend):
        def decode(self, *args: Any, **kwargs: Any) -> Any:
            return super().decode(*args, **kwargs).upper()

    class Derived(GemmaTokenizer):
        pass

    for tokenizer_class in (WithMethod, Derived):
        _name_the_file_loading_class(tmp_path, tokenizer_class)
        assert (tmp_path / "tokenizer_config.json").read_text() == saved
    assert json.loads(saved)["tokenizer_class"] == "GemmaTokenizer"
