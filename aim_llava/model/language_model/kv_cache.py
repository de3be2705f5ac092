"""A per-layer key/value cache whose layers may hold different numbers of tokens.

Each layer keeps keys and values of shape [B, kv_heads, L_layer, d] and a boolean ``valid``
[B, L_layer] that marks real (not padding) entries. Layers are independent so that token
reduction can shorten the cache of later layers only. ``next_position`` [B] is the position id
the next generated token takes in each sample.

Storage is preallocated: a layer's buffers are allocated when the prefill reaches it, with its
own length after pruning plus room for ``reserve`` more tokens (generation reserves
``max_new_tokens``), and doubled if ever full. A decoding step (:meth:`LayerCache.write`) writes
one slot at an index held in a device tensor and attends over the whole buffer, masked by
``valid_buffer``: the step has the same shapes every time, so it can be captured as a CUDA graph.
Capacities are rounded up to :data:`CAPACITY_ALIGNMENT` slots: SDPA's memory-efficient kernel
(the one that takes the step's mask) would otherwise copy the mask into an aligned one every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CAPACITY_ALIGNMENT = 16  # slots; the memory-efficient attention kernel's mask alignment


@dataclass
class LayerCache:
    """Buffers with capacity; the first ``length`` positions are in use."""

    key_buffer: torch.Tensor
    value_buffer: torch.Tensor
    valid_buffer: torch.Tensor
    length: int
    padded: bool

    @property
    def keys(self) -> torch.Tensor:
        return self.key_buffer[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.value_buffer[:, :, : self.length]

    @property
    def valid(self) -> torch.Tensor:
        return self.valid_buffer[:, : self.length]

    @classmethod
    def allocate(cls, keys, values, valid, padded: bool, capacity: int) -> LayerCache:
        batch, heads, length, dim = keys.shape
        capacity = -(-capacity // CAPACITY_ALIGNMENT) * CAPACITY_ALIGNMENT
        # zeros, not empty: a decoding step attends over the whole buffer with the unwritten slots
        # masked, and a masked slot's weight 0 times a garbage NaN value would still be NaN
        key_buffer = keys.new_zeros(batch, heads, capacity, dim)
        value_buffer = values.new_zeros(batch, heads, capacity, values.shape[3])
        valid_buffer = valid.new_zeros(batch, capacity)
        key_buffer[:, :, :length], value_buffer[:, :, :length], valid_buffer[:, :length] = keys, values, valid
        return cls(key_buffer, value_buffer, valid_buffer, length, padded)

    def grow(self, needed: int) -> LayerCache:
        capacity = max(needed, 2 * self.key_buffer.shape[2])
        return LayerCache.allocate(self.keys, self.values, self.valid, self.padded, capacity)

    def write(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        """Write one step's keys and values [B, kv_heads, 1, d] at slot ``index`` ([1], on the
        device) and mark the slot valid; ``length`` is advanced afterwards by :meth:`KVCache.advance`."""
        self.key_buffer.index_copy_(2, index, keys)
        self.value_buffer.index_copy_(2, index, values)
        self.valid_buffer.index_fill_(1, index, True)


@dataclass
class KVCache:
    num_layers: int
    reserve: int = 0
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
        new = keys.shape[2]
        if entry is None:
            entry = LayerCache.allocate(keys, values, valid, padded, new + self.reserve)
        else:
            if entry.length + new > entry.key_buffer.shape[2]:
                entry = entry.grow(entry.length + new)
            end = entry.length + new
            entry.key_buffer[:, :, entry.length : end] = keys
            entry.value_buffer[:, :, entry.length : end] = values
            entry.valid_buffer[:, entry.length : end] = valid
            entry.length = end
            entry.padded = entry.padded or padded
        self.layers[layer] = entry
        return entry

    @property
    def nbytes(self) -> int:
        """Bytes the allocated buffers take (keys, values and validity, reserve included)."""
        return sum(buffer.nbytes for entry in self.layers if entry is not None
                   for buffer in (entry.key_buffer, entry.value_buffer, entry.valid_buffer))

    def advance(self, steps: int) -> None:
        """Count ``steps`` decoding steps written with :meth:`LayerCache.write` into every layer."""
        for entry in self.layers:
            entry.length += steps
