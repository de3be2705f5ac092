"""A per-layer key/value cache whose layers may hold different numbers of tokens.

Each layer keeps keys and values of shape [B, kv_heads, L_layer, d] and a boolean ``valid``
[B, L_layer] that marks real (not padding) entries. Layers are independent so that token
reduction can shorten the cache of later layers only. ``next_position`` [B] is the position id
the next generated token takes in each sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCache:
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    padded: bool


@dataclass
class KVCache:
    num_layers: int
    layers: list[LayerCache | None] = field(default_factory=list)
    next_position: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.num_layers

    def append(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, padded: bool
    ) -> LayerCache:
        """Add new entries to a layer; returns the layer's whole cache.

        ``padded`` says whether ``valid`` has any False entry (known to the caller without a
        device sync), so that fully valid caches can use mask-free attention kernels.
        """
        entry = self.layers[layer]
        if entry is None:
            entry = LayerCache(keys, values, valid, padded)
        else:
            entry = LayerCache(
                torch.cat([entry.keys, keys], dim=2),
                torch.cat([entry.values, values], dim=2),
                torch.cat([entry.valid, valid], dim=1),
                entry.padded or padded,
            )
        self.layers[layer] = entry
        return entry
