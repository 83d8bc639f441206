"""Linear layers prepacked for oneDNN give nn.Linear's results; a tied head reads a mapped file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from serve_app.engine.packed_linear import PackedLinear, can_pack, pack_linear_layers
from tests.unit.conftest import tiny_llama_config

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN is not built into this torch"
)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (3, 7, 48)])
def test_packed_linear_matches_nn_linear(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input() -> None:
    linear = torch.nn.Linear(48, 16)
    x = torch.randn(4, 9, 48)[:, -1:, :]  # the slice a causal LM head gets
    assert not x.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def _tied_llama(directory: Path) -> Path:
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=300, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def test_tied_head_is_packed_and_the_lookup_reads_the_file(tmp_path: Path) -> None:
    directory = _tied_llama(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
    packed = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert can_pack(packed)
    assert packed.lm_head.weight.data_ptr() == packed.get_input_embeddings().weight.data_ptr()

    num_linear = sum(type(m) is torch.nn.Linear for m in packed.modules())
    assert pack_linear_layers(packed, directory) == num_linear == 2 * 7 + 1
    assert isinstance(packed.lm_head, PackedLinear)
    lookup = packed.get_input_embeddings().weight
    torch.testing.assert_close(lookup, plain.get_input_embeddings().weight, rtol=0, atol=0)

    ids = torch.tensor([[1, 5, 9, 42, 7], [3, 3, 250, 11, 0]])
    torch.testing.assert_close(_logits(packed, ids), _logits(plain, ids), rtol=1e-4, atol=1e-4)


def test_tied_head_stays_plain_without_the_weights_file(tmp_path: Path) -> None:
    directory = _tied_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert pack_linear_layers(model) == 2 * 7
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_packed_linear_owns_its_bias() -> None:
    """The plain bias may point into the loader's map of the weights file, which must be freed."""
    linear = torch.nn.Linear(48, 16)
    packed = PackedLinear(linear)
    assert packed.bias is not None and packed.bias.data_ptr() != linear.bias.data_ptr()
    torch.testing.assert_close(packed.bias, linear.bias.detach(), rtol=0, atol=0)
