"""A tiny random Llama with a real byte-level BPE tokenizer, saved and loaded the real way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from serve_app.config import EngineOptions, ModelConfig
from serve_app.engine import quantized_linear
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.q4_native import q4_kernel
from serve_app.loading import build_llm_engine

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. Paris is a city in France.",
    "héllo wörld, 世界 你好, emoji 🙂 🚀 and more text for merges.",
    "def main():\n    return 42\n",
] * 20


def _train_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llama_config(**overrides: Any) -> Any:
    """Llama's architecture at toy size: 2 layers, grouped-query attention (4 heads, 2 KV)."""
    from transformers import LlamaConfig

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**{**sizes, **heads, **overrides})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _train_tokenizer()
    config = tiny_llama_config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        max_position_embeddings=512,
        # Weights 10x transformers' default scale, so attention is sharp: at 0.02 a toy model
        # attends almost uniformly, and wrong positions or a misplaced cached key would not
        # change a single greedy token (measured: 0 of 15 flipped, 13 of 15 at 0.2).
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
    )
    model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


def tiny_model_config(directory: Path, **engine: object) -> ModelConfig:
    return ModelConfig(
        id="tiny-llama",
        kind="chat",
        source=str(directory),
        engine=EngineOptions(torch_threads=1, **engine),  # type: ignore[arg-type]
    )


@pytest.fixture()
def engine(tiny_model_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    built: LLMEngine = build_llm_engine(tiny_model_config(tiny_model_dir, max_num_seqs=8), tmp_path)
    yield built
    built.shutdown()


@pytest.fixture(params=["q4_kernel", "torch int4"])
def int4_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Int4Linear layers built in the test take each kernel in turn (q4_kernel.c where it builds
    on this machine, torch's int4 kernel)."""
    if request.param == "q4_kernel" and q4_kernel() is None:
        pytest.skip("q4_kernel.c does not build or run here")
    if request.param == "torch int4":
        monkeypatch.setattr(quantized_linear, "q4_kernel", lambda: None)
    return str(request.param)
