"""The running batch's KV cache: rows join (left-padded) and leave between decode steps."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _pad_left(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    # F.pad lists (left, right) pairs from the last dimension backwards.
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [amount, 0]
    return F.pad(tensor, pad)


class BatchCache:
    """KV cache and attention mask of the rows now decoding, one row per request.

    Every row keeps its real tokens right-aligned; the mask hides the left padding, so a new
    request can join with a prompt of any length and a finished one can leave at any step.
    """

    __slots__ = ("cache", "attention_mask")

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None  # [rows, kv_len], 1 = real token

    @property
    def num_rows(self) -> int:
        return 0 if self.attention_mask is None else int(self.attention_mask.shape[0])

    def append_rows(self, new_cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Adds freshly prefilled rows (their cache and left-padded mask) after the others."""
        if self.cache is None or self.attention_mask is None:
            self.cache, self.attention_mask = new_cache, new_mask
            return
        batch_len, new_len = int(self.attention_mask.shape[1]), int(new_mask.shape[1])
        kv_len = max(batch_len, new_len)
        old_pad, new_pad = kv_len - batch_len, kv_len - new_len
        layers = []
        for old, new in zip(_layers(self.cache), _layers(new_cache), strict=True):
            (old_keys, old_values), (new_keys, new_values) = _kv(old), _kv(new)
            layers.append(
                (
                    torch.cat([_pad_left(old_keys, old_pad, 2), _pad_left(new_keys, new_pad, 2)]),
                    torch.cat(
                        [_pad_left(old_values, old_pad, 2), _pad_left(new_values, new_pad, 2)]
                    ),
                )
            )
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.attention_mask = torch.cat(
            [_pad_left(self.attention_mask, old_pad, 1), _pad_left(new_mask, new_pad, 1)]
        )

    def decode_mask(self) -> torch.Tensor:
        """Mask for one decode step (past plus the token being fed), kept for the next step."""
        assert self.attention_mask is not None
        ones = self.attention_mask.new_ones((self.num_rows, 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        return self.attention_mask

    def keep_rows(self, row_indices: list[int]) -> None:
        """Drops every row not listed (finished or aborted), then trims all-padding columns."""
        if not row_indices:
            self.cache, self.attention_mask = None, None
            return
        assert self.cache is not None and self.attention_mask is not None
        index = torch.tensor(row_indices, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self._trim_left_padding()

    def _trim_left_padding(self) -> None:
        assert self.cache is not None and self.attention_mask is not None
        has_token = self.attention_mask.any(dim=0)
        first = int(torch.argmax(has_token.int()).item())
        if first == 0:
            return
        for layer in _layers(self.cache):
            keys, values = _kv(layer)
            layer.keys, layer.values = keys[:, :, first:, :], values[:, :, first:, :]
        self.attention_mask = self.attention_mask[:, first:]


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    # A DynamicCache built without a model config holds plain full-attention DynamicLayers.
    return cast(list[DynamicLayer], cache.layers)


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None  # every row was prefilled
    return layer.keys, layer.values
