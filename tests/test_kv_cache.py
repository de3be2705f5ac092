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
