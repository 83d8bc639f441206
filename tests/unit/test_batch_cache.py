"""The batch KV cache grows in place and keeps exactly the rows and columns asked for."""

from __future__ import annotations

import torch

from serve_app.engine.batch import GrowingLayer, _spare_columns


def _kv(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn((rows, 2, length, 4), generator=generator)
    return keys, torch.randn((rows, 2, length, 4), generator=generator)


def test_update_in_place_equals_concatenation_across_regrowth() -> None:
    keys, values = _kv(3, 5, seed=0)
    layer = GrowingLayer(keys, values)
    expected_keys, expected_values = keys, values
    buffer_before = layer._key_buffer
    steps = _spare_columns(5) + 3  # past the first buffer's spare room: one regrow
    for step in range(steps):
        new_keys, new_values = _kv(3, 1, seed=step + 1)
        got_keys, got_values = layer.update(new_keys, new_values)
        expected_keys = torch.cat([expected_keys, new_keys], dim=2)
        expected_values = torch.cat([expected_values, new_values], dim=2)
        assert torch.equal(got_keys, expected_keys)
        assert torch.equal(got_values, expected_values)
    assert layer.get_seq_length() == 5 + steps
    assert layer._key_buffer is not buffer_before  # it did regrow, and stayed equal


def test_a_chunk_longer_than_the_spare_room_regrows_to_fit() -> None:
    keys, values = _kv(1, 16, seed=0)
    layer = GrowingLayer(keys, values)
    chunk_keys, chunk_values = _kv(1, _spare_columns(16) + 200, seed=1)  # a prefill chunk
    got_keys, got_values = layer.update(chunk_keys, chunk_values)
    assert torch.equal(got_keys, torch.cat([keys, chunk_keys], dim=2))
    assert torch.equal(got_values, torch.cat([values, chunk_values], dim=2))
    assert layer._key_buffer.shape[2] > got_keys.shape[2]  # room left for decode steps


def test_steps_within_spare_room_write_into_the_same_buffer() -> None:
    layer = GrowingLayer(*_kv(2, 4, seed=0))
    buffer = layer._key_buffer
    for step in range(_spare_columns(4)):
        layer.update(*_kv(2, 1, seed=step + 1))
    assert layer._key_buffer is buffer


def test_keep_selects_rows_and_drops_left_columns() -> None:
    keys, values = _kv(4, 6, seed=0)
    layer = GrowingLayer(keys, values)
    layer.keep(torch.tensor([3, 1]), first_column=2)
    assert torch.equal(layer.keys, keys[[3, 1], :, 2:])
    assert torch.equal(layer.values, values[[3, 1], :, 2:])
    new_keys, new_values = _kv(2, 1, seed=9)
    got_keys, _ = layer.update(new_keys, new_values)
    assert torch.equal(got_keys, torch.cat([keys[[3, 1], :, 2:], new_keys], dim=2))


def test_rows_join_into_spare_rows_right_aligned_and_leave_by_moving_in_place() -> None:
    keys, values = _kv(2, 6, seed=0)
    layer = GrowingLayer(keys, values, spare_rows=2)
    buffer = layer._key_buffer
    new_keys, new_values = _kv(1, 4, seed=1)
    assert layer.can_append(1, 4) and not layer.can_append(1, 7) and not layer.can_append(3, 4)
    layer.append(new_keys, new_values)
    padded = torch.cat([torch.zeros((1, 2, 2, 4)), new_keys], dim=2)  # zeros on its left
    assert torch.equal(layer.keys, torch.cat([keys, padded]))
    assert layer._key_buffer is buffer
    layer.move_rows([2, 1])  # row 0 left; the last row took its place
    assert torch.equal(layer.keys, torch.cat([padded, keys[1:2]]))
    assert layer._key_buffer is buffer
    got_keys, _ = layer.update(*_kv(2, 1, seed=2))  # a decode step writes the two rows only
    assert got_keys.shape == (2, 2, 7, 4) and layer.get_seq_length() == 7
