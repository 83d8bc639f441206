"""The running batch's KV cache: rows join (left-padded) and leave between decode steps.

Each layer's keys/values live in a buffer with spare columns on the right, so a decode step
writes its new column in place instead of copying the whole cache (transformers' DynamicLayer
concatenates every step: measured 10-17% of a SmolLM2 decode step at batch 16-32 on CPU).
The buffer has spare rows too: a prefilled request joins by writing its own row, and a
finished one leaves by the last row moving into its place, instead of a copy of every row
(SmolLM2, 15 rows of ~100 tokens: 38 ms per join, most of a 16-row decode step's 54 ms).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _spare_columns(length: int) -> int:
    # Room for the next steps: a regrow (one copy) every 64 + length/8 steps.
    return 64 + length // 8


# Fewer all-padding columns on the left stay (masked) rather than cost a copy of every row.
_MIN_TRIMMED_COLUMNS = 16


def _spare_rows(rows: int) -> int:
    # Room for the next requests to join (prefills come in groups of up to max_prefill_rows).
    # Never-written rows cost address space, not resident memory.
    return max(4, rows // 2)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of a buffer with room to grow in place:
    spare columns on the right, and (`spare_rows`) rows for requests that join later."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare_rows: int = 0) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self._rows = self._length = 0
        self._key_buffer = self._value_buffer = keys  # replaced by _refill
        self._refill(keys, values, row_capacity=int(keys.shape[0]) + spare_rows)

    @property
    def row_capacity(self) -> int:
        return int(self._key_buffer.shape[0])

    def _refill(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        incoming: int = 0,
        row_capacity: int | None = None,
    ) -> None:
        """Copies keys/values [rows, heads, length, dim] into fresh buffers with room for the
        `incoming` columns about to be written and spare columns after them (and row_capacity
        rows in all, the buffer's present row count when not given)."""
        rows, heads, length, _ = keys.shape
        columns = length + incoming + _spare_columns(length + incoming)
        capacity = max(rows, row_capacity if row_capacity is not None else self.row_capacity)
        self._key_buffer = keys.new_empty((capacity, heads, columns, keys.shape[3]))
        self._value_buffer = values.new_empty((capacity, values.shape[1], columns, values.shape[3]))
        self._key_buffer[:rows, :, :length].copy_(keys)
        self._value_buffer[:rows, :, :length].copy_(values)
        self._rows = rows
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        self._length = length
        self.keys = self._key_buffer[: self._rows, :, :length]
        self.values = self._value_buffer[: self._rows, :, :length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self._length, self._length + int(key_states.shape[2])
        if end > self._key_buffer.shape[2]:  # a chunk of a prompt can be longer than the spare
            self._refill(*_kv(self), incoming=end - start)
        rows = self._rows
        self._key_buffer[:rows, :, start:end].copy_(key_states)
        self._value_buffer[:rows, :, start:end].copy_(value_states)
        self._set_length(end)
        return _kv(self)

    def next_columns(self, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The buffers [row capacity, heads, capacity, dim] and the first of the `count`
        columns a forward writes its rows' new keys/values into in place (decode_kernel.c;
        room made first); columns_written then counts them."""
        start = self._length
        if start + count > self._key_buffer.shape[2]:
            self._refill(*_kv(self), incoming=count)
        return self._key_buffer, self._value_buffer, start

    def columns_written(self, count: int) -> None:
        self._set_length(self._length + count)

    def can_append(self, count: int, width: int) -> bool:
        """Whether `count` rows of `width` columns fit in place (spare rows, width <= length)."""
        return self._rows + count <= self.row_capacity and width <= self._length

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Writes rows [count, heads, width, dim] after the others, right-aligned with them and
        zeros on their left (masked columns must still hold finite numbers); can_append first."""
        start, end, width = self._rows, self._rows + int(keys.shape[0]), int(keys.shape[2])
        pad = self._length - width
        for buffer, new in ((self._key_buffer, keys), (self._value_buffer, values)):
            buffer[start:end, :, :pad].zero_()
            buffer[start:end, :, pad : self._length].copy_(new)
        self._rows = end
        self._set_length(self._length)

    def move_rows(self, rows: list[int]) -> None:
        """Keeps these rows in place: row j becomes old row rows[j] (rows[j] >= j, so no row is
        read after it was written); only the rows that change place are copied."""
        length = self._length
        for target, source in enumerate(rows):
            if source != target:
                for buffer in (self._key_buffer, self._value_buffer):
                    buffer[target, :, :length].copy_(buffer[source, :, :length])
        self._rows = len(rows)
        self._set_length(length)

    def keep(self, rows: torch.Tensor, first_column: int) -> None:
        """Keeps only these rows and the columns from first_column on (one copy)."""
        keys, values = _kv(self)
        self._refill(keys[rows, :, first_column:], values[rows, :, first_column:])


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
        """Adds freshly prefilled rows (their cache and left-padded mask) after the others: in
        place when they fit (spare rows, no wider than the batch), else one copy of all."""
        count, new_len = (int(n) for n in new_mask.shape)
        if self.cache is None or self.attention_mask is None:
            layers = [_kv(layer) for layer in _layers(new_cache)]
            self.cache = growing_cache(layers, spare_rows=_spare_rows(count))
            self.attention_mask = new_mask
            return
        batch_len = int(self.attention_mask.shape[1])
        growing = _growing_layers(self.cache)
        if growing[0].can_append(count, new_len):  # every layer has the same shape
            for layer, new in zip(growing, _layers(new_cache), strict=True):
                layer.append(*_kv(new))
            padded = _pad_left(new_mask, batch_len - new_len, 1)
            self.attention_mask = torch.cat([self.attention_mask, padded])
            return
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
        rows = int(self.attention_mask.shape[0]) + count
        self.cache = growing_cache(layers, spare_rows=_spare_rows(rows))
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
        """Keeps the listed rows (row j becomes old row row_indices[j]; the scheduler lists
        them so that row_indices[j] >= j). They move in place; the all-padding columns on the
        left are dropped (one copy of all) only once they are a quarter of the columns."""
        if not row_indices:
            self.cache, self.attention_mask = None, None
            return
        assert self.cache is not None and self.attention_mask is not None
        index = torch.tensor(row_indices, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        first = int(torch.argmax(mask.any(dim=0).int()).item())  # first column with a token
        if first >= max(_MIN_TRIMMED_COLUMNS, int(mask.shape[1]) // 4):
            for layer in _growing_layers(self.cache):
                layer.keep(index, first)
            self.attention_mask = mask[:, first:]
            return
        for layer in _growing_layers(self.cache):
            layer.move_rows(row_indices)
        self.attention_mask = mask


def growing_cache(
    layers: list[tuple[torch.Tensor, torch.Tensor]], spare_rows: int = 0
) -> DynamicCache:
    """A cache holding these keys/values [rows, heads, length, dim] (copied), growing in place
    (with room for `spare_rows` more rows)."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer(keys, values, spare_rows) for keys, values in layers]
    return cache


def _growing_layers(cache: DynamicCache) -> list[GrowingLayer]:
    return cast(list[GrowingLayer], cache.layers)  # the batch's cache is a growing_cache


def cache_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values [rows, heads, length, dim]."""
    return [_kv(layer) for layer in _layers(cache)]


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    # A DynamicCache built without a model config holds plain full-attention DynamicLayers.
    return cast(list[DynamicLayer], cache.layers)


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None  # every row was prefilled
    return layer.keys, layer.values


def left_padded_rows(
    rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None], width: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the rows' keys/values ([1, heads, length <= width, dim] each, or None for a
    row with none) left-padded with zeros to `width` and stacked: [rows, heads, width, dim]."""
    template = next(row for row in rows if row is not None)
    layers = []
    for index, (template_keys, template_values) in enumerate(template):
        keys, values = [], []
        for row in rows:
            if row is None:
                keys.append(_pad_left(template_keys[:, :, :0], width, 2))
                values.append(_pad_left(template_values[:, :, :0], width, 2))
            else:
                row_keys, row_values = row[index]
                keys.append(_pad_left(row_keys, width - int(row_keys.shape[2]), 2))
                values.append(_pad_left(row_values, width - int(row_values.shape[2]), 2))
        layers.append((torch.cat(keys), torch.cat(values)))
    return layers
