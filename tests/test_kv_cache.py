"""The growable KV cache holds exactly what was appended, with or without reserved room."""

import pytest
import torch

from aim_llava.model.language_model.kv_cache import KVCache


@pytest.mark.parametrize("reserve", [0, 1, 16])
def test_appends_equal_concatenation(reserve):
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(num_layers=2, reserve=reserve)
    pieces = [torch.randn(2, 3, n, 4, generator=gen) for n in (5, 1, 1, 3, 1)]
    valid = [torch.rand(2, p.shape[2], generator=gen) > 0.3 for p in pieces]
    for keys, ok in zip(pieces, valid):
        entry = cache.append(1, keys, -keys, ok, padded=not bool(ok.all()))
    assert torch.equal(entry.keys, torch.cat(pieces, dim=2))
    assert torch.equal(entry.values, -torch.cat(pieces, dim=2))
    assert torch.equal(entry.valid, torch.cat(valid, dim=1))
    assert entry.padded == (not bool(torch.cat(valid, dim=1).all()))
    assert cache.layers[0] is None


@pytest.fixture
def nan_filled_allocations():
    """Uninitialised tensors (torch.empty, new_empty, empty_like) hold NaN (True for booleans), as
    deterministic mode's ``fill_uninitialized_memory`` makes them: garbage that a missing zero-fill
    would leave in a buffer shows."""
    enabled, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(8).isnan().all()
    yield
    torch.use_deterministic_algorithms(enabled)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_decoding_slots_are_written_in_place_and_unwritten_slots_are_zero(nan_filled_allocations):
    """A decoding step attends over the whole buffer with unwritten slots masked: those slots must
    hold finite values (0 weight x NaN garbage would still be NaN)."""
    gen = torch.Generator().manual_seed(1)
    cache = KVCache(num_layers=1, reserve=4)
    keys = torch.randn(2, 3, 5, 4, generator=gen)
    valid = torch.ones(2, 5, dtype=torch.bool)
    entry = cache.append(0, keys, keys + 1, valid, padded=False)
    assert entry.key_buffer.shape[2] == 16  # 5 + 4 reserved, rounded up to the alignment
    assert torch.count_nonzero(entry.key_buffer[:, :, 5:]) == 0 and torch.count_nonzero(entry.value_buffer[:, :, 5:]) == 0
    assert not entry.valid_buffer[:, 5:].any()
    step_keys = torch.randn(2, 3, 1, 4, generator=gen)
    for step in range(2):
        entry.write(step_keys + step, step_keys - step, torch.tensor([entry.length + step]))
    cache.advance(2)
    assert entry.length == 7
    assert torch.equal(entry.keys, torch.cat([keys, step_keys, step_keys + 1], dim=2))
    assert torch.equal(entry.values, torch.cat([keys + 1, step_keys, step_keys - 1], dim=2))
    assert entry.valid.all() and not entry.valid_buffer[:, 7:].any()
